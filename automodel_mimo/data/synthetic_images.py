"""A synthetic image task drawn in code: "<|image|>What is shown?" -> "red square".

Each image holds one filled shape of one colour, at a random size and position on a dark, lightly noisy
background. The answer names colour and shape, so a text-only model can do no better than guessing one of
len(COLORS) * len(SHAPES) answers; the encoder has to see the image. Rows are distinct (colour, shape,
size, x, y) tuples sampled without replacement, so train and eval share no image, and everything follows
from the seed.
"""

from __future__ import annotations

import random

import datasets
import numpy as np
from PIL import Image, ImageDraw

from automodel_mimo.errors import UserInputError
from automodel_mimo.models.tokenizer import IMAGE

COLORS = {"red": (220, 50, 40), "green": (40, 190, 70), "blue": (50, 90, 230), "yellow": (235, 215, 50)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What is shown?"
MIN_IMAGE_SIZE = 16
FEATURES = datasets.Features(
    {"image": datasets.Image(), "prompt": datasets.Value("string"), "response": datasets.Value("string")}
)


def _space(image_size: int) -> tuple[range, range]:
    """Shape sizes (side of the bounding box), and top-left offsets that fit the largest size.

    Sizes vary little (7/16 to 1/2 of the image), so a shape's area (square > circle > triangle) nearly
    tells it apart: a tiny vision tower trained from scratch learns that in minutes, shape edges take far longer.
    """
    sizes = range(image_size * 7 // 16, image_size // 2 + 1)
    return sizes, range(image_size - sizes[-1] + 1)


def draw_shape(color: str, shape: str, size: int, x: int, y: int, image_size: int, seed: int) -> Image.Image:
    """One RGB image; `seed` fixes the colour jitter and the background noise."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 40, size=(image_size, image_size, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    fill = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(COLORS[color], rng.integers(-25, 26, size=3)))
    box = (x, y, x + size - 1, y + size - 1)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=fill)
    return image


def _decode(code: int, image_size: int) -> tuple[str, str, int, int, int]:
    sizes, offsets = _space(image_size)
    code, x = divmod(code, len(offsets))
    code, y = divmod(code, len(offsets))
    code, size = divmod(code, len(sizes))
    color, shape = divmod(code, len(SHAPES))
    return list(COLORS)[color], SHAPES[shape], sizes[size], offsets[x], offsets[y]


def _rows(codes: list[int], image_size: int, text_only: list[bool], seed: int) -> datasets.Dataset:
    images, prompts, responses = [], [], []
    for code, text in zip(codes, text_only):
        color, shape, size, x, y = _decode(code, image_size)
        if text:  # answerable from the text alone: keeps the language side trained on image-free rows
            images.append(None)
            prompts.append(f"A {color} {shape}. {QUESTION}")
        else:
            images.append(draw_shape(color, shape, size, x, y, image_size, seed=seed * 1_000_003 + code))
            prompts.append(f"{IMAGE}{QUESTION}")
        responses.append(f"{color} {shape}")
    return datasets.Dataset.from_dict({"image": images, "prompt": prompts, "response": responses}, features=FEATURES)


def shapes_dataset(
    num_train: int, num_eval: int, seed: int, *, image_size: int = 32, text_only_fraction: float = 0.0
) -> datasets.DatasetDict:
    """Splits "train" and "eval" with columns image (PIL, None on text-only rows), prompt and response."""
    if image_size < MIN_IMAGE_SIZE:
        raise UserInputError(f"data.image_size={image_size} is too small to draw shapes; set it >= {MIN_IMAGE_SIZE}")
    if num_train < 1 or num_eval < 0:
        raise UserInputError(
            f"data.num_train={num_train}, data.num_eval={num_eval}: set data.num_train >= 1 and data.num_eval >= 0"
        )
    if not 0.0 <= text_only_fraction < 1.0:
        raise UserInputError(f"data.text_only_fraction={text_only_fraction}: must be in [0, 1)")
    sizes, offsets = _space(image_size)
    total = len(COLORS) * len(SHAPES) * len(sizes) * len(offsets) ** 2
    if num_train + num_eval > total:
        raise UserInputError(
            f"data.num_train + data.num_eval = {num_train + num_eval} exceeds the {total} distinct shape images of "
            f"data.image_size={image_size}; lower data.num_train/data.num_eval or raise data.image_size"
        )
    rng = random.Random(seed)
    codes = rng.sample(range(total), num_train + num_eval)
    text_only = [rng.random() < text_only_fraction for _ in codes]
    return datasets.DatasetDict({
        "train": _rows(codes[:num_train], image_size, text_only[:num_train], seed),
        "eval": _rows(codes[num_train:], image_size, text_only[num_train:], seed),
    })


SYNTHETIC_IMAGE_TASKS = {"shapes": shapes_dataset}
