"""Weight streaming into the hf generator: manifest validation, bucket integrity, oversize parameters,
logprob parity after a refit, refits from dp2 (FSDP) and tp2 trainers gathered bucket by bucket, and from a
pp2 trainer both into a colocated engine and relayed by rank 0 over one link to another process's engine."""

from __future__ import annotations

import pytest
import torch

from automodel_mimo.generation import SamplingParams
from automodel_mimo.generation.bucketing import StreamIntegrityError
from automodel_mimo.generation.hf_backend import HFGenerator
from automodel_mimo.generation.manifest import Manifest, ManifestMismatchError
from automodel_mimo.generation.weight_stream import (
    WeightStream,
    build_stream_plan,
    local_parameters,
    verified,
)
from tests.unit.generation_fixtures import PROMPTS, Trainer, export, max_abs_rel, tiny_config, tiny_model, trainer_logprobs
from tests.unit.multirank import run_ranks


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return export(tiny_model(seed=0), tmp_path_factory.mktemp("hf") / "model")


def _assert_weights_equal(generator: HFGenerator, ref: dict[str, torch.Tensor]) -> None:
    got = dict(generator.model.named_parameters())
    assert got.keys() == ref.keys()
    unequal = [n for n in ref if not torch.equal(got[n].detach(), ref[n])]
    assert not unequal, f"generator weights differ from the trainer's: {unequal}"


def test_manifest_mismatch_names_the_parameters(hf_folder):
    generator = HFGenerator(hf_folder)
    plan = build_stream_plan(Trainer(tiny_model(seed=0, intermediate_size=48)), torch.float32)
    entries = list(plan.manifest.entries)
    entries[0] = type(entries[0])("model.embed.weight", entries[0].shape, entries[0].dtype)
    with pytest.raises(ManifestMismatchError) as err:
        generator.validate_manifest(Manifest(tuple(entries)))
    msg = str(err.value)
    assert "model.embed_tokens.weight" in msg and "model.embed.weight" in msg  # missing and extra
    assert "model.layers.1.mlp.down_proj.weight: manifest shape [64, 48] != generator shape [64, 64]" in msg


def test_small_buckets_refit_and_logprob_parity(hf_folder):
    """bucket_bytes below the embedding's size: oversize parameters travel alone in their own bucket."""
    trainer = tiny_model(seed=1)
    plan = build_stream_plan(Trainer(trainer), torch.float32, bucket_bytes=16384)
    embed = trainer.model.embed_tokens.weight
    assert embed.numel() * 4 > 16384
    assert any(len(b.slots) == 1 and b.size > 16384 for b in plan.buckets)
    assert any(len(b.slots) > 1 for b in plan.buckets)
    generator = HFGenerator(hf_folder)
    generator.validate_manifest(plan.manifest)
    generator.update_weights(WeightStream(plan, local_parameters(Trainer(trainer))))
    _assert_weights_equal(generator, {n: p.detach() for n, p in trainer.named_parameters()})
    for temperature in (1.0, 0.7):
        for g in generator.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=8, n=2, seed=5)):
            abs_err, rel_err = max_abs_rel(g.logprobs, trainer_logprobs(trainer, PROMPTS[g.prompt_index], g, temperature))
            assert abs_err < 1e-5 or rel_err < 1e-5, (temperature, g)


def test_corrupted_missing_and_repeated_buckets_are_caught():
    trainer = tiny_model(seed=1)
    plan = build_stream_plan(Trainer(trainer), torch.float32, bucket_bytes=65536)
    params = local_parameters(Trainer(trainer))
    assert len(plan.buckets) >= 3

    def consume(tamper):
        for _ in verified(plan, tamper(WeightStream(plan, params).arrivals(packed=True))):
            pass

    def corrupt(received):
        for bucket, buf in received:
            if bucket.index == 1:
                buf[7] ^= 1  # one flipped bit inside the payload
            yield bucket, buf

    with pytest.raises(StreamIntegrityError, match="bucket 1 failed its checksum"):
        consume(corrupt)
    with pytest.raises(StreamIntegrityError, match=r"coverage: 1 bucket\(s\)"):
        consume(lambda received: ((b, buf) for b, buf in received if b.index != len(plan.buckets) - 1))

    def repeat(received):  # bucket 1's bytes sent again where bucket 2 belongs
        for bucket, buf in received:
            if bucket.index == 1:
                again = buf.clone()
                yield bucket, buf
                yield plan.buckets[2], torch.cat([again, again])[:plan.buckets[2].size]
                return

    with pytest.raises(StreamIntegrityError, match="expected bucket 2, received bucket"):
        consume(repeat)


def test_in_process_stream_hands_over_the_trainer_tensors_and_checks_coverage():
    """A consumer in the trainer's process reads the trainer's own tensors (no flat buffer, no copy):
    same storage, every manifest entry exactly once, in manifest order; a lost bucket is still caught."""
    trainer = tiny_model(seed=1)
    plan = build_stream_plan(Trainer(trainer), torch.float32, bucket_bytes=16384)
    params = local_parameters(Trainer(trainer))
    streamed = list(WeightStream(plan, params))
    assert [n for n, _ in streamed] == [e.name for e in plan.manifest.entries]
    assert all(t.data_ptr() == params[n].data_ptr() for n, t in streamed)
    # bf16 generator weights from an fp32 trainer: converted once (the manifest dtype), shapes intact
    half = build_stream_plan(Trainer(trainer), torch.bfloat16, bucket_bytes=16384)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, params[n].bfloat16()) for n, t in WeightStream(half, params))
    own = WeightStream(plan, params).arrivals(packed=False)
    with pytest.raises(StreamIntegrityError, match=r"coverage: 1 bucket\(s\)"):
        for _ in verified(plan, ((b, data) for b, data in own if b.index != 0)):
            pass


def _refit_from_layout(parallel: dict, hf_folder: str) -> dict:
    from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig
    from automodel_mimo.distributed.mesh import build_parallel_state
    from automodel_mimo.generation.generator import Colocated
    from automodel_mimo.generation.weight_stream import stage_transport
    from automodel_mimo.models.build import build_handle, build_model
    from tests.unit.oracle import full_params, train_config

    parallel = ParallelConfig(**parallel)
    state = build_parallel_state(parallel, torch.device("cpu"))
    cfg = RunConfig(parallel=parallel, train=train_config("sgd", 0.0, 4, 2))
    handle = build_handle(cfg, build_model(ModelConfig(config={"model_type": "llama"}), tiny_config(), seed=7), state, 0)
    sharded = [n for n, p in handle.named_parameters() if isinstance(p, torch.distributed.tensor.DTensor)]
    plan = build_stream_plan(handle, torch.float32, bucket_bytes=65536)
    transport = stage_transport(plan, generator_rank=0)
    generator = Colocated(HFGenerator(hf_folder) if torch.distributed.get_rank() == 0 else None)
    generator.validate_manifest(plan.manifest)
    generator.refit(WeightStream(plan, local_parameters(handle), transport=transport))
    result = {"trainer": full_params(handle.named_parameters()), "buckets": len(plan.buckets),
              "sources": plan.sources, "sharded": len(sharded)}
    if generator.backend is not None:
        result["generator"] = {n: p.detach().clone() for n, p in generator.backend.model.named_parameters()}
    if parallel.pp > 1:
        relayed = _relay(plan, WeightStream(plan, local_parameters(handle), transport=transport), hf_folder)
        if relayed is not None:
            result["relayed"] = relayed
    return result


def _relay(plan, stream: WeightStream, hf_folder: str) -> dict | None:
    """The vLLM / Ray refit shape: the generator end (a thread here, standing in for the engine's worker
    process) joins one standalone link with rank 0, which relays every stage's buckets over it."""
    from concurrent.futures import ThreadPoolExecutor

    from automodel_mimo.generation.transport import generator_link
    from automodel_mimo.generation.weight_stream import broadcast_received
    from tests.unit.multirank import free_port

    if stream.rank != 0:
        stream.participate()
        return None
    engine, port = HFGenerator(hf_folder), free_port()

    def receive():
        link = generator_link("127.0.0.1", port, 1, plan.sources)
        engine.update_weights(verified(plan, broadcast_received(plan, link, torch.device("cpu"))))

    with ThreadPoolExecutor(1) as pool:
        received = pool.submit(receive)
        stream.send(generator_link("127.0.0.1", port, 0, plan.sources))
        received.result()
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


LAYOUTS = {"dp2": dict(dp=2), "tp2": dict(tp=2), "pp2": dict(pp=2, pp_microbatch_size=1)}


def _refit_from_layouts(hf_folder: str) -> dict:
    """All layouts in one 2-rank run (one process start instead of three)."""
    return {name: _refit_from_layout(parallel, hf_folder) for name, parallel in LAYOUTS.items()}


def test_refit_from_dp2_tp2_pp2_trainers(hf_folder):
    """Generator weights equal the trainer's exactly after a refit: FSDP / TP shards gathered bucket by
    bucket; under pp each stage's leader streams the parameters its stage owns."""
    ranks = run_ranks(_refit_from_layouts, 2, hf_folder)
    for name in LAYOUTS:
        per_rank = [r[name] for r in ranks]
        trainer = {n: t for r in per_rank for n, t in r["trainer"].items()}
        generator = per_rank[0]["generator"]
        unequal = [n for n, t in generator.items() if not torch.equal(t, trainer[n])]
        assert generator.keys() == trainer.keys() and not unequal, (name, unequal)
        assert per_rank[0]["buckets"] > 3
        if name == "pp2":
            assert per_rank[0]["sources"] == [0, 1]
            relayed = per_rank[0]["relayed"]
            assert relayed.keys() == trainer.keys() and all(torch.equal(t, trainer[n]) for n, t in relayed.items())
        else:
            assert per_rank[0]["sharded"] > 0, name


def test_refit_bandwidth_bench_runs_on_cpu():
    """bench/refit_bandwidth.py's colocated path on a tiny config (it asserts receiver == sender itself)."""
    from tests.unit.bench_scripts import load_bench

    result = load_bench("refit_bandwidth").in_process("tiny", torch.bfloat16, bucket_bytes=1 << 16, repeat=1)
    assert result["buckets"] > 1 and result["refit_GBps"] > 0 and 0 < result["fraction"]
