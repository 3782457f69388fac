"""SFT with THD packing and/or context parallelism trains on the same math as padded dp2 batches, also
through pipeline stages."""

import pytest

from tests.unit.cli_runner import TINY, metrics, run_cli, train_losses

RUN = [*TINY, "train.max_steps=3", "launch.nproc=2", "checkpoint.export_hf=false", "data.max_seq_len=32"]
PACKED = ["data.packing=true", "data.packed_sequence_size=64", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    out = tmp_path_factory.mktemp("padded")
    r = run_cli("sft", *RUN, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("layout", [
    [*PACKED, "parallel.dp=2"],
    [*PACKED, "parallel.dp=1", "parallel.pp=2", "parallel.pp_microbatch_size=1", "train.micro_batch_size=2"],
    ["parallel.dp=1", "parallel.cp=2", "eval.every_steps=3"],
    [*PACKED, "parallel.dp=1", "parallel.cp=2"],
], ids=["packed-dp2", "packed-pp2", "cp2", "packed-cp2"])
def test_run_matches_padded_dp2_run(padded, tmp_path, layout):
    r = run_cli("sft", *RUN, *layout, f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = train_losses(tmp_path), train_losses(padded)
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert abs(got[step] - loss) <= 1e-5 * loss, (step, got[step], loss)
    tokens = [[r["tokens"] for r in metrics(out) if "loss" in r] for out in (tmp_path, padded)]
    assert tokens[0] == tokens[1]  # real (non-padding) tokens, counted once whatever the layout


def test_row_shorter_than_max_seq_len_is_rejected(tmp_path):
    r = run_cli("sft", *RUN, "data.packing=true", "data.packed_sequence_size=16", f"output_dir={tmp_path}", timeout=60)
    assert r.returncode == 2 and "data.packed_sequence_size=16 is shorter than data.max_seq_len=32" in r.stderr
