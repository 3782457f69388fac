"""MIMO GRPO: the GRPO step (old / reference logprobs through the encoder, clipped PG with the generator's
logprobs, with and without GSPO, k3 KL) of a MIMO model under fan-in, fan-out, equal dp, LLM cp2 and packed rows
equals the single-process step (loss, metrics, every encoder / projector / LLM gradient, post-step weights with
SGD); the module-aware refit from vision dp4 + LLM dp2 x tp2 gives the hf generator (LLaVA) bit-identical
weights, after which its logprobs on image prompts equal the trainer's; a refit that would miss or mis-shape a
module's parameter is refused on every rank before anything is gathered or sent."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from automodel_mimo.algorithms.grpo import grpo_forward_backward
from automodel_mimo.data.batching import local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.losses import IGNORE_INDEX, PGLossConfig, clipped_pg_loss
from automodel_mimo.mimo.handle import MimoHandle, build_mimo_grids
from policies.policy import Policy
from tests.unit.cli_runner import metrics, run_cli
from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, build_modules, mimo_collate, mimo_rows
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, assert_tensors_close, full_grads, full_params, train_config

CPU = torch.device("cpu")
ROWS = 8
TEMPERATURE = 0.7
LOSSES = {
    "grpo": PGLossConfig(eps_low=0.2, eps_high=0.2, kl_beta=0.1, kl_type="k3", truncated_is_cap=1.02),
    "gspo": PGLossConfig(eps_low=0.2, eps_high=0.2, gspo=True, sequence_level=True, kl_beta=0.1, kl_type="k3"),
}
# (name, layout, micro_batch_size, packed): every layout on 2 ranks
LAYOUTS = [
    ("fan-in", {"vision": {"dp": 2}, "language": {"tp": 2}}, 4, False),
    ("fan-out", {"vision": {"tp": 2}, "language": {"dp": 2}}, 4, False),
    ("equal", {"vision": {"dp": 2}, "language": {"dp": 2}}, 2, False),
    ("cp2", {"vision": {"dp": 2}, "language": {"cp": 2}}, 2, False),
    ("packed-fan-in", {"vision": {"dp": 2}, "language": {"tp": 2}}, 1, True),
]
PACKED_SIZE = 48
METRICS = ("kl", "gen_kl_error", "pg_loss", "entropy")


def moved_policy(model, micro: int) -> Policy:
    """A Policy whose reference is the initial weights, then the weights x1.05: the KL and ratio terms are live."""
    policy = Policy(model, train_config("sgd", 0.0, ROWS, micro))
    policy.init_reference()
    model.reshard()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    return policy


def rollout_rows(seed: int = 3) -> list[dict]:
    """MIMO rows (images, placeholders, a response) as grpo.sample_rows makes them: the generator's logprobs
    on the response tokens, an advantage per row (rows 1 and 3 have no response token)."""
    g = torch.Generator().manual_seed(4)
    out = []
    for r, advantage in zip(mimo_rows(seed), torch.linspace(-1.5, 2.0, ROWS).tolist()):
        noise = -4.2 + 0.3 * torch.randn(len(r["input_ids"]), generator=g)
        gen = torch.where(torch.tensor(r["labels"]) != IGNORE_INDEX, noise, 0.0)
        out.append({**r, "gen_logprobs": gen.tolist(), "advantages": advantage})
    return out


# ---------------------------------------------------------------- single process, written without the MIMO code


def _logprobs(vision, llm, batch: dict, temperature: float) -> torch.Tensor:
    hidden = vision.encoder(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1]
    feats = vision.projector(hidden)
    embeds = llm.get_input_embeddings()(batch["input_ids"])
    embeds = embeds.masked_scatter((batch["input_ids"] == PLACEHOLDER)[..., None], feats.reshape(-1, feats.shape[-1]))
    logits = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits.float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    return lp * batch["loss_mask"]


def rollout_batch(rows: list[dict]) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's whole batch of rollout rows: (batch, loss mask, generator logprobs [B, T], advantages [B])."""
    batch = mimo_collate(rows)
    mask = batch["loss_mask"]
    gen = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        gen[i, :len(r["gen_logprobs"])] = torch.tensor(r["gen_logprobs"])
    return batch, mask, gen, torch.tensor([r["advantages"] for r in rows])


def reference_grpo_steps(rows: list[dict]) -> dict:
    """Reference = the initial weights; the policy = those x 1.05; one clipped-PG step with SGD per loss."""
    batch, mask, gen, advantages = rollout_batch(rows)
    lr = train_config("sgd", 0.0, ROWS, ROWS).lr
    out = {}
    for name, cfg in LOSSES.items():
        encoders, llm = build_modules()
        vision = encoders["vision"]
        named = [(f"vision.{n}", p) for n, p in vision.named_parameters()] + [(f"language.{n}", p) for n, p in llm.named_parameters()]
        with torch.no_grad():
            ref_lp = _logprobs(vision, llm, batch, TEMPERATURE)
            for _, p in named:
                p.mul_(1.05)
        lp = _logprobs(vision, llm, batch, TEMPERATURE)
        loss, metrics = clipped_pg_loss(lp, lp.detach(), advantages, mask, cfg, global_valid_tokens=mask.sum(),
                                        global_valid_seqs=(mask.sum(-1) > 0).sum(), ref_logprobs=ref_lp, gen_logprobs=gen)
        metrics["entropy"] = -(lp.detach() * mask).sum() / mask.sum()
        loss.backward()
        grads = full_grads(named)
        with torch.no_grad():
            for _, p in named:
                if p.grad is not None:
                    p -= lr * p.grad
        out[name] = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}, "grads": grads,
                     "params": full_params(named)}
    return out


# ---------------------------------------------------------------- the library's step on 2 ranks


def _layout_steps(rows: list[dict]) -> dict:
    results = {}
    for name, layout, micro, packed in LAYOUTS:
        grids = build_mimo_grids(layout, ["vision"], CPU, global_batch_size=ROWS)
        for loss_name, cfg in LOSSES.items():
            encoders, llm = build_modules(packed=packed or layout["language"].get("cp", 1) > 1)
            model = MimoHandle(encoders, llm, layout, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=ROWS,
                               grids=grids)
            policy = moved_policy(model, micro)
            builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                                        packed_size=PACKED_SIZE if packed else None, rows_multiple=model.rows_multiple())
            microbatches = builder.build(local_slice(rows, *model.data_block()), micro)
            metrics = grpo_forward_backward(policy, microbatches, cfg, TEMPERATURE)
            grads = full_grads(model.named_parameters())
            metrics.update(policy.optimizer_step())
            params = full_params(model.named_parameters())
            held = [int(n) for mb in microbatches for n in (mb["seq_index"][:, :, 0] >= 0).sum(1)] if packed else []
            results[name, loss_name] = {**{k: v for k, v in metrics.items() if not k.startswith("timing/")},
                                        "sequences_per_row": held,
                                        **({"grads": grads, "params": params} if dist.get_rank() == 0 else {})}
            model.destroy()
    return results


@pytest.fixture(scope="module")
def grpo_reference():
    rows = rollout_rows()
    return rows, reference_grpo_steps(rows)


def _close(got: float, ref: float) -> bool:
    """Means of signed per-token terms (k3 kl, pg_loss) nearly cancel: relative to 0.1 when smaller."""
    return abs(got - ref) <= TOL * max(abs(ref), 0.1)


def test_mimo_grpo_step_matches_single_process(grpo_reference):
    rows, ref = grpo_reference
    per_rank = run_ranks(_layout_steps, 2, rows)
    for name, _, _, packed in LAYOUTS:
        for loss_name in LOSSES:
            r = ref[loss_name]
            what = f"{name} {loss_name}"
            for result in per_rank:
                got = result[name, loss_name]
                assert _close(got["loss"], r["loss"]), (what, got["loss"], r["loss"])
                for key in METRICS:
                    assert _close(got[key], r[key]), (what, key, got[key], r[key])
                assert abs(got["ratio_min"] - 1) < 1e-6 and abs(got["ratio_max"] - 1) < 1e-6, what  # on-policy
                assert got["skipped"] == 0, what
            got = per_rank[0][name, loss_name]
            _assert_step_close(got, r, what)
            if packed:
                held = [n for result in per_rank for n in result[name, loss_name]["sequences_per_row"]]
                assert max(held) >= 2, (what, held)  # rows really hold several rollouts (and their images)
    # the options are exercised: the KL term and the PG term both carry weight
    assert abs(ref["grpo"]["kl"]) > 1e-4 and ref["grpo"]["loss"] != ref["gspo"]["loss"]


def _assert_step_close(got: dict, ref: dict, what: str) -> None:
    """rel err < TOL for every gradient and post-step weight, except gradients that are zero in exact math
    (SigLIP's key biases), compared in absolute terms below 1e-6 x the largest gradient norm."""
    floor = 1e-6 * max(float(g.norm()) for g in ref["grads"].values())
    zero = {n for n, g in ref["grads"].items() if float(g.norm()) < floor}
    assert got["grads"].keys() == ref["grads"].keys(), what
    assert all(float(got["grads"][n].norm()) < floor for n in zero), what
    for kind in ("grads", "params"):
        assert_tensors_close({n: g for n, g in got[kind].items() if n not in zero},
                             {n: g for n, g in ref[kind].items() if n not in zero}, f"{what} {kind}")


# ---------------------------------------------------------------- refit: vision dp4 + LLM dp2 x tp2 -> hf (LLaVA)

REFIT_LAYOUT = {"vision": {"dp": 4}, "language": {"dp": 2, "tp": 2}}
BUCKET_BYTES = 16 << 10  # many buckets, some mixing modules


def _refit(folder: str) -> dict:
    from automodel_mimo.checkpoint import export_hf
    from automodel_mimo.generation import Colocated, SamplingParams
    from automodel_mimo.generation.bucketing import StreamIntegrityError
    from automodel_mimo.generation.hf_backend import HFGenerator
    from automodel_mimo.generation.weight_stream import WeightStream, build_stream_plan, local_parameters
    from automodel_mimo.mimo.llava import to_llava
    from automodel_mimo.models.tokenizer import build_default_tokenizer

    encoders, llm = build_modules()
    model = MimoHandle(encoders, llm, REFIT_LAYOUT, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=ROWS)
    export_hf(model, build_default_tokenizer(), folder)  # the generator starts from the initial weights
    with torch.no_grad():  # then the trainer moves: every module's weights differ from the folder's
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i % 7 + 1))
    rank = dist.get_rank()
    generator = Colocated(HFGenerator(folder) if rank == 0 else None)
    plan = build_stream_plan(model, torch.float32, BUCKET_BYTES)
    generator.validate_manifest(plan.manifest)
    params = local_parameters(model)
    out = {"buckets": len(plan.buckets), "names": plan.manifest.names()}

    def refused(broken: dict) -> str:
        before = {n: p.clone() for n, p in generator.backend.model.state_dict().items()} if rank == 0 else None
        try:
            generator.refit(WeightStream(plan, broken))
        except StreamIntegrityError as e:
            if rank == 0:  # nothing reached the generator
                after = generator.backend.model.state_dict()
                assert all(torch.equal(before[n], after[n]) for n in before)
            return str(e)
        return "not refused"

    vision_q = next(n for n in params if n.startswith("model.vision_tower.") and n.endswith("q_proj.weight"))
    projector = "model.multi_modal_projector.linear_2.weight"
    out["missing"] = refused({n: p for n, p in params.items() if not (rank == 1 and n == vision_q)})
    wrong = torch.nn.Parameter(torch.zeros(3, 3))
    out["misshaped"] = refused({n: (wrong if rank == 2 and n == projector else p) for n, p in params.items()})

    generator.refit(WeightStream(plan, params))
    full = model.full_state_dict()
    if rank == 0:
        served = generator.backend.model.state_dict()
        expected = to_llava(full, "vision")
        out["keys_equal"] = set(served) == set(expected)
        out["differ"] = [n for n in expected if not torch.equal(served[n], expected[n])]
        out["modules"] = sorted({n.split(".")[1] if n.startswith("model.") else n.split(".")[0] for n in expected})
    # logprobs: the generator's samples on image prompts, scored by the trainer (every module on its grid)
    prompt_rows = mimo_rows(seed=9, counts=[1, 2, 1, 1])
    prompts = [r["input_ids"][:len(r["input_ids"]) - 3] for r in prompt_rows]  # ends after the placeholders
    images = [r["pixel_values"] for r in prompt_rows]
    samples = generator.generate(prompts, SamplingParams(temperature=0.8, max_new_tokens=5, n=2, seed=5,
                                                         stop_token_ids=(1, PLACEHOLDER)), images)
    from automodel_mimo.algorithms.grpo import sample_rows

    rows = sample_rows(prompts, samples, torch.zeros(len(samples)), images, PLACEHOLDER)
    policy = Policy(model, train_config("sgd", 0.0, ROWS, 2))
    builder = MicrobatchBuilder(0, CPU, rows_multiple=model.rows_multiple())
    microbatches = builder.build(local_slice(rows, *model.data_block()), 2)
    errors = []
    for mb, lp in zip(microbatches, policy.logprobs(microbatches, 0.8)):
        view = model.loss_view(mb)
        errors.append(((lp - view["gen_logprobs"]) * view["loss_mask"]).abs().max())
    out["max_logprob_error"] = float(torch.stack(errors).max())
    out["tokens"] = sum(len(s.token_ids) for s in samples)
    model.destroy()
    return out


def test_refit_from_a_fan_in_layout_gives_the_llava_generator_the_trainers_weights(tmp_path):
    per_rank = run_ranks(_refit, 4, str(tmp_path / "llava"))
    first = per_rank[0]
    assert first["keys_equal"] and first["differ"] == [], first["differ"][:5]
    assert first["modules"] == ["language_model", "lm_head", "multi_modal_projector", "vision_tower"], first["modules"]
    assert first["buckets"] > 4
    assert all(r["names"] == first["names"] for r in per_rank)
    for r in per_rank:  # every rank refuses, before anything is gathered, naming the rank and the parameter
        assert "refit refused before sending anything" in r["missing"] and "rank 1: model.vision_tower." in r["missing"]
        assert "rank 2: model.multi_modal_projector.linear_2.weight: trainer shape [3, 3]" in r["misshaped"], r["misshaped"]
        assert r["max_logprob_error"] < 1e-5, r["max_logprob_error"]
    assert first["tokens"] > 8


# ---------------------------------------------------------------- the CLI: a transformers LLaVA folder, config errors

CONFIG = ("--config", "configs/mimo_grpo_tiny.yaml")
SHORT = ["data.num_train=64", "data.num_eval=6", "grpo.prompts_per_step=4", "grpo.num_generations=4",
         "train.global_batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=0", "eval.every_steps=1",
         "eval.max_new_tokens=4", "eval.batch_size=4", "generation.max_new_tokens=4", "grpo.warmup_sft_steps=0",
         "logging.progress=false", "logging.tensorboard=false", "generation.temperature=0.7"]


def test_a_transformers_llava_folder_trains_one_grpo_step_from_the_cli_on_policy(tmp_path):
    """A LLaVA folder made with transformers' own classes (random init) as model.pretrained: one GRPO step on image
    prompts with the hf generator serving it; the first step is on-policy (ratio 1, the generator's logprobs equal
    the trainer's, which runs the vision tower too)."""
    from tests.unit.test_mimo_llava import _llava_folder

    source = _llava_folder(tmp_path / "llava")
    out = tmp_path / "run"
    r = run_cli("grpo", *CONFIG, *SHORT, f"model.pretrained={source}", f"output_dir={out}", "train.max_steps=1",
                env={"OMP_NUM_THREADS": "1"}, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hf generator colocated on rank 0" in r.stdout
    train = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in train] == [1]
    row = train[0]
    assert abs(row["ratio_min"] - 1) < 1e-6 and abs(row["ratio_max"] - 1) < 1e-6, row
    assert row["gen_kl_error"] < 1e-5 and abs(row["token_mult_prob_error"] - 1) < 1e-5, row
    assert row["kl"] == 0.0 and row["response_len"] > 0
    assert [e["eval/num_samples"] for e in metrics(out) if "eval/accuracy" in e] == [6, 6]
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(out / "hf")  # the export is a LLaVA folder again


@pytest.mark.parametrize("overrides,expected", [
    (["generation.backend=vllm"], "generation.backend=vllm cannot serve image prompts of a MIMO (LLaVA) model"),
], ids=["vllm"])
def test_mimo_grpo_config_errors(overrides, expected):
    from automodel_mimo.config import load_config
    from automodel_mimo.errors import UserInputError

    with pytest.raises(UserInputError) as e:
        load_config("grpo", CONFIG[1], overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_the_default_config_loads():
    from automodel_mimo.config import load_config

    cfg = load_config("grpo", CONFIG[1])
    assert cfg.generation.backend == "hf" and cfg.grpo.warmup_sft_target_accuracy > 0
    assert cfg.train.global_batch_size == cfg.grpo.prompts_per_step * cfg.grpo.num_generations


# ---------------------------------------------------------------- rollout rows and banned tokens (one process)


def test_a_response_ending_with_the_placeholder_keeps_the_rows_placeholders_its_images():
    """The placeholder is a stop token: as the last label it stays, as the row's last input it becomes pad."""
    from automodel_mimo.algorithms.grpo import sample_rows
    from automodel_mimo.generation.sampling import Generation

    prompt = [5, PLACEHOLDER, PLACEHOLDER, 6]
    pixels = torch.randn(1, 3, 16, 16)
    samples = [Generation(0, [7, PLACEHOLDER], [-1.0, -2.0], "stop"), Generation(0, [8, 9], [-0.5, -0.25], "stop")]
    ended, plain = sample_rows([prompt], samples, torch.tensor([1.0, -1.0]), [pixels], PLACEHOLDER, pad_id=0)
    assert ended["input_ids"] == [5, PLACEHOLDER, PLACEHOLDER, 6, 7, 0]
    assert ended["labels"] == [IGNORE_INDEX] * 3 + [7, PLACEHOLDER, IGNORE_INDEX]
    assert ended["gen_logprobs"] == [0.0] * 3 + [-1.0, -2.0, 0.0]
    assert plain["input_ids"] == prompt + [8, 9]  # other responses untouched
    assert ended["pixel_values"] is pixels and plain["pixel_values"] is pixels and ended["advantages"] == 1.0


def test_banned_tokens_are_never_sampled_and_the_logprobs_renormalize(tmp_path):
    from automodel_mimo.generation import SamplingParams
    from automodel_mimo.generation.hf_backend import HFGenerator
    from tests.unit.generation_fixtures import PROMPTS, export, tiny_model

    generator = HFGenerator(export(tiny_model(seed=0), tmp_path / "model"))
    free = generator.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=3))
    banned = tuple({s.token_ids[0] for s in free})  # the greedy first tokens
    for temperature in (0.0, 1.0):
        samples = generator.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=6, n=3, seed=2,
                                                             banned_token_ids=banned))
        assert not {t for s in samples for t in s.token_ids} & set(banned), temperature
    sample = samples[0]  # T=1: the logprob of the first token renormalized without the banned ones
    with torch.no_grad():
        logits = generator.model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].float()
    logits[list(banned)] = float("-inf")
    expected = torch.log_softmax(logits, -1)[sample.token_ids[0]]
    assert abs(sample.logprobs[0] - float(expected)) < 1e-5
