"""MIMO SFT through the real CLI: the embedded default (shrunk), resume under another layout, an HF-style
local image dataset, and MIMO config errors (one line, exit 2, no rank started)."""

from __future__ import annotations

import json

import datasets
import torch
import pytest

from automodel_mimo.data.synthetic_images import draw_shape
from automodel_mimo.models.tokenizer import IMAGE
from tests.unit.cli_runner import metrics, run_cli

CONFIG = ("--config", "configs/mimo_sft_tiny.yaml")
# The embedded default, a few steps of it: same model and layout (vision dp2 + language tp2), less data.
SHORT = ["data.num_train=64", "data.num_eval=6", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.warmup_steps=0", "eval.every_steps=2", "eval.max_new_tokens=3", "eval.batch_size=4",
         "logging.progress=false", "logging.tensorboard=false"]
TRAIN_KEYS = {"step", "loss", "grad_norm", "lr", "tokens", "loss_tokens", "tokens_per_s", "elapsed_s", "skipped"}


def test_mimo_default_runs_checkpoints_exports_and_resumes_under_another_layout(tmp_path):
    r = run_cli("sft", *CONFIG, *SHORT, f"output_dir={tmp_path}", "train.max_steps=2", "checkpoint.every_steps=2",
                timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vision: dp=2 tp=1 cp=1 pp=1, language: dp=1 tp=2 cp=1 pp=1" in r.stdout
    rows = metrics(tmp_path)
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [1, 2] and all(TRAIN_KEYS <= set(row) for row in train)
    assert all(row["loss"] > 0 and row["grad_norm"] > 0 and row["tokens_per_s"] > 0 for row in train)
    (ev,) = [row for row in rows if "eval/accuracy" in row]
    assert ev["step"] == 2 and ev["eval/num_samples"] == 6 and 0 <= ev["eval/accuracy"] <= 1
    assert (tmp_path / "checkpoints" / "step_2" / "trainer_state.pt").is_file()
    assert not list((tmp_path / "checkpoints").glob("*.partial"))

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")  # the whole model (test_mimo_llava.py)
    image_id = AutoTokenizer.from_pretrained(tmp_path / "hf").convert_tokens_to_ids(IMAGE)
    assert llava.config.image_token_id == image_id and llava.config.vision_config.image_size == 32
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "language")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf" / "language").convert_tokens_to_ids(IMAGE) == image_id
    assert llm.config.hidden_size == 128

    # resume at step 2 under the mirrored layout (vision tp2 + language dp2: a fan-out bridge); eval at the last step
    r = run_cli("sft", *CONFIG, *SHORT, f"output_dir={tmp_path}", "train.max_steps=3", "checkpoint.resume=true",
                "checkpoint.export_hf=false", "mimo.layout.vision={tp: 2}", "mimo.layout.language={dp: 2}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vision: dp=1 tp=2 cp=1 pp=1, language: dp=2 tp=1 cp=1 pp=1" in r.stdout and "start step 2" in r.stdout
    rows = metrics(tmp_path)
    resumed = [row for row in rows if "loss" in row]
    assert [row["step"] for row in resumed] == [1, 2, 3] and resumed[:2] == train
    assert [(row["step"], row["eval/num_samples"]) for row in rows if "eval/accuracy" in row] == [(2, 6), (3, 6)]


def test_mimo_noncolocated_run_evaluates_exports_and_resumes_colocated(tmp_path):
    """The embedded default with a non-colocated layout (vision dp1 on rank 0, language on rank 1: rows and
    gradients point-to-point): 2 steps with a greedy eval (rank 0, an encoder rank, logs the LLM's metrics), a
    checkpoint and the HF export; resumed colocated (vision dp2 + language tp2) for a third step."""
    noncolocated = ["mimo.layout.vision={dp: 1}", "mimo.layout.language={offset: 1}"]
    r = run_cli("sft", *CONFIG, *SHORT, f"output_dir={tmp_path}", "train.max_steps=2", "checkpoint.every_steps=2",
                *noncolocated, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vision: dp=1 tp=1 cp=1 pp=1, language: dp=1 tp=1 cp=1 pp=1 offset=1" in r.stdout
    rows = metrics(tmp_path)
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [1, 2] and all(TRAIN_KEYS <= set(row) for row in train)
    assert all(row["loss"] > 0 and row["grad_norm"] > 0 and row["loss_tokens"] > 0 for row in train)
    assert train[1]["loss"] < train[0]["loss"], train
    (ev,) = [row for row in rows if "eval/accuracy" in row]
    assert ev["step"] == 2 and ev["eval/num_samples"] == 6 and 0 <= ev["eval/accuracy"] <= 1

    from transformers import LlavaForConditionalGeneration

    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").config.vision_config.image_size == 32
    r = run_cli("sft", *CONFIG, *SHORT, f"output_dir={tmp_path}", "train.max_steps=3", "checkpoint.resume=true",
                "checkpoint.export_hf=false", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "start step 2" in r.stdout
    resumed = [row for row in metrics(tmp_path) if "loss" in row]
    assert [row["step"] for row in resumed] == [1, 2, 3] and resumed[:2] == train


def test_mimo_llm_pp2_run_exports_and_resumes_under_pp1(tmp_path):
    """The LLM pipelined (vision dp2 + language pp2 on 2 ranks): 2 steps with a greedy eval through the stages, a
    checkpoint and the HF export (unsplit names); resumed under pp1 (language tp2) for a third step."""
    import re

    r = run_cli("sft", *CONFIG, *SHORT, f"output_dir={tmp_path}", "train.max_steps=2", "checkpoint.every_steps=2",
                "mimo.layout.language={pp: 2}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "language: dp=1 tp=1 cp=1 pp=2" in r.stdout, r.stdout
    train = [row for row in metrics(tmp_path) if "loss" in row]
    assert [row["step"] for row in train] == [1, 2] and all(row["loss"] > 0 and row["grad_norm"] > 0 for row in train)
    assert [row["step"] for row in metrics(tmp_path) if "eval/accuracy" in row] == [2]

    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "language")  # both stages' layers, unsplit names
    assert llm.config.num_hidden_layers == 2 and float(llm.model.layers[1].mlp.down_proj.weight.abs().sum()) > 0

    r2 = run_cli("sft", *CONFIG, *SHORT, f"output_dir={tmp_path}", "train.max_steps=3", "checkpoint.resume=true",
                 "checkpoint.export_hf=false", timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "language: dp=1 tp=2 cp=1 pp=1" in r2.stdout and "start step 2" in r2.stdout
    resumed = [row for row in metrics(tmp_path) if "loss" in row]
    assert [row["step"] for row in resumed] == [1, 2, 3] and resumed[:2] == train
    counts = [re.search(r"([\d,]+) parameters", out).group(1) for out in (r.stdout, r2.stdout)]
    assert counts[0] == counts[1], counts  # every module counted once under pp2 as under pp1


def test_mimo_on_a_local_parquet_image_dataset_packed(tmp_path):
    """An HF-style parquet file with an image column and a test split, read through `datasets`, trained packed
    (THD rows holding several image+text sequences; the packed oracle is in test_mimo.py)."""
    for split, n in (("train", 16), ("test", 4)):
        ds = datasets.Dataset.from_dict(
            {"picture": [draw_shape("red" if i % 2 else "blue", "square", 14, i % 8, 3, 32, seed=i) for i in range(n)],
             "question": [f"{IMAGE}Which colour?"] * n, "answer": ["red" if i % 2 else "blue" for i in range(n)]},
            features=datasets.Features({"picture": datasets.Image(), "question": datasets.Value("string"),
                                        "answer": datasets.Value("string")}))
        ds.to_parquet(tmp_path / f"{split}.parquet")
    out = tmp_path / "run"
    r = run_cli("sft", *CONFIG, *SHORT, f"output_dir={out}", "train.max_steps=2", f"data.dataset={tmp_path}",
                "data.image_key=picture", "data.prompt_key=question", "data.response_key=answer",
                "data.eval_split=test", "checkpoint.export_hf=false", "data.packing=true", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16 train / 4 eval rows" in r.stdout
    rows = metrics(out)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert [row["eval/num_samples"] for row in rows if "eval/accuracy" in row] == [4]


@pytest.mark.parametrize("overrides,expected", [
    (["mimo.layout.language={tq: 2}"], "mimo.layout.language: unknown dims ['tq']; use dp, tp, cp, pp"),
    (["mimo.layout.vision={dp: 1, pp: 2}"], "mimo.layout.vision.pp=2: encoders are not pipelined"),
    (["mimo.layout.language={pp: 2}", "model.config.num_hidden_layers=3"],
     "the model's 3 layers do not divide over 2 pipeline stages (mimo.layout.language.pp=2"),
    (["mimo.layout.language={pp: 2}", "parallel.pp_schedule=interleaved1f1b"],
     "the model's 2 layers do not divide over 4 pipeline stages (mimo.layout.language.pp=2"),
    (["mimo.layout.vision={dp: 1}"], "mimo.layout: module rank ranges overlap (vision on ranks 0..0 (offset=0, "
                                     "dp*tp*cp*pp=1), language on ranks 0..1"),
    (["mimo.layout.vision={dp: 1}", "mimo.layout.language={offset: 2}"],
     "mimo.layout: module rank ranges do not cover ranks 0..1 exactly"),
    (["model.tokenizer=__TOKENIZER__"], "mimo.placeholder_token='<|image|>' is not a token of the tokenizer"),
    (["mimo.tokens_per_image=4"], "mimo.tokens_per_image=4, but the SigLIP encoder yields"),
    (["mimo.encoder.model_type=no_such_model"], "mimo.encoder: cannot load the encoder config"),
    (["data.image_size=48"], "data.image_size=48, but the encoder takes 32x32 images"),
])
def test_mimo_config_errors_are_one_line(tmp_path, overrides, expected):
    override = " ".join(overrides)
    if "__TOKENIZER__" in override:  # a local tokenizer without the image placeholder
        from automodel_mimo.models.tokenizer import build_default_tokenizer

        tok = build_default_tokenizer()
        vocab = tok.backend_tokenizer.to_str()
        (tmp_path / "tok").mkdir()
        tok.save_pretrained(tmp_path / "tok")
        data = json.loads(vocab)
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != IMAGE]
        (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
        config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
        config.pop("extra_special_tokens", None)
        config["additional_special_tokens"] = [t for t in config.get("additional_special_tokens") or [] if t != IMAGE]
        (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
        overrides = [o.replace("__TOKENIZER__", str(tmp_path / "tok")) for o in overrides]
    r = run_cli("sft", *CONFIG, f"output_dir={tmp_path / 'out'}", *overrides, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()  # stopped before any rank started


def test_schedule_resumes_onto_another_param_group_count():
    """Param groups are per mesh, so a checkpoint from another layout can carry another group count."""
    import torch

    from automodel_mimo.config import TrainConfig
    from automodel_mimo.optim import PartOptimizers, lr_factor

    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, min_lr=0.1, weight_decay=0.01)
    saved = PartOptimizers([torch.nn.Linear(3, 3, bias=False)], cfg)  # one group
    for _ in range(4):
        saved.step()
    resumed = PartOptimizers([torch.nn.Linear(3, 3)], cfg)  # two groups (bias without decay)
    resumed.load_scheduler_state(saved.scheduler_state())
    assert [g["lr"] for g in resumed.optimizers[0].param_groups] == [lr_factor(4, cfg)] * 2
    saved.step()
    resumed.step()
    assert resumed.lr == saved.lr == lr_factor(5, cfg)


# --- greedy generation through the parallel MIMO model equals a single-process decode ------------------

GEN_COUNTS, GEN_TOKENS = [1, 0, 2, 1], 5


def _generation_prompts() -> tuple[list[list[int]], torch.Tensor]:
    from tests.unit.mimo_oracle import IMAGE as SIZE
    from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, PLACEHOLDER, (2 + i,), generator=g).tolist() + [PLACEHOLDER] * (k * TOKENS_PER_IMAGE)
               + torch.randint(1, PLACEHOLDER, (2,), generator=g).tolist() for i, k in enumerate(GEN_COUNTS)]
    return prompts, torch.randn(sum(GEN_COUNTS), 3, SIZE, SIZE, generator=g)


@torch.no_grad()
def _reference_generation() -> list[list[int]]:
    """One prompt at a time, one process: encoder -> projector -> splice -> LLM, greedy, placeholder banned."""
    from tests.unit.mimo_oracle import PLACEHOLDER, build_modules

    encoders, llm = build_modules()
    prompts, pixels = _generation_prompts()
    answers, first = [], 0
    for prompt, k in zip(prompts, GEN_COUNTS):
        rows = encoders["vision"](pixels[first:first + k]).reshape(-1, llm.config.hidden_size) if k else None
        first += k
        ids = torch.tensor([prompt])
        out = []
        for _ in range(GEN_TOKENS):
            embeds = llm.get_input_embeddings()(ids)
            if rows is not None:
                embeds = embeds.masked_scatter((ids == PLACEHOLDER)[..., None], rows)
            logits = llm(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            logits[PLACEHOLDER] = -torch.inf
            out.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
        answers.append(out)
    return answers


def _parallel_generation(layout: dict) -> dict:
    from automodel_mimo.config import TrainConfig
    from automodel_mimo.mimo.handle import MimoHandle
    from policies.policy import Policy
    from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, build_modules

    encoders, llm = build_modules(packed=layout["language"].get("cp", 1) > 1)
    model = MimoHandle(encoders, llm, layout, torch.device("cpu"), PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=4)
    prompts, pixels = _generation_prompts()
    policy = Policy(model, TrainConfig())
    images = {"pixel_values": pixels, "image_counts": torch.tensor(GEN_COUNTS)}
    rows, answers = policy.greedy_generate(prompts, GEN_TOKENS, set(), 0, images, banned=PLACEHOLDER, rows=4)
    counted = int(policy.sum_over_data_ranks(torch.tensor(float(len(rows)))))  # how eval counts rows
    model.destroy()
    return {"answers": dict(zip(rows, answers)), "counted": counted}


def _three_layouts() -> list[dict]:
    return [_parallel_generation({"vision": {"dp": 2}, "language": {"tp": 2}}),
            _parallel_generation({"vision": {"tp": 2}, "language": {"dp": 2}}),
            _parallel_generation({"vision": {"dp": 2}, "language": {"cp": 2}})]


def test_greedy_generation_matches_single_process_under_fan_in_fan_out_and_llm_cp():
    """Prompts of different lengths (each row's next token is read at its own length): tp and cp ranks all
    return every row, dp ranks their slot's rows; all equal the one-prompt-at-a-time decode."""
    from tests.unit.multirank import run_ranks

    reference = _reference_generation()
    per_rank = run_ranks(_three_layouts, 2)
    for layout in range(3):  # eval counts every row once: rows summed over the LLM's dp ranks, on every rank
        assert [rank[layout]["counted"] for rank in per_rank] == [4, 4], (layout, per_rank)
    fan_in, fan_out, cp = ([r["answers"] for r in results] for results in zip(*per_rank))
    assert [fan_in[0][r] for r in range(4)] == [fan_in[1][r] for r in range(4)] == reference  # tp: both ranks, all rows
    assert {**fan_out[0], **fan_out[1]} == dict(enumerate(reference)) and len(fan_out[0]) == 2  # dp: one slot each
    assert [cp[0][r] for r in range(4)] == [cp[1][r] for r in range(4)] == reference  # cp: both ranks, all rows
