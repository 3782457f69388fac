"""Data: synthetic addition, source loading into `messages`, tokenization with shifted, masked labels."""

import json
from pathlib import Path

import datasets
import pytest
from transformers import PreTrainedTokenizerFast

from automodel_mimo.data.sources import load_sft_dataset
from automodel_mimo.data.synthetic import SYNTHETIC_TASKS, addition_dataset, grade_exact
from automodel_mimo.data.tokenize import IGNORE_INDEX, tokenize_dataset, tokenize_messages
from automodel_mimo.errors import UserInputError
from automodel_mimo.models.tokenizer import build_default_tokenizer

USER, ASSISTANT, END = 260, 261, 262
EOS = 258


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    tokenizer = build_default_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>", "<|eos|>"])
    assert ids == [USER, ASSISTANT, END, EOS]
    return tokenizer


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _pair(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# --- synthetic ---------------------------------------------------------------------------------


def test_addition_is_deterministic_and_correct() -> None:
    first = addition_dataset(num_train=200, num_eval=50, digits=2, seed=3)
    again = addition_dataset(num_train=200, num_eval=50, digits=2, seed=3)
    other = addition_dataset(num_train=200, num_eval=50, digits=2, seed=4)
    assert first["train"].to_dict() == again["train"].to_dict()
    assert first["eval"].to_dict() == again["eval"].to_dict()
    assert first["train"].to_dict() != other["train"].to_dict()
    assert (first["train"].num_rows, first["eval"].num_rows) == (200, 50)
    for row in first["train"]:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert len(a) == len(b) == 2 and len(row["response"]) == 3  # fixed width, zero-padded
        assert 0 <= int(a) < 100 and 0 <= int(b) < 100
        assert int(row["response"]) == int(a) + int(b)


def test_addition_splits_share_no_pair() -> None:
    data = addition_dataset(num_train=9000, num_eval=1000, digits=2, seed=0)  # the whole pair space
    train, held_out = set(data["train"]["prompt"]), set(data["eval"]["prompt"])
    assert len(train) == 9000 and len(held_out) == 1000
    assert not train & held_out


def test_addition_too_many_rows_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="data.num_train"):
        addition_dataset(num_train=100, num_eval=1, digits=1, seed=0)


def test_grade_exact() -> None:
    assert grade_exact(" 122\n", "122")
    assert not grade_exact("1 22", "122")
    assert not grade_exact("123", "122")
    assert SYNTHETIC_TASKS["addition"] is addition_dataset


# --- sources -----------------------------------------------------------------------------------


def test_synthetic_source_gives_messages() -> None:
    data = load_sft_dataset("synthetic:addition", seed=1, num_train=20, num_eval=5)
    assert list(data) == ["train", "eval"]
    assert data["train"].column_names == ["messages"]
    messages = data["train"][0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    a, b = messages[0]["content"].removesuffix("=").split("+")
    assert grade_exact(messages[1]["content"], f"{int(a) + int(b):03d}")


def test_unknown_synthetic_task_lists_tasks() -> None:
    with pytest.raises(UserInputError, match="synthetic:addition"):
        load_sft_dataset("synthetic:multiply", seed=0)


def test_jsonl_with_prompt_response_keys(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": i, "extra": "x"} for i in range(20)]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    data = load_sft_dataset(str(path), seed=0, prompt_key="question", response_key="answer", eval_fraction=0.25)
    assert (data["train"].num_rows, data["eval"].num_rows) == (15, 5)
    assert data["eval"].column_names == ["messages"]
    seen = {m[0]["content"]: m[1]["content"] for split in data.values() for m in split["messages"]}
    assert seen == {f"q{i}": str(i) for i in range(20)}  # numbers become text


def test_jsonl_with_messages_key(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "s", "name": "ignored"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"conv": conversation}] * 10)
    data = load_sft_dataset(str(path), seed=0, messages_key="conv", eval_fraction=0.2)
    assert data["train"][0]["messages"] == [{"role": m["role"], "content": m["content"]} for m in conversation]


def test_messages_column_is_found_without_a_prompt_column(tmp_path: Path) -> None:
    """A chat-format file (a `messages` column, no `prompt`) needs no data.messages_key."""
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": _pair("1+2=", "3")}] * 10)
    data = load_sft_dataset(str(path), seed=0, eval_fraction=0.2)
    assert data["train"][0]["messages"] == _pair("1+2=", "3")


def test_directory_uses_its_test_split(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"}] * 6)
    _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "c", "response": "d"}] * 2)
    data = load_sft_dataset(str(tmp_path), seed=0)
    assert (data["train"].num_rows, data["eval"].num_rows) == (6, 2)
    assert data["eval"][0]["messages"] == _pair("c", "d")


def test_missing_column_names_the_key(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 4)
    with pytest.raises(UserInputError, match=r"data\.prompt_key=prompt .*question, answer"):
        load_sft_dataset(str(path), seed=0)
    with pytest.raises(UserInputError, match=r"data\.response_key=response"):
        load_sft_dataset(str(path), seed=0, prompt_key="question")
    with pytest.raises(UserInputError, match=r"data\.messages_key=messages"):
        load_sft_dataset(str(path), seed=0, messages_key="messages")


def test_conversation_must_end_with_assistant(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    with pytest.raises(UserInputError, match="last message must be the assistant"):
        load_sft_dataset(str(path), seed=0, messages_key="messages", eval_fraction=0.5)


def test_missing_file_names_data_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"data\.dataset="):
        load_sft_dataset(str(tmp_path / "nope.jsonl"), seed=0)


# --- tokenization ------------------------------------------------------------------------------


def test_chat_labels_are_shifted_and_masked(tok: PreTrainedTokenizerFast) -> None:
    out = tokenize_messages(_pair("1+2=", "3"), tok, max_seq_len=32)
    prompt = [USER, *b"1+2=", END, ASSISTANT]
    assert out["input_ids"] == [*prompt, ord("3"), END]
    assert out["prompt_ids"] == prompt
    assert out["reference"] == "3"
    # Position 6 (<|assistant|>) predicts "3", position 7 ("3") predicts <|end|>, nothing predicts past the end.
    assert out["labels"] == [IGNORE_INDEX] * 6 + [ord("3"), END, IGNORE_INDEX]
    assert len(out["labels"]) == len(out["input_ids"])


def test_multi_turn_masks_every_assistant_turn(tok: PreTrainedTokenizerFast) -> None:
    messages = [*_pair("a", "b"), *_pair("c", "d")]
    out = tokenize_messages(messages, tok, max_seq_len=32)
    turn_a, turn_c = [USER, ord("a"), END, ASSISTANT, ord("b"), END], [USER, ord("c"), END, ASSISTANT, ord("d"), END]
    assert out["input_ids"] == turn_a + turn_c
    expected = [IGNORE_INDEX] * 12
    expected[3], expected[4] = ord("b"), END
    expected[9], expected[10] = ord("d"), END
    assert out["labels"] == expected
    assert out["prompt_ids"] == out["input_ids"][:10]
    assert out["reference"] == "d"


def test_plain_mode_appends_eos(tok: PreTrainedTokenizerFast) -> None:
    out = tokenize_messages(_pair("1+2=", "3"), tok, max_seq_len=32, use_chat_template=False)
    assert out["input_ids"] == [*b"1+2=3", EOS]
    assert out["labels"] == [IGNORE_INDEX] * 3 + [ord("3"), EOS, IGNORE_INDEX]
    assert out["prompt_ids"] == list(b"1+2=")


def test_batched_backend_encoding_equals_the_tokenizer_call(tok: PreTrainedTokenizerFast) -> None:
    from automodel_mimo.data.tokenize import encode

    texts = ["<|user|>07+85=<|end|><|assistant|>", "plain text <|eos|> é ü", "<|image|><|image|>x", ""]
    assert encode(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_tokenizer_without_template_or_eos_names_the_real_cause(tok: PreTrainedTokenizerFast) -> None:
    bare = build_default_tokenizer()
    bare.chat_template, bare.eos_token = None, None
    with pytest.raises(UserInputError, match="neither a chat template nor an eos token") as err:
        tokenize_messages(_pair("1+2=", "3"), bare, max_seq_len=32, use_chat_template=True)
    assert "set data.chat_template=true" not in str(err.value)  # it already is: not the fix
    with pytest.raises(UserInputError, match="data.chat_template=false .* has no eos token"):
        tokenize_messages(_pair("1+2=", "3"), bare, max_seq_len=32, use_chat_template=False)
    ds = datasets.Dataset.from_dict({"messages": [_pair("1+1=", "2")]})
    with pytest.raises(UserInputError, match="^the tokenizer"):  # checked once, before any row
        tokenize_dataset(ds, bare, max_seq_len=16, use_chat_template=True, truncate=False, split_name="train")


def test_too_long_names_max_seq_len_or_truncates(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(UserInputError, match=r"data\.max_seq_len=8 .*data\.truncate=true"):
        tokenize_messages(_pair("1+2=", "3"), tok, max_seq_len=8)
    out = tokenize_messages(_pair("1+2=", "34"), tok, max_seq_len=8, truncate=True)
    assert out["input_ids"] == [USER, *b"1+2=", END, ASSISTANT, ord("3")]
    assert out["labels"] == [IGNORE_INDEX] * 6 + [ord("3"), IGNORE_INDEX]
    with pytest.raises(UserInputError, match="no assistant token"):
        tokenize_messages(_pair("1+2=", "3"), tok, max_seq_len=7, truncate=True)


def test_non_prefix_template_is_rejected(tok: PreTrainedTokenizerFast) -> None:
    counting = build_default_tokenizer()
    counting.chat_template = "{{ messages | length }}" + tok.chat_template  # the count changes every prefix
    with pytest.raises(UserInputError, match="prefix"):
        tokenize_messages(_pair("a", "b"), counting, max_seq_len=32)


def test_tokenize_dataset_names_split_and_row(tok: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict({"messages": [_pair("1+1=", "2"), _pair("11+11=", "22")]})
    out = tokenize_dataset(ds, tok, max_seq_len=16, use_chat_template=True, truncate=False, split_name="eval")
    assert out.column_names == ["input_ids", "labels", "prompt_ids", "reference"]
    assert out[1] == tokenize_messages(_pair("11+11=", "22"), tok, max_seq_len=16)
    with pytest.raises(UserInputError, match=r"row 1 of the eval split: data\.max_seq_len=10"):
        tokenize_dataset(ds, tok, max_seq_len=10, use_chat_template=True, truncate=False, split_name="eval")
