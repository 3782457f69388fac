"""Tokenizers: a tiny byte-level default built in code, or any Hugging Face tokenizer by name/path."""

from __future__ import annotations

from typing import TYPE_CHECKING

from automodel_mimo.errors import UserInputError

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built: the CLI's checks read only the constants
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, END = "<|pad|>", "<|bos|>", "<|eos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Marks where an image goes in a MIMO prompt; tokenization expands each one into the encoder's output rows.
IMAGE = "<|image|>"
# Append new specials at the end only: earlier ids are baked into trained checkpoints.
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS, END, IMAGE)

# Each message is `<|role|>content<|end|>` with no other whitespace, so the rendering of
# messages[:k] (plus the generation prompt) is always a prefix of the rendering of messages[:k+1].
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


BUILTIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # bytes, then the special tokens


def _byte_symbols() -> list[str]:
    """The GPT-2 byte-to-unicode table, so that token id i is byte i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def build_default_tokenizer() -> PreTrainedTokenizerFast:
    """A 264-token byte-level tokenizer with chat and image special tokens; needs no files or downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    # The table must agree with the pre-tokenizer's alphabet or some bytes would be unknown.
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # fixes their ids at 256.. in SPECIAL_TOKENS order
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [*ROLE_TOKENS, END, IMAGE]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerFast:
    """The default tokenizer for None; otherwise a Hugging Face tokenizer, padded with eos if it lacks a pad."""
    if name_or_path is None:
        return build_default_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserInputError(f"model.tokenizer / model.pretrained = {name_or_path}: cannot load a tokenizer ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the `<|image|>` placeholder, added as a special token to tokenizers that lack it.

    Adding grows the vocabulary by one: a pretrained LLM then needs its embeddings resized to len(tokenizer).
    """
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE], special_tokens=True)  # (add_special_tokens kwargs differ across versions)
    return tokenizer.convert_tokens_to_ids(IMAGE)
