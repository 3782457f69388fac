"""Exact resume after a crash (also a crash in the middle of a save), and the HF export round trip."""

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.unit.cli_runner import TINY, metrics, run_cli, train_losses

RUN = [*TINY, "train.max_steps=4", "checkpoint.every_steps=2", "launch.nproc=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    r = run_cli("sft", *RUN, f"output_dir={out}", "logging.tensorboard=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    return out


def test_resume_after_crashes_matches_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "crashy"
    first = run_cli("sft", *RUN, f"output_dir={out}", env={"AUTOMODEL_MIMO_FAULT": "after_checkpoint:2"})
    assert first.returncode != 0 and "after_checkpoint:2" in first.stderr
    assert "Traceback" not in first.stderr  # rank 1 saw its peer vanish: one line, not a gloo traceback
    assert sorted(train_losses(out)) == [1, 2]

    # Dies between writing step 4's files and publishing them: step 2 must stay the resume point.
    second = run_cli("sft", *RUN, f"output_dir={out}", "checkpoint.resume=true",
                     env={"AUTOMODEL_MIMO_FAULT": "before_checkpoint_rename:4"})
    assert second.returncode != 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_2", "step_4.partial"], ckpts

    third = run_cli("sft", *RUN, f"output_dir={out}", "checkpoint.resume=true")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "start step 2" in third.stdout
    assert f"[sft] done: step 4; loss {metrics(out)[-1]['loss']:.4g}" in third.stdout  # the end-of-run summary
    assert f"outputs in {out}: metrics.jsonl, config.yaml, checkpoints/step_4, hf/" in third.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert train_losses(out) == train_losses(uninterrupted)  # bitwise: same layout, same data, same state
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_corrupted_shard_resumes_from_the_checkpoint_before_it(uninterrupted, tmp_path):
    """4 KiB overwritten inside a published step-4 shard: resume names the damage in one line, falls back to
    step 2 and continues exactly as the uninterrupted run (docs/reliability.md)."""
    out = tmp_path / "corrupt"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    shard = max((out / "checkpoints" / "step_4").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with shard.open("r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    r = run_cli("sft", *RUN, f"output_dir={out}", "checkpoint.resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"note: checkpoint {out}/checkpoints/step_4 is damaged ({shard.name} does not match its checksum); "
            "falling back to the one before it") in r.stderr
    assert "start step 2" in r.stdout
    assert train_losses(out) == {step: loss for step, loss in train_losses(uninterrupted).items() if step > 2}


def test_the_run_records_its_resolved_config(uninterrupted):
    """output_dir/config.yaml is the resolved config (a --config that reruns it); run_info.json says what ran."""
    import json

    from automodel_mimo.config import load_config

    again = load_config("sft", str(uninterrupted / "config.yaml"))
    assert again.to_dict() == load_config("sft", None, [*RUN, f"output_dir={uninterrupted}", "logging.tensorboard=true"]).to_dict()
    info = json.loads((uninterrupted / "run_info.json").read_text())
    assert info["command"][:2] == ["automodel-mimo", "sft"] and info["layout"] == "dp=2 tp=1 cp=1 pp=1"
    assert {"torch", "transformers", "nemo-automodel"} <= set(info["versions"]) and info["start_step"] == 0


def test_hf_export_loads_with_plain_transformers(uninterrupted):
    hf = uninterrupted / "hf"
    exported = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    # The trained weights, straight from the last sharded checkpoint.
    trained = AutoModelForCausalLM.from_config(exported.config)
    state = {"model": trained.state_dict()}
    dcp.load(state, checkpoint_id=str(uninterrupted / "checkpoints" / "step_4"))
    trained.load_state_dict(state["model"])
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = exported(ids).logits, trained(ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(trained.state_dict()["lm_head.weight"], AutoModelForCausalLM.from_config(exported.config).state_dict()["lm_head.weight"])


def test_checkpoint_resumes_under_another_layout(uninterrupted, tmp_path):
    """A dp2 checkpoint resumed on a single rank: DCP reshards, and steps 3-4 match to fp32 rounding."""
    out = tmp_path / "relayout"
    shutil.copytree(uninterrupted / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    shutil.copy(uninterrupted / "config.yaml", out / "config.yaml")
    r = run_cli("sft", *RUN, f"output_dir={out}", "checkpoint.resume=true", "launch.nproc=1")
    assert r.returncode == 0, r.stderr[-3000:]
    # the saved run's config is compared first: its other layout is named, nothing else
    assert (f"note: resuming at step 2 with a config that differs from the saved {out / 'config.yaml'}: "
            "launch.nproc 2 -> 1; logging.tensorboard True -> False; parallel.dp 2 -> 1\n") in r.stdout
    got, ref = train_losses(out), train_losses(uninterrupted)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-5 * ref[step], (step, got[step], ref[step])


def test_pretrained_start_reproduces_the_exported_models_loss(uninterrupted, tmp_path):
    """model.pretrained loads weights, config and tokenizer: step 1's loss is the exported model's own NLL
    on the step-0 global batch, computed here with plain transformers."""
    from automodel_mimo.algorithms.sft import prepare_sft_data, step_microbatches
    from automodel_mimo.config import load_config
    from automodel_mimo.data.microbatches import MicrobatchBuilder
    from automodel_mimo.data.rows import Rows
    from automodel_mimo.models.tokenizer import load_tokenizer

    hf, out = uninterrupted / "hf", tmp_path / "from_hf"
    args = [*TINY, "train.max_steps=1", "launch.nproc=1", f"model.pretrained={hf}", "checkpoint.export_hf=false"]
    r = run_cli("sft", *args, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.config entries are ignored" in r.stderr

    cfg = load_config("sft", None, args)
    tokenizer = load_tokenizer(str(hf))
    one_rank = SimpleNamespace(handle=SimpleNamespace(data_block=lambda: (0, 1)),
                               builder=MicrobatchBuilder(tokenizer.pad_token_id, torch.device("cpu")))
    batch = step_microbatches(cfg, one_rank, Rows(prepare_sft_data(cfg, tokenizer)["train"]), 0)
    model = AutoModelForCausalLM.from_pretrained(hf)
    nll, tokens = 0.0, 0.0
    with torch.no_grad():
        for mb in batch:
            logp = torch.log_softmax(model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, -1)
            picked = logp.gather(-1, mb["labels"].clamp(min=0)[..., None])[..., 0]
            nll -= float((picked * mb["loss_mask"]).sum())
            tokens += float(mb["loss_mask"].sum())
    assert abs(train_losses(out)[1] - nll / tokens) <= 1e-5 * (nll / tokens)


def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    r = run_cli("sft", *TINY, f"model.pretrained={tmp_path / 'nope'}", f"output_dir={tmp_path}", timeout=60)
    assert r.returncode == 2 and "cannot load" in r.stderr and "Traceback" not in r.stderr


PP2 = ["launch.nproc=2", "parallel.pp=2", "parallel.pp_microbatch_size=1"]


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """The same 4-step run as `uninterrupted`, on 2 pipeline stages (dp1 x pp2)."""
    out = tmp_path_factory.mktemp("pp2")
    r = run_cli("sft", *RUN, *PP2, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _resume_from(source, step: int, out, *layout) -> dict[int, float]:
    shutil.copytree(source / "checkpoints" / f"step_{step}", out / "checkpoints" / f"step_{step}")
    r = run_cli("sft", *RUN, *layout, f"output_dir={out}", "checkpoint.resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    return train_losses(out)


def _assert_close_losses(got: dict, ref: dict, steps) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(got[step] - ref[step]) <= 1e-5 * ref[step], (step, got[step], ref[step])


def test_pipeline_run_matches_data_parallel_run(pipelined, uninterrupted):
    _assert_close_losses(train_losses(pipelined), train_losses(uninterrupted), [1, 2, 3, 4])


def test_pp2_checkpoint_resumes_under_pp1_and_back(pipelined, uninterrupted, tmp_path):
    _assert_close_losses(_resume_from(pipelined, 2, tmp_path / "to_pp1", "launch.nproc=1"),
                         train_losses(pipelined), [3, 4])
    _assert_close_losses(_resume_from(uninterrupted, 2, tmp_path / "to_pp2", *PP2),
                         train_losses(uninterrupted), [3, 4])


def test_hf_export_under_pp_has_unsplit_names(pipelined, uninterrupted):
    exported = AutoModelForCausalLM.from_pretrained(pipelined / "hf")
    reference = AutoModelForCausalLM.from_pretrained(uninterrupted / "hf")
    assert exported.state_dict().keys() == reference.state_dict().keys()
    trained = AutoModelForCausalLM.from_config(exported.config)
    state = {"model": trained.state_dict()}
    dcp.load(state, checkpoint_id=str(pipelined / "checkpoints" / "step_4"))
    for name, value in trained.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name


def test_stop_at_step_is_the_start_of_the_full_run(uninterrupted, tmp_path):
    """train.stop_at_step ends early on the full run's LR schedule (a short CI gate, a time-limited job): its
    rows are the full run's first rows, and resuming it finishes the full run bit for bit."""
    out = tmp_path / "stopped"
    r = run_cli("sft", *RUN, f"output_dir={out}", "train.stop_at_step=2")
    assert r.returncode == 0, r.stderr[-3000:]
    full = [row for row in metrics(uninterrupted) if "loss" in row]
    short = [row for row in metrics(out) if "loss" in row]
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[row[k] for k in keys] for row in short] == [[row[k] for k in keys] for row in full[:2]]
    r = run_cli("sft", *RUN, f"output_dir={out}", "checkpoint.resume=true")
    assert r.returncode == 0 and "start step 2" in r.stdout, r.stderr[-3000:]
    assert train_losses(out) == train_losses(uninterrupted)
    r = run_cli("sft", *RUN, f"output_dir={tmp_path / 'bad'}", "train.stop_at_step=5")
    assert r.returncode == 2 and "train.stop_at_step=5: must be between 1 and train.max_steps=4" in r.stderr
