"""MIMO DPO data and CLI: image preference pairs (synthetic:shapes pairs, a local parquet file with an image column),
both rows of a pair carrying the prompt's images; `automodel-mimo dpo --config configs/mimo_dpo_tiny.yaml` for a few
steps (SFT warm-up, DPO against the warmed-up reference over every module, held-out preference accuracy), repeated
packed under the mirrored layout (a fan-out) with the same steps; MIMO DPO config errors (one line, exit 2)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from automodel_mimo.config import RunConfig, load_config
from automodel_mimo.data.image_preference import load_image_preferences
from automodel_mimo.data.images import ImageProcessor
from automodel_mimo.data.preference import pair_rows
from automodel_mimo.data.synthetic_images import COLORS, QUADRANTS, draw_shape
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.models.tokenizer import IMAGE, build_default_tokenizer, image_token_id
from tests.unit.cli_runner import metrics, run_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ("--config", "configs/mimo_dpo_tiny.yaml")
SHORT = ["data.num_train=64", "data.num_eval=6", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.max_steps=3", "train.warmup_steps=0", "eval.every_steps=3", "dpo.warmup_sft_steps=2",
         "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false"]


def _cfg(dataset: str, **data) -> RunConfig:
    cfg = load_config("dpo", str(ROOT / "configs/mimo_dpo_tiny.yaml"), [f"data.dataset={dataset}"])
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _answer(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)


def test_synthetic_shapes_pairs_share_the_image_and_differ_in_one_part():
    tok = build_default_tokenizer()
    ds = load_image_preferences(_cfg("synthetic:shapes", num_train=40, num_eval=8, text_only_fraction=0.2), tok)
    assert (len(ds["train"]), len(ds["eval"])) == (40, 8)
    placeholder, processor = image_token_id(tok), ImageProcessor(32)
    rows = pair_rows(ds["train"], processor)
    for pair, chosen, rejected in zip(ds["train"], rows[0::2], rows[1::2]):
        assert chosen["pixel_values"] is rejected["pixel_values"] and len(chosen["pixel_values"]) == pair["num_images"]
        for row in (chosen, rejected):
            assert row["input_ids"].count(placeholder) == 16 * pair["num_images"]
        right, wrong = _answer(tok, chosen), _answer(tok, rejected)
        assert right == pair["reference"] and right.split(" ", 1)[0] in COLORS and right.split(" ", 1)[1] in QUADRANTS
        (c1, q1), (c2, q2) = (a.split(" ", 1) for a in (right, wrong))
        assert (c1 == c2) != (q1 == q2), (right, wrong)  # exactly one of colour and quadrant is wrong
    assert {p["num_images"] for p in ds["train"]} == {0, 1}  # text-only pairs too (data.text_only_fraction)


def test_local_parquet_pairs_with_images(tmp_path):
    """An HF-style file: an image column (data.image_key), a prompt with the marker, chosen / rejected text."""
    n = 6
    ds = datasets.Dataset.from_dict(
        {"picture": [draw_shape("red" if i % 2 else "blue", "square", 14, i, 3, 32, seed=i) for i in range(n)],
         "question": [f"{IMAGE}Which colour?"] * n, "good": ["red" if i % 2 else "blue" for i in range(n)],
         "bad": ["blue" if i % 2 else "red" for i in range(n)]},
        features=datasets.Features({"picture": datasets.Image(), "question": datasets.Value("string"),
                                    "good": datasets.Value("string"), "bad": datasets.Value("string")}))
    path = tmp_path / "pairs.parquet"
    ds.to_parquet(path)
    cfg = _cfg(str(path), image_key="picture", prompt_key="question", eval_fraction=0.5)
    cfg.dpo.chosen_key, cfg.dpo.rejected_key = "good", "bad"
    tok = build_default_tokenizer()
    out = load_image_preferences(cfg, tok)
    assert (len(out["train"]), len(out["eval"])) == (3, 3)
    rows = pair_rows(out["train"], ImageProcessor(32))
    for pair, chosen, rejected in zip(out["train"], rows[0::2], rows[1::2]):
        assert pair["num_images"] == 1 and torch.equal(chosen["pixel_values"], rejected["pixel_values"])
        assert {_answer(tok, chosen), _answer(tok, rejected)} == {"red", "blue"} and _answer(tok, chosen) == pair["reference"]
        # the image's colour is the chosen answer: the pixels are the pair's own image
        red_vs_blue = chosen["pixel_values"][0, 0].amax() > chosen["pixel_values"][0, 2].amax()
        assert red_vs_blue == (_answer(tok, chosen) == "red")
    cfg.data.image_key = "photo"
    with pytest.raises(Exception, match="data.image_key=photo"):
        load_image_preferences(cfg, tok)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mimo_dpo")
    r = run_cli("dpo", *CONFIG, *SHORT, f"output_dir={out}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vision: dp=2 tp=1 cp=1 pp=1, language: dp=1 tp=2 cp=1 pp=1" in r.stdout and "64 train / 6 eval pairs" in r.stdout
    return out


def test_short_mimo_dpo_run(short_run):
    rows = metrics(short_run)
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [1, 2, 3]
    for row in train:
        assert row["pairs"] == 4 and row["grad_norm"] > 0 and row["skipped"] == 0
        assert 0 <= row["preference_accuracy"] <= 1
    # the reference is the warmed-up model (every module swapped): the first DPO forward sees policy == reference
    assert abs(train[0]["chosen_reward"]) < 1e-4 and abs(train[0]["reward_margin"]) < 1e-4
    assert train[-1]["reward_margin"] != 0
    (ev,) = [row for row in rows if "eval/preference_accuracy" in row]
    assert ev["step"] == 3 and ev["eval/num_pairs"] == 6 and 0 <= ev["eval/preference_accuracy"] <= 1


@pytest.mark.slow  # tests/nightly/unit_slow.sh; the oracle (test_mimo_dpo.py) covers packed and fan-out steps in CI
def test_packed_fan_out_run_matches_the_padded_fan_in_run(short_run, tmp_path):
    """The mirrored layout (vision tp2 + language dp2: each LLM dp slot takes one packed row of whole pairs) with
    data.packing logs the padded fan-in run's steps (warm-up and eval stay padded; rounding only)."""
    r = run_cli("dpo", *CONFIG, *SHORT, f"output_dir={tmp_path}", "mimo.layout.vision={tp: 2}",
                "mimo.layout.language={dp: 2}", "data.packing=true", "data.packed_sequence_size=160",
                "train.micro_batch_size=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = metrics(tmp_path), metrics(short_run)
    assert [row["step"] for row in got] == [row["step"] for row in ref] == [1, 2, 3, 3]
    for a, b in zip(got, ref):
        for key in ("loss", "grad_norm", "eval/loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        for key in ("pairs", "preference_accuracy", "eval/preference_accuracy", "eval/num_pairs"):
            if key in b:
                assert a[key] == b[key], (a["step"], key)
        for key in ("reward_margin", "chosen_reward", "eval/reward_margin"):  # differences of nearby sums
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def _assert_same_run(got: list[dict], ref: list[dict]) -> None:
    assert [row["step"] for row in got] == [row["step"] for row in ref] == [1, 2, 3, 3]
    for a, b in zip(got, ref):
        for key in ("loss", "grad_norm", "eval/loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        for key in ("pairs", "skipped", "preference_accuracy", "eval/preference_accuracy", "eval/num_pairs"):
            if key in b:
                assert a[key] == b[key], (a["step"], key)
        for key in ("reward_margin", "chosen_reward", "eval/reward_margin"):  # differences of nearby sums
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


@pytest.mark.slow  # tests/nightly/unit_slow.sh; CI: the DPO layouts oracle (non-colocated) and the SFT non-colocated CLI run
def test_noncolocated_run_matches_the_colocated_run_and_exports(short_run, tmp_path):
    """Non-colocated (vision dp1 on rank 0, language on rank 1: rows, gradients and results point-to-point): the
    warm-up, the reference swap over both ranks' modules, 3 DPO steps and the held-out eval log the colocated
    run's values (rounding only; rank 0, an encoder rank, logs the LLM's metrics), and the HF export loads."""
    r = run_cli("dpo", *CONFIG, *SHORT[:-1], f"output_dir={tmp_path}", "mimo.layout.vision={dp: 1}",
                "mimo.layout.language={offset: 1}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vision: dp=1 tp=1 cp=1 pp=1, language: dp=1 tp=1 cp=1 pp=1 offset=1" in r.stdout, r.stdout[-2000:]
    _assert_same_run(metrics(tmp_path), metrics(short_run))

    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert llava.config.vision_config.image_size == 32
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "language")
    assert torch.equal(llm.lm_head.weight, llava.lm_head.weight)  # both exports hold the trained LLM


@pytest.mark.slow  # tests/nightly/unit_slow.sh; test_mimo_dpo_layouts.py covers the pp2 step in CI
def test_llm_pp2_run_matches_the_colocated_run(short_run, tmp_path):
    """The LLM pipelined (vision dp2 + language pp2, a pipeline microbatch = one pair): warm-up, 3 DPO steps and the
    held-out eval through the stages log the tp2 run's values (rounding only)."""
    r = run_cli("dpo", *CONFIG, *SHORT, f"output_dir={tmp_path}", "mimo.layout.language={pp: 2}",
                "parallel.pp_microbatch_size=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "language: dp=1 tp=1 cp=1 pp=2" in r.stdout, r.stdout[-2000:]
    _assert_same_run(metrics(tmp_path), metrics(short_run))


@pytest.mark.parametrize("overrides,expected", [
    (["mimo.layout.vision={tp: 2}", "mimo.layout.language={dp: 2}", "train.micro_batch_size=2"],
     "train.micro_batch_size=2: each of the language model's 2 dp slots takes 1 of its sequences"),
    (["dpo.reference=configs"], "dpo.reference=configs: cannot load its config"),  # not a LLaVA folder
    (["data.packing=true", "data.packed_sequence_size=100"], "data.packed_sequence_size=100 cannot hold a (chosen, rejected) pair"),
    (["mimo.layout.language={pp: 2}", "parallel.pp_microbatch_size=1"],
     "parallel.pp_microbatch_size=1: a pipeline microbatch of mimo.layout.language.pp must hold whole (chosen, rejected)"),
])
def test_mimo_dpo_config_errors_are_one_line(tmp_path, overrides, expected):
    r = run_cli("dpo", *CONFIG, f"output_dir={tmp_path / 'out'}", *overrides, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_reference_of_another_shape_is_one_line_before_any_rank_starts(tmp_path):
    """dpo.reference=<LLaVA folder> whose modules have other shapes than the run's (its LLM's hidden size, its
    tower's width and depth): one line naming dpo.reference and the fields, exit 2, nothing written; a folder with
    the run's shapes passes the same check."""
    from automodel_mimo.cli import _preflight
    from tests.unit.test_mimo_llava import _llava_folder

    ref = _llava_folder(tmp_path / "ref")  # LLM hidden 64, tower hidden 48 x 3 layers (the default: 128, 64 x 2)
    r = run_cli("dpo", *CONFIG, f"output_dir={tmp_path / 'out'}", f"dpo.reference={ref}", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: dpo.reference={ref}: text_config.hidden_size 64 != model's 128; "), r.stderr
    for field in ("vision_config.hidden_size 48 != model's 64", "vision_config.num_hidden_layers 3 != model's 2"):
        assert field in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    same = _llava_folder(tmp_path / "same", vocab_multiple=1)
    _preflight(load_config("dpo", str(ROOT / "configs/mimo_dpo_tiny.yaml"), [
        f"dpo.reference={same}", "model.config.hidden_size=64", "model.config.intermediate_size=128",
        "mimo.encoder.hidden_size=48", "mimo.encoder.intermediate_size=96", "mimo.encoder.num_hidden_layers=3"]))
