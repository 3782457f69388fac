"""`model.pretrained` with a Qwen3-MoE folder saved by transformers (docs/moe.md): the trainer loads it with nemo's MoE
layers holding the folder's experts (ep1 and ep2 on 2 ranks: its logits are transformers' own), and the HF export
of the model after one training step loads back in transformers with the trainer's logits (fp32, gloo)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig
from automodel_mimo.data.batching import collate, local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.distributed.mesh import build_parallel_state
from automodel_mimo.models.build import build_handle, build_hf_config, build_model
from automodel_mimo.models.tokenizer import build_default_tokenizer
from policies.policy import Policy
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, random_rows, rel_err, train_config

ROWS = 4


def tiny_qwen3_moe(vocab: int) -> Qwen3MoeConfig:
    """8 experts, top-2, 2 sparse layers; transformers' defaults otherwise."""
    return Qwen3MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.01,
                          max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random-init Qwen3-MoE as transformers saves it (its experts split one tensor per expert on disk)."""
    path = tmp_path_factory.mktemp("qwen3_moe")
    tokenizer = build_default_tokenizer()
    torch.manual_seed(11)
    Qwen3MoeForCausalLM(tiny_qwen3_moe(len(tokenizer))).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def disk_keys(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _batch() -> dict:
    rows = random_rows(ROWS, seed=5, max_len=14)
    return collate(rows, pad_id=0), rows


def _logits(handle, inputs: dict) -> torch.Tensor:
    """The trainer's logits of the whole batch on every rank (eval; FSDP's gathered parameters dropped after)."""
    logits = handle.eval().forward_capture(inputs, lambda out, _b: out.detach().clone(), (), torch.float32)
    handle.reshard()
    handle.train()
    return logits


def _load_step_export(folder, ep: int) -> dict:
    """Load the folder under ep (dp2), logits of the batch, one SGD step on it, logits again, export (rank 0)."""
    parallel = ParallelConfig(dp=2, ep=ep)
    state = build_parallel_state(parallel, torch.device("cpu"))
    tokenizer = build_default_tokenizer()
    model_cfg = ModelConfig(pretrained=str(folder))
    cfg = RunConfig(model=model_cfg, parallel=parallel, train=train_config("sgd", 0.0, ROWS, ROWS // 2), seed=0)
    handle = build_handle(cfg, build_model(model_cfg, build_hf_config(model_cfg, tokenizer), seed=0), state, pad_id=0)
    batch, rows = _batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    before = _logits(handle, inputs)
    policy = Policy(handle, cfg.train)
    local = local_slice(rows, *handle.data_block())
    microbatches = MicrobatchBuilder.for_run(cfg, handle, pad_id=0).build(local, ROWS // 2)
    initial = policy.logprobs(microbatches)
    policy.sft_forward_backward(microbatches)
    policy.optimizer_step()
    after = _logits(handle, inputs)
    full = handle.full_state_dict()
    export = folder.parent / f"{folder.name}_export_ep{ep}"
    if torch.distributed.get_rank() == 0:
        handle.write_hf(full, tokenizer, export)
    # the folder as a DPO reference (dpo.reference=<folder>) of a moved policy: its experts too (nemo's names, layout)
    handle.reshard()
    with torch.no_grad():
        for p in handle.parameters():
            p.mul_(1.05)
    policy.init_reference(handle.hf_state(str(folder), "dpo.reference"))
    reference, moved = policy.reference_logprobs(microbatches), policy.logprobs(microbatches)
    experts = {(tuple(p.to_local().shape), tuple(str(getattr(d, "value", d)) for d in p.device_mesh.mesh_dim_names))
               for n, p in handle.named_parameters() if n.endswith("experts.gate_and_up_projs")}
    return {"before": before, "after": after, "export": Path(export), "local_experts": experts,
            "reference_error": max(rel_err(r, i) for r, i in zip(reference, initial)),
            "policy_moved": min(rel_err(m, i) for m, i in zip(moved, initial))}


@pytest.mark.parametrize("ep", [1, 2])
def test_pretrained_qwen3_moe_folder_trains_and_exports(folder, ep):
    """The trainer's logits are transformers' on the folder (before the step) and on its export (after it)."""
    per_rank = run_ranks(_load_step_export, 2, folder, ep)
    batch, _ = _batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["attention_mask"].bool()  # padded positions are not compared (no token there)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(per_rank[0]["export"], dtype=torch.float32).eval()
    assert type(exported).__name__ == "Qwen3MoeForCausalLM"
    for path in (folder, per_rank[0]["export"]):  # on disk one tensor per expert: loading fuses and renames them
        assert "model.layers.1.mlp.experts.7.gate_proj.weight" in disk_keys(path), path
    with torch.no_grad():
        ref_before, ref_after = hf(**inputs).logits[real], exported(**inputs).logits[real]
    assert rel_err(ref_after, ref_before) > 1e-3  # the step moved the model: the export is the trained one
    for rank, result in enumerate(per_rank):
        # [E, hidden, 2*moe_inter], the experts split over ep (ep2) or FSDP's dp shards (ep1)
        assert result["local_experts"] == {((4, 32, 32), ("ep",) if ep == 2 else ("dp_shard",))}, result["local_experts"]
        assert rel_err(result["before"][real], ref_before) < TOL, (rank, rel_err(result["before"][real], ref_before))
        assert rel_err(result["after"][real], ref_after) < TOL, (rank, rel_err(result["after"][real], ref_after))
        assert result["reference_error"] < TOL < result["policy_moved"], result
