"""model.pretrained / model.tokenizer, when they name local folders, checked before any rank starts.

Left to transformers, a missing folder reads as a malformed hub id ("Repo id must be in the form
'repo_name'"), and an empty one as a missing sentencepiece/tiktoken install. Here each is one line naming
the key, what the folder lacks, and the fix. Hub names ("name", "org/name") are left to the loaders.
"""

from __future__ import annotations

from pathlib import Path

from automodel_mimo.errors import UserInputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def is_local(value: str) -> bool:
    """A hub id is 'name' or 'org/name'; an absolute, ~ or ./ path, one with more '/', or any existing path is local."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or Path(value).expanduser().exists()


def check_model_paths(model) -> None:
    """model.pretrained: a folder with config.json and weights (and tokenizer files unless model.tokenizer
    is set); model.tokenizer: a folder with tokenizer files."""
    if model.pretrained and is_local(model.pretrained):
        _check_model_folder("model.pretrained", model.pretrained, tokenizer=model.tokenizer is None)
    if model.tokenizer and is_local(model.tokenizer):
        names = _folder_names("model.tokenizer", model.tokenizer)
        _require_tokenizer("model.tokenizer", model.tokenizer, names)


def _check_model_folder(key: str, value: str, tokenizer: bool) -> None:
    names = _folder_names(key, value)
    if "config.json" not in names:
        raise UserInputError(f"{key}={value}: cannot load, the folder has no config.json, so it is not a Hugging Face "
                             f"model folder; {_fix(key)}")
    if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names):
        raise UserInputError(f"{key}={value}: cannot load, the folder has config.json but no weights (*.safetensors or "
                             f"pytorch_model*.bin); {_fix(key)}")
    if tokenizer:
        _require_tokenizer(key, value, names)


def _folder_names(key: str, value: str) -> set[str]:
    path = Path(value).expanduser()
    if not path.exists():
        raise UserInputError(f"{key}={value}: cannot load, no such file or directory; {_fix(key)}")
    if not path.is_dir():
        raise UserInputError(f"{key}={value}: cannot load, it is a file, not a folder; {_fix(key)}")
    names = {p.name for p in path.iterdir()}
    if not names:
        raise UserInputError(f"{key}={value}: cannot load, the folder is empty; {_fix(key)}")
    return names


def _require_tokenizer(key: str, value: str, names: set[str]) -> None:
    if not names & set(TOKENIZER_FILES):
        raise UserInputError(f"{key}={value}: cannot load a tokenizer, the folder has none of {', '.join(TOKENIZER_FILES)}; "
                             "set model.tokenizer to a tokenizer folder or hub name")


def _fix(key: str) -> str:
    if key == "model.tokenizer":
        return "point model.tokenizer at a tokenizer folder (e.g. an HF export's) or a hub name, or leave it unset"
    return ("point model.pretrained at a Hugging Face model folder (config.json, weights, tokenizer files) or a hub "
            "name such as Qwen/Qwen2.5-0.5B, or drop it and set model.config for a random init")
