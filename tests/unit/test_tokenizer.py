"""The in-code default tokenizer: byte-level ids, special tokens, chat template, save/load round trip."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from automodel_mimo.models.tokenizer import IMAGE, SPECIAL_TOKENS, build_default_tokenizer, image_token_id, load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "37+85="},
    {"role": "assistant", "content": "122"},
    {"role": "user", "content": "héllo 🙂"},
    {"role": "assistant", "content": "bye\n"},
]
TEXTS = ["37+85=122", "  spaces  and\ttabs\n", "héllo wörld 🙂 日本", "<|user|>hi<|end|><|assistant|>", ""]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_default_tokenizer()


def test_vocab_is_bytes_plus_specials(tok: PreTrainedTokenizerFast) -> None:
    assert len(tok) == 264
    assert tok("AZ az")["input_ids"] == [ord(c) for c in "AZ az"]  # id i is byte i
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(256, 264))
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert tok.pad_token_id != tok.eos_token_id


def test_bytes_round_trip(tok: PreTrainedTokenizerFast) -> None:
    for text in TEXTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("é")["input_ids"] == list("é".encode())


def test_special_token_ids_are_stable(tok: PreTrainedTokenizerFast) -> None:
    # Trained checkpoints depend on these ids: new specials may only be appended.
    names = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>"]
    assert {name: tok.convert_tokens_to_ids(name) for name in names} == dict(zip(names, range(256, 264)))
    assert image_token_id(tok) == 263 and len(tok) == 264  # present already: nothing is added
    assert tok(f"a{IMAGE}{IMAGE}b")["input_ids"] == [ord("a"), 263, 263, ord("b")]
    assert 263 in tok.all_special_ids


def test_image_token_is_appended_to_a_tokenizer_without_it() -> None:
    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    backend.add_special_tokens(["<|pad|>"])
    other = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>")
    assert IMAGE not in other.get_vocab()
    assert image_token_id(other) == 3 and len(other) == 4
    assert image_token_id(other) == 3 and len(other) == 4  # idempotent
    assert other(f"a{IMAGE}b")["input_ids"] == [0, 3, 1]
    assert other.pad_token_id == 2


def test_special_tokens_are_single_ids(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("<|user|>hi<|end|>")["input_ids"]
    assert ids == [tok.convert_tokens_to_ids("<|user|>"), ord("h"), ord("i"), tok.convert_tokens_to_ids("<|end|>")]


def test_chat_template_renders_roles(tok: PreTrainedTokenizerFast) -> None:
    messages = CONVERSATION[1:3]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>37+85=<|end|><|assistant|>122<|end|>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>37+85=<|end|><|assistant|>"


def test_chat_template_prefix_property(tok: PreTrainedTokenizerFast) -> None:
    for k in range(1, len(CONVERSATION)):
        longer = tok.apply_chat_template(CONVERSATION[: k + 1], tokenize=False)
        assert longer.startswith(tok.apply_chat_template(CONVERSATION[:k], tokenize=False))
        if CONVERSATION[k]["role"] != "assistant":
            continue
        shorter = tok.apply_chat_template(CONVERSATION[:k], tokenize=False, add_generation_prompt=True)
        assert longer.startswith(shorter)
        short_ids = tok(shorter, add_special_tokens=False)["input_ids"]
        long_ids = tok(longer, add_special_tokens=False)["input_ids"]
        assert long_ids[: len(short_ids)] == short_ids


def test_save_and_auto_load_round_trip(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
    )
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == rendered


def test_load_tokenizer_default_and_path(tmp_path: Path) -> None:
    assert len(load_tokenizer(None)) == 264
    no_pad = build_default_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|eos|>"


def test_builtin_vocab_size_constant_matches_the_tokenizer():
    from automodel_mimo.models.tokenizer import BUILTIN_VOCAB_SIZE

    assert len(build_default_tokenizer()) == BUILTIN_VOCAB_SIZE
