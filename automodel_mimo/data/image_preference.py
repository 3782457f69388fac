"""Preference pairs with images, for DPO of a MIMO model: both sequences of a pair share the prompt's images.

Sources: synthetic:shapes (the MIMO SFT task; chosen = the right answer, rejected = the same answer with its
colour or quadrant wrong) or a file / directory / hub dataset with an image column (data.image_key: an image,
a list of images or image paths per row) and the text DPO's columns (data.prompt_key, dpo.chosen_key,
dpo.rejected_key; data/preference.py). The prompt holds one `<|image|>` marker per image. Tokenized like MIMO SFT
rows (data/mimo_tokenize.py): each marker becomes tokens_per_image placeholders in both sequences.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from automodel_mimo.data.images import IMAGE_LIST, _image_column
from automodel_mimo.data.mimo_tokenize import run_placeholder_id, tokenize_mimo_messages
from automodel_mimo.data.paths import SYNTHETIC_PREFIX
from automodel_mimo.data.preference import TOKENIZED, _to_conversations, append_pair
from automodel_mimo.data.sources import hold_out, load_raw, pick_splits
from automodel_mimo.data.synthetic_images import SYNTHETIC_IMAGE_PREFERENCES
from automodel_mimo.errors import UserInputError

_UNDECODED = datasets.List(datasets.Image(decode=False))
IMAGE_TOKENIZED = datasets.Features({**TOKENIZED, "images": IMAGE_LIST, "num_images": datasets.Value("int64")})


def _with_images(ds: datasets.Dataset, split: str, image_key: str, base_dir: Path | None,
                 keys: tuple[str, str, str]) -> datasets.Dataset:
    """Columns `chosen`, `rejected` (chat messages) and `images` (a list per row, undecoded)."""
    ds = _image_column(ds, image_key, base_dir)
    images = [[] if v is None else [v] if isinstance(v, dict) else [x for x in v if x is not None] for v in ds[image_key]]
    conversations = _to_conversations(ds, split, *keys)
    return conversations.add_column("images", images, feature=_UNDECODED)


def _tokenize(ds: datasets.Dataset, cfg, tokenizer, placeholder_id: int, split: str) -> datasets.Dataset:
    """Each pair's two sequences with expanded placeholders, its prompt (for the warm-up's greedy check) and images."""
    d = cfg.data
    out = {name: [] for name in IMAGE_TOKENIZED}
    for i, row in enumerate(ds):
        n = len(row["images"])
        append_pair(out, row, f"row {i} of the {split} split", lambda messages, n=n: tokenize_mimo_messages(
            messages, n, tokenizer, placeholder_id=placeholder_id, tokens_per_image=cfg.mimo.tokens_per_image,
            max_seq_len=d.max_seq_len, use_chat_template=d.chat_template, truncate=d.truncate))
        out["images"].append(row["images"])
        out["num_images"].append(n)
    undecoded = datasets.Features({**IMAGE_TOKENIZED, "images": _UNDECODED})
    return datasets.Dataset.from_dict(out, features=undecoded).cast_column("images", IMAGE_LIST)


def load_image_preferences(cfg, tokenizer) -> datasets.DatasetDict:
    """Splits "train" and "eval", tokenized (IMAGE_TOKENIZED), deterministic on every rank. As for text pairs,
    files are converted and tokenized in their row order before the eval hold-out (errors name the file's row)."""
    d = cfg.data
    placeholder_id = run_placeholder_id(cfg, tokenizer)
    keys = (d.prompt_key, cfg.dpo.chosen_key, cfg.dpo.rejected_key)
    if d.dataset.startswith(SYNTHETIC_PREFIX):
        task = d.dataset[len(SYNTHETIC_PREFIX):]
        if task not in SYNTHETIC_IMAGE_PREFERENCES:
            raise UserInputError(f"data.dataset={d.dataset}: MIMO dpo's synthetic tasks are "
                                 + ", ".join(f"synthetic:{t}" for t in SYNTHETIC_IMAGE_PREFERENCES))
        raw = SYNTHETIC_IMAGE_PREFERENCES[task](d.num_train, d.num_eval, cfg.seed, image_size=d.image_size,
                                                text_only_fraction=d.text_only_fraction)
        splits, base_dir, keys, image_key, shown = raw, None, ("prompt", "chosen", "rejected"), "image", {}
    else:
        path = Path(d.dataset).expanduser()
        base_dir = path.parent if path.is_file() else path if path.is_dir() else None
        splits = pick_splits(load_raw(d.dataset, d.name), train_split=d.train_split, eval_split=d.eval_split)
        image_key, shown = d.image_key, {"train": d.train_split, "eval": d.eval_split}
    out = datasets.DatasetDict({
        split: _tokenize(_with_images(ds, shown.get(split, split), image_key, base_dir, keys), cfg, tokenizer,
                         placeholder_id, shown.get(split, split))
        for split, ds in splits.items()})
    return hold_out(out, eval_fraction=d.eval_fraction, seed=cfg.seed)
