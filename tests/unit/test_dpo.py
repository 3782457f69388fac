"""DPO end to end: preference data (synthetic, local jsonl in text and chat form), pair-aware config checks
(packing accepted), and a short `automodel-mimo dpo` run under dp2 that writes the metric rows, repeated packed
under cp2 with the same steps."""

import json

import pytest

from automodel_mimo.config import RunConfig, load_config
from automodel_mimo.data.preference import load_preference_dataset, pair_rows, tokenize_pairs
from automodel_mimo.models.tokenizer import build_default_tokenizer
from tests.unit.cli_runner import TINY, metrics, run_cli


def _cfg(dataset: str, **data) -> RunConfig:
    cfg = RunConfig(algo="dpo")
    cfg.data.dataset = dataset
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_synthetic_pairs_are_right_vs_one_wrong_digit_and_splits_disjoint():
    ds = load_preference_dataset(_cfg("synthetic:addition", num_train=300, num_eval=50))
    prompts = {}
    for split in ("train", "eval"):
        prompts[split] = set()
        for row in ds[split]:
            prompt, chosen = row["chosen"][0]["content"], row["chosen"][1]["content"]
            assert row["rejected"][0]["content"] == prompt
            rejected = row["rejected"][1]["content"]
            a, b = (int(x) for x in prompt.rstrip("=").split("+"))
            assert chosen == f"{a + b:03d}" and len(rejected) == 3
            assert sum(x != y for x, y in zip(chosen, rejected)) == 1
            prompts[split].add(prompt)
    assert len(prompts["train"]) == 300 and len(prompts["eval"]) == 50
    assert not prompts["train"] & prompts["eval"]


def test_local_jsonl_text_and_chat_pairs(tmp_path):
    text = tmp_path / "pairs.jsonl"
    text.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]))
    chat = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "hi"}]
    pair = {"chosen": conv + [{"role": "assistant", "content": "hello"}],
            "rejected": conv + [{"role": "assistant", "content": "go away"}]}
    chat.write_text(json.dumps(pair) + "\n" + json.dumps(pair))
    tok = build_default_tokenizer()
    for path, answers in ((text, ("4", "5")), (chat, ("hello", "go away"))):
        ds = load_preference_dataset(_cfg(str(path), eval_fraction=0.5))
        rows = pair_rows(tokenize_pairs(ds["train"], tok, max_seq_len=64, use_chat_template=True, truncate=False,
                                        split_name="train"))
        assert len(rows) == 2  # one pair: chosen then rejected
        for row, answer in zip(rows, answers):
            target = [t for t in row["labels"] if t != -100]
            assert tok.decode(target, skip_special_tokens=True) == answer
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"prompt": "x", "good": "y", "rejected": "z"})] * 2))
    with pytest.raises(Exception, match="dpo.chosen_key=chosen is not a column"):
        load_preference_dataset(_cfg(str(bad), eval_fraction=0.5))


@pytest.mark.parametrize("override,expected", [
    ("train.micro_batch_size=1 train.global_batch_size=8", "train.micro_batch_size=1 counts sequences and DPO needs whole"),
    ("parallel.pp=2 train.micro_batch_size=4 parallel.pp_microbatch_size=1",
     "parallel.pp_microbatch_size=1: a pipeline microbatch must hold whole (chosen, rejected) pairs"),
    ("data.packing=true data.max_seq_len=64 data.packed_sequence_size=96",
     "data.packed_sequence_size=96 cannot hold a (chosen, rejected) pair of data.max_seq_len=64 tokens each"),
    ("dpo.beta=0", "dpo.beta=0.0: must be > 0"),
    ("dpo.reference=/nonexistent/model", "dpo.reference=/nonexistent/model: use 'initial' or the path"),
])
def test_dpo_config_errors(tmp_path, override, expected):
    r = run_cli("dpo", *TINY, f"output_dir={tmp_path}", *override.split(), timeout=60)
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_packing_is_accepted_and_micro_batches_count_packed_rows():
    """With data.packing, pairs are packed whole into rows: an odd number of rows per (pipeline) micro batch is fine."""
    cfg = load_config("dpo", None, ["data.packing=true", "data.max_seq_len=64", "data.packed_sequence_size=128",
                                    "launch.nproc=2", "parallel.pp=2", "train.micro_batch_size=3",
                                    "parallel.pp_microbatch_size=1", "train.global_batch_size=6"])
    assert cfg.data.packing and cfg.train.micro_batch_size == 3


SHORT_RUN = [*TINY, "launch.nproc=2", "train.max_steps=3", "eval.every_steps=3", "data.num_eval=6", "dpo.warmup_sft_steps=2",
             "checkpoint.export_hf=false"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_dp2")
    r = run_cli("dpo", *SHORT_RUN, f"output_dir={out}", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_short_dpo_run_writes_metric_rows(short_run):
    rows = metrics(short_run)
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [1, 2, 3]
    for row in train:
        for key in ("loss", "grad_norm", "reward_margin", "preference_accuracy", "dpo_loss", "lr"):
            assert isinstance(row[key], float), key
        assert row["pairs"] == 4  # global batch of 8 sequences
        assert row["tokens"] > 8 and row["tokens_per_s"] > 0  # the progress bar's tok_s
        assert 0 <= row["preference_accuracy"] <= 1
    # the reference is the model after the warm-up, so the first DPO forward sees policy == reference
    assert abs(train[0]["chosen_reward"]) < 1e-4 and abs(train[0]["reward_margin"]) < 1e-4
    assert train[-1]["reward_margin"] != 0
    evals = [row for row in rows if "eval/preference_accuracy" in row]
    assert len(evals) == 1 and evals[0]["step"] == 3 and evals[0]["eval/num_pairs"] == 6
    assert 0 <= evals[0]["eval/preference_accuracy"] <= 1


def test_packed_cp2_run_matches_the_padded_dp2_run(short_run, tmp_path):
    """data.packing (pairs packed whole into rows of 256 tokens, one row per micro batch) under cp2: the same
    steps as the padded dp2 run (the warm-up and eval stay padded; they differ by rounding only)."""
    r = run_cli("dpo", *SHORT_RUN, f"output_dir={tmp_path}", "data.packing=true", "data.packed_sequence_size=256",
                "train.micro_batch_size=1", "parallel.dp=1", "parallel.cp=2", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = metrics(tmp_path), metrics(short_run)
    assert [row["step"] for row in got] == [row["step"] for row in ref] == [1, 2, 3, 3]
    for a, b in zip(got, ref):
        for key in ("loss", "sft_loss", "grad_norm", "eval/loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        for key in ("pairs", "tokens", "preference_accuracy", "eval/preference_accuracy", "eval/num_pairs"):
            if key in b:
                assert a[key] == b[key], (a["step"], key)
        for key in ("reward_margin", "chosen_reward", "eval/reward_margin"):  # differences of nearby sums
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def _reference_folder(path, **sizes):
    """A tiny Llama folder written by transformers (random weights), the TINY run's shapes unless `sizes` say."""
    from transformers import AutoModelForCausalLM

    from automodel_mimo.config import ModelConfig
    from automodel_mimo.models.build import build_hf_config

    config = {**dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False), **sizes}
    hf_config = build_hf_config(ModelConfig(config=config), build_default_tokenizer())
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(path)
    return path


def test_reference_from_an_hf_directory(tmp_path):
    """dpo.reference=<dir>: another model's weights are the reference (rewards are non-zero at step 1)."""
    _reference_folder(tmp_path / "ref")
    out = tmp_path / "run"
    r = run_cli("dpo", *TINY, f"output_dir={out}", f"dpo.reference={tmp_path / 'ref'}", "dpo.warmup_sft_steps=0",
                "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",  # the reference's shape
                "train.max_steps=1", "checkpoint.export_hf=false", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    first = [row for row in metrics(out) if "loss" in row][0]
    assert abs(first["chosen_reward"]) > 1e-2


def test_a_reference_of_another_shape_is_one_line_before_any_rank_starts(tmp_path):
    """dpo.reference=<dir> whose model has other parameter shapes (hidden size, layers, vocabulary): one line naming
    dpo.reference and the fields, exit 2, no output written; with the run's shapes the same check passes."""
    from automodel_mimo.cli import _preflight

    heads = ["model.config.num_attention_heads=4", "model.config.num_key_value_heads=2"]  # the folder's
    ref = _reference_folder(tmp_path / "ref", num_hidden_layers=3, vocab_size=1024)
    r = run_cli("dpo", *TINY, *heads, f"output_dir={tmp_path / 'out'}", f"dpo.reference={ref}", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: dpo.reference={ref}: num_hidden_layers 3 != model's 2; vocab_size 1024 != "
                               "model's "), r.stderr
    assert not (tmp_path / "out").exists()
    wide = _reference_folder(tmp_path / "wide", hidden_size=64)
    r = run_cli("dpo", *TINY, *heads, f"output_dir={tmp_path / 'out'}", f"dpo.reference={wide}", timeout=120)
    assert r.returncode == 2 and "hidden_size 64 != model's 32" in r.stderr, r.stderr
    same = _reference_folder(tmp_path / "same")
    _preflight(load_config("dpo", None, [*TINY, *heads, f"dpo.reference={same}"]))  # no error
