"""Data row errors name the file's own row, not the row of the shuffled train split; and tokenizing before
the eval hold-out keeps the very rows, in the very order, of tokenizing after it."""

from __future__ import annotations

import json

import pytest

from automodel_mimo.algorithms.dpo import prepare_dpo_data
from automodel_mimo.algorithms.sft import prepare_sft_data
from automodel_mimo.config import load_config
from automodel_mimo.data.sources import load_sft_dataset
from automodel_mimo.data.tokenize import tokenize_dataset
from automodel_mimo.errors import UserInputError
from automodel_mimo.models.tokenizer import build_default_tokenizer

BAD_ROW = 23


def _sft_file(path, bad: str | None = None):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(40)]
    if bad == "long":
        rows[BAD_ROW]["response"] = "9" * 100
    elif bad == "not text":
        rows[BAD_ROW]["response"] = ["9"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad,message", [
    ("long", f"row {BAD_ROW} of the train split: data.max_seq_len=32 is too short"),
    ("not text", f"train split: data.response_key: row {BAD_ROW} holds list"),
])
def test_sft_row_errors_name_the_files_row(tmp_path, bad, message):
    cfg = load_config("sft", None, [f"data.dataset={_sft_file(tmp_path / 'd.jsonl', bad)}", "data.eval_fraction=0.25"])
    with pytest.raises(UserInputError, match=message):
        prepare_sft_data(cfg, build_default_tokenizer())


def test_dpo_row_errors_name_the_files_row(tmp_path):
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(40)]
    rows[BAD_ROW]["chosen"] = "9" * 100
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("dpo", None, [f"data.dataset={tmp_path / 'p.jsonl'}", "data.eval_fraction=0.25"])
    with pytest.raises(UserInputError, match=f"chosen of row {BAD_ROW} of the train split: data.max_seq_len=32"):
        prepare_dpo_data(cfg, build_default_tokenizer())


def test_tokenizing_before_the_hold_out_keeps_rows_and_order(tmp_path):
    path = _sft_file(tmp_path / "d.jsonl")
    cfg = load_config("sft", None, [f"data.dataset={path}", "data.eval_fraction=0.25"])
    tokenizer = build_default_tokenizer()
    got = prepare_sft_data(cfg, tokenizer)
    split_first = load_sft_dataset(str(path), seed=cfg.seed, eval_fraction=0.25)  # held out, then tokenized
    for split in ("train", "eval"):
        expected = tokenize_dataset(split_first[split], tokenizer, max_seq_len=32, use_chat_template=True,
                                    truncate=False, split_name=split)
        assert got[split]["input_ids"] == expected["input_ids"], split
        assert got[split]["reference"] == expected["reference"], split
    assert len(got["eval"]) == 10 and got["train"]["reference"] != sorted(got["train"]["reference"])  # shuffled
