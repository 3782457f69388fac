"""Images for MIMO SFT: preprocessing to normalized tensors, and image datasets normalized to `images` + `messages`.

Preprocessing is PIL + numpy (no torchvision): convert to RGB, resize to a square with bicubic resampling
(as SigLIP/CLIP processors do), scale to [0, 1], normalize with the configured mean/std.

Every source (synthetic:shapes, an imagefolder directory, parquet/json/jsonl files, a hub dataset) becomes
splits "train" and "eval" with two columns: `images` (a list of images per row, empty on text-only rows) and
`messages` (chat messages, the prompt holding one `<|image|>` marker per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from automodel_mimo.data import sources
from automodel_mimo.data.synthetic_images import SYNTHETIC_IMAGE_TASKS
from automodel_mimo.errors import UserInputError

IMAGE_LIST = datasets.List(datasets.Image())
FEATURES = datasets.Features({"images": IMAGE_LIST, "messages": sources.FEATURES["messages"]})
_UNDECODED = datasets.Features({"images": datasets.List(datasets.Image(decode=False)), "messages": FEATURES["messages"]})


@dataclass(frozen=True)
class ImageProcessor:
    """PIL images -> float32 (N, 3, size, size); N may be 0 (a text-only row still yields a well-shaped tensor)."""

    size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise UserInputError(f"data.image_size={self.size}: must be >= 1")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserInputError(f"data.image_mean={list(self.mean)}, data.image_std={list(self.std)}: give 3 numbers each (RGB)")
        if min(self.std) <= 0:
            raise UserInputError(f"data.image_std={list(self.std)}: every value must be > 0")

    @classmethod
    def from_config(cls, data_cfg) -> "ImageProcessor":
        """From a DataConfig: data.image_size, data.image_mean, data.image_std."""
        return cls(data_cfg.image_size, tuple(data_cfg.image_mean), tuple(data_cfg.image_std))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 3, self.size, self.size)
        return torch.stack([self.preprocess(image) for image in images])


# ---------------------------------------------------------------- sources


def _is_image_like(feature: Any) -> bool:
    """An image, a path string, or an encoded {bytes, path} struct (parquet written without `datasets`); a column
    of nulls only (json rows whose image is null: text-only prompts) as well."""
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string", "null")
    return isinstance(feature, dict) and set(feature) <= {"bytes", "path"} and bool(feature)


def _image_column(ds: datasets.Dataset, image_key: str, base_dir: Path | None) -> datasets.Dataset:
    """Cast `image_key` to undecoded images (one per row, or a list); accepts images, lists of them, and file paths."""
    sources.require_column(ds, image_key, "data.image_key")
    feature = ds.features[image_key]
    is_list = isinstance(feature, (datasets.List, datasets.Sequence))
    inner = feature.feature if is_list else feature
    if not _is_image_like(inner):
        raise UserInputError(
            f"data.image_key={image_key}: the column holds {feature}, not images, image lists or image paths; "
            "set data.image_key to the image column"
        )
    if isinstance(inner, datasets.Value) and base_dir is not None:
        # Relative paths in a json/csv/parquet file are relative to that file, not to the working directory.
        def absolute(row: dict[str, Any]) -> dict[str, Any]:
            paths = row[image_key] if is_list else [row[image_key]]
            resolved = [p if p is None or Path(p).is_absolute() else str(base_dir / p) for p in paths]
            return {image_key: resolved if is_list else resolved[0]}

        ds = ds.map(absolute, load_from_cache_file=False, keep_in_memory=True)
    image = datasets.Image(decode=False)
    return ds.cast_column(image_key, datasets.List(image) if is_list else image)


def _to_rows(ds: datasets.Dataset, split: str, *, image_key: str, prompt_key: str, response_key: str,
             messages_key: str | None, base_dir: Path | None) -> datasets.Dataset:
    """One split -> columns `images` (list) and `messages`; errors name the config key and split."""
    messages_key = sources.chat_column(ds, prompt_key, messages_key)
    if messages_key is not None:
        sources.require_column(ds, messages_key, "data.messages_key")
    else:
        sources.require_column(ds, prompt_key, "data.prompt_key")
        sources.require_column(ds, response_key, "data.response_key")
    ds = _image_column(ds, image_key, base_dir)

    def convert(row: dict[str, Any], idx: int) -> dict[str, Any]:
        value = row[image_key]
        images = [] if value is None else [value] if isinstance(value, dict) else [v for v in value if v is not None]
        if messages_key is not None:
            messages = sources.clean_messages(row, idx, messages_key)
        else:
            messages = sources.pair_to_messages(row, idx, prompt_key, response_key)
        return {"images": images, **messages}

    if len(ds) == 0:
        return datasets.Dataset.from_dict({"images": [], "messages": []}, features=FEATURES)
    try:
        out = ds.map(convert, with_indices=True, remove_columns=ds.column_names, features=_UNDECODED,
                     load_from_cache_file=False, keep_in_memory=True)
    except UserInputError as err:
        raise UserInputError(f"{split} split: {err}") from err
    return out.cast(FEATURES)


def load_image_dataset(
    source: str,
    *,
    seed: int,
    image_key: str = "image",
    prompt_key: str = "prompt",
    response_key: str = "response",
    messages_key: str | None = None,
    train_split: str = "train",
    eval_split: str | None = "test",
    eval_fraction: float = 0.05,
    name: str | None = None,
    num_train: int = 9500,
    num_eval: int = 500,
    image_size: int = 32,
    text_only_fraction: float = 0.0,
) -> datasets.DatasetDict:
    """Splits "train" and "eval" with columns `images` and `messages`.

    num_train/num_eval/image_size/text_only_fraction apply to synthetic tasks (synthetic:shapes) only.
    """
    base_dir = None
    if source.startswith(sources.SYNTHETIC_PREFIX):
        task = source[len(sources.SYNTHETIC_PREFIX):]
        if task not in SYNTHETIC_IMAGE_TASKS:
            raise UserInputError(
                f"data.dataset=synthetic:{task} is not a synthetic image task; use one of "
                + ", ".join(f"synthetic:{name}" for name in sorted(SYNTHETIC_IMAGE_TASKS))
            )
        splits = SYNTHETIC_IMAGE_TASKS[task](num_train, num_eval, seed, image_size=image_size,
                                             text_only_fraction=text_only_fraction)
    else:
        path = Path(source).expanduser()
        base_dir = path.parent if path.is_file() else path if path.is_dir() else None
        raw = sources.load_raw(source, name)
        splits = sources.train_eval(raw, train_split=train_split, eval_split=eval_split,
                                     eval_fraction=eval_fraction, seed=seed)
    return datasets.DatasetDict({
        split: _to_rows(ds, split, image_key=image_key, prompt_key=prompt_key, response_key=response_key,
                        messages_key=messages_key, base_dir=base_dir)
        for split, ds in splits.items()
    })
