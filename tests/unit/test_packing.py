"""THD packing: layout, errors, and packed == unpacked (loss, per-token logprobs, gradients)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import automodel_mimo.models.packed_attention as packed_attention
from automodel_mimo.data.batching import collate
from automodel_mimo.data.packing import collate_packed, pack, per_sequence, sequence_index, to_sequences
from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX, token_logprobs
from tests.unit.oracle import assert_tensors_close, full_grads, random_rows, rel_err, tiny_llama_config


def test_first_fit_decreasing_with_padding_to_a_multiple():
    plan = pack([5, 9, 3, 7, 1], packed_sequence_size=12, multiple=4)
    # padded lengths 8, 12, 4, 8, 4 -> decreasing: 12 | 8 + 4 | 8 + 4
    assert [r.sequences for r in plan] == [[1], [0, 2], [3, 4]]
    assert all(r.used <= 12 for r in plan)


def test_groups_stay_whole_and_in_order():
    # pairs (0, 1), (2, 3), (4, 5) padded to 4: units 8, 12, 12 -> decreasing: 12 | 12 | 8 (16 holds one unit)
    plan = pack([3, 4, 8, 2, 1, 5], packed_sequence_size=16, multiple=4, group=2)
    assert [r.sequences for r in plan] == [[2, 3], [4, 5], [0, 1]]
    assert [r.sequences for r in pack([3, 4, 8, 2, 1, 5], 24, 4, group=2)] == [[2, 3, 4, 5], [0, 1]]
    with pytest.raises(UserInputError, match=r"2 sequences kept in one row \(e.g. a DPO pair\) of \[8, 2\] tokens"):
        pack([3, 4, 8, 2], packed_sequence_size=8, multiple=4, group=2)


def test_sequence_slots_of_packed_rows():
    """seq_index maps each sequence slot to its whole-row positions; to_sequences gathers them (and routes
    gradients back); per_sequence flattens slot-layout side data and leaves the row layout alone."""
    rows = [{"input_ids": [1] * n, "labels": [2] * n} for n in (3, 2, 5)]
    plan = pack([3, 2, 5], 8, 2)  # padded 4, 2, 6 -> rows [2, 1] and [0]
    b = collate_packed(rows, plan, 8, 2, pad_id=0)
    index = sequence_index(b["cu_seqlens"], b["cu_seqlens_padded"])
    assert index.tolist() == [[[0, 1, 2, 3, 4], [6, 7, -1, -1, -1]],
                              [[0, 1, 2, -1, -1], [-1, -1, -1, -1, -1]]]
    values = torch.arange(16.0).view(2, 8).requires_grad_()
    seqs = to_sequences(values, index)
    assert seqs.tolist() == [[0, 1, 2, 3, 4], [6, 7, 0, 0, 0], [8, 9, 10, 0, 0], [0, 0, 0, 0, 0]]
    seqs.sum().backward()
    assert values.grad.tolist() == [[1, 1, 1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]]
    mb = {**b, "seq_index": index, "advantages": torch.tensor([[1.0, 2.0], [3.0, 0.0]]), "row_ids": torch.arange(2)}
    view = per_sequence(mb)
    assert view["advantages"].tolist() == [1, 2, 3, 0] and view["loss_mask"].shape == (4, 5)
    assert view["input_ids"].shape == (2, 8) and view["row_ids"].tolist() == [0, 1]


def test_layout_of_a_packed_row():
    rows = [{"input_ids": [11, 12, 13], "labels": [12, 13, IGNORE_INDEX]},
            {"input_ids": [21, 22], "labels": [IGNORE_INDEX, 23]}]
    b = collate_packed(rows, pack([3, 2], 10, 2), 10, 2, pad_id=0, n_rows=2)
    assert b["input_ids"][0].tolist() == [11, 12, 13, 0, 21, 22, 0, 0, 0, 0]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3]  # restarts; trailing pad is a segment
    assert b["labels"][0].tolist() == [12, 13, -100, -100, -100, 23, -100, -100, -100, -100]
    assert b["cu_seqlens"][0].tolist()[:3] == [0, 3, 5]
    assert b["cu_seqlens_padded"][0].tolist()[:4] == [0, 4, 6, 10]
    assert b["loss_mask"][1].sum() == 0 and b["position_ids"][1].tolist() == list(range(10))  # dummy row


def test_sequence_longer_than_a_row_is_a_clear_error():
    with pytest.raises(UserInputError, match="data.packed_sequence_size=8"):
        pack([5, 9], packed_sequence_size=8)
    with pytest.raises(UserInputError, match="must be a multiple of 4"):
        pack([5], packed_sequence_size=10, multiple=4)


def _rows() -> list[dict]:
    rows = random_rows(7, seed=5, min_len=3, max_len=19)  # odd lengths; row 1 has no loss token
    rows.append({"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 8, IGNORE_INDEX]})  # 1-token answer
    rows.append({"input_ids": list(range(1, 33)), "labels": list(range(2, 33)) + [IGNORE_INDEX]})  # fills a row
    return rows


def _loss_and_grads(model, batch, logits) -> tuple[torch.Tensor, torch.Tensor, dict]:
    lp = token_logprobs(logits, batch["labels"])
    loss = -(lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    return loss.detach(), lp.detach(), full_grads(model.named_parameters())


@pytest.mark.parametrize("multiple", [1, 4])
def test_packed_equals_unpacked(multiple):
    rows = _rows()
    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="sdpa")
    torch.manual_seed(0)
    packed_model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation=packed_attention.NAME)

    u = collate(rows, pad_id=0)
    ref_loss, ref_lp, ref_grads = _loss_and_grads(
        ref_model, u, ref_model(input_ids=u["input_ids"], attention_mask=u["attention_mask"]).logits)
    plan = pack([len(r["input_ids"]) for r in rows], 32, multiple)
    p = collate_packed(rows, plan, 32, multiple, pad_id=0)
    loss, lp, grads = _loss_and_grads(
        packed_model, p, packed_model(input_ids=p["input_ids"], position_ids=p["position_ids"]).logits)

    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * float(ref_loss)
    assert_tensors_close(grads, ref_grads, "gradients")
    for r, row in enumerate(plan):  # per-token logprobs, sequence by sequence
        for k, i in enumerate(row.sequences):
            start, n = int(p["cu_seqlens_padded"][r, k]), len(rows[i]["input_ids"])
            assert rel_err(lp[r, start:start + n], ref_lp[i, :n]) < 1e-5 or ref_lp[i, :n].abs().sum() == 0
    assert any(len(row.sequences) == 1 for row in plan)  # a row holding a single sequence
