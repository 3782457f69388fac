"""A synthetic image task drawn in code: "<|image|>Colour and place?" -> "red top left".

Each image holds one filled shape (square, circle or triangle) of one colour, inside one quadrant, at a
random size and position on a dark, lightly noisy background. The answer names the colour and the
quadrant: the prompt is the same for every image row, so a text-only model can do no better than guessing
one of len(COLORS) * len(QUADRANTS) answers, while a patch encoder whose patches tile the quadrants sees
both in the patches the shape covers. (Naming the shape instead was far slower to learn for a tiny tower
trained from scratch: it needs the shape's area, summed over patches, not one patch's content.)
Rows are distinct (colour, shape, quadrant, size, x, y) tuples sampled without replacement, so train and
eval share no image, and everything follows from the seed.
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
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION = "Colour and place?"
MIN_IMAGE_SIZE = 16
FEATURES = datasets.Features(
    {"image": datasets.Image(), "prompt": datasets.Value("string"), "response": datasets.Value("string")}
)


def _placements(image_size: int) -> list[tuple[int, int, int]]:
    """(size, dx, dy): shapes of a quarter to three quarters of a quadrant's side, offsets that keep them inside it."""
    half = image_size // 2
    return [(size, dx, dy) for size in range(half // 4 + 1, half * 3 // 4 + 1)
            for dx in range(half - size + 1) for dy in range(half - size + 1)]


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


def _decode(code: int, placements: list[tuple[int, int, int]], image_size: int) -> tuple[str, str, str, int, int, int]:
    """code -> colour, shape, quadrant, size, x, y (top-left corner in the image)."""
    code, placement = divmod(code, len(placements))
    code, quadrant = divmod(code, len(QUADRANTS))
    color, shape = divmod(code, len(SHAPES))
    size, dx, dy = placements[placement]
    half = image_size // 2
    x, y = dx + half * (quadrant % 2), dy + half * (quadrant // 2)
    return list(COLORS)[color], SHAPES[shape], QUADRANTS[quadrant], size, x, y


def _rows(codes: list[int], image_size: int, text_only: list[bool], seed: int) -> datasets.Dataset:
    placements = _placements(image_size)
    images, prompts, responses = [], [], []
    for code, text in zip(codes, text_only):
        color, shape, quadrant, size, x, y = _decode(code, placements, image_size)
        if text:  # answerable from the text alone: keeps the language side trained on image-free rows
            images.append(None)
            prompts.append(f"{color} {shape}, {quadrant}. {QUESTION}")
        else:
            images.append(draw_shape(color, shape, size, x, y, image_size, seed=seed * 1_000_003 + code))
            prompts.append(f"{IMAGE}{QUESTION}")
        responses.append(f"{color} {quadrant}")
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
    total = len(COLORS) * len(SHAPES) * len(QUADRANTS) * len(_placements(image_size))
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


def wrong_answer(answer: str, rng: random.Random) -> str:
    """"red top left" with its colour or its quadrant replaced by another one: wrong, but plausible (the text DPO
    default's one wrong digit)."""
    color, quadrant = answer.split(" ", 1)
    if rng.random() < 0.5:
        return f"{rng.choice([c for c in COLORS if c != color])} {quadrant}"
    return f"{color} {rng.choice([q for q in QUADRANTS if q != quadrant])}"


def shapes_preferences(
    num_train: int, num_eval: int, seed: int, *, image_size: int = 32, text_only_fraction: float = 0.0
) -> datasets.DatasetDict:
    """synthetic:shapes as preference pairs: columns image, prompt, chosen (the right answer) and rejected (the
    right answer with its colour or quadrant wrong); the same rows and splits as shapes_dataset."""
    rng = random.Random(seed + 1)
    out = {}
    for split, ds in shapes_dataset(num_train, num_eval, seed, image_size=image_size,
                                    text_only_fraction=text_only_fraction).items():
        ds = ds.rename_column("response", "chosen")
        out[split] = ds.add_column("rejected", [wrong_answer(a, rng) for a in ds["chosen"]])
    return datasets.DatasetDict(out)


SYNTHETIC_IMAGE_PREFERENCES = {"shapes": shapes_preferences}
