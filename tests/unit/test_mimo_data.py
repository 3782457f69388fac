"""MIMO data: synthetic shapes, image preprocessing, image dataset sources, placeholder tokenization, collate."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from automodel_mimo.data.images import ImageProcessor, load_image_dataset
from automodel_mimo.data.mimo_batching import collate_mimo, mimo_rows, split_mimo_rows
from automodel_mimo.data.mimo_tokenize import tokenize_mimo_dataset, tokenize_mimo_messages
from automodel_mimo.data.synthetic_images import COLORS, QUADRANTS, draw_shape, shapes_dataset
from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.models.tokenizer import IMAGE, build_default_tokenizer

PH, USER, ASSISTANT, END, PAD = 263, 260, 261, 262, 256
K = 4  # tokens per image in these tests


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    tokenizer = build_default_tokenizer()
    assert tokenizer.convert_tokens_to_ids([IMAGE, "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]) == [PH, USER, ASSISTANT, END, PAD]
    return tokenizer


def _pair(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _tokenize(tok, messages, num_images, max_seq_len=64, truncate=False):
    return tokenize_mimo_messages(messages, num_images, tok, placeholder_id=PH, tokens_per_image=K,
                                  max_seq_len=max_seq_len, truncate=truncate)


# --- synthetic shapes ----------------------------------------------------------------------------


def test_shapes_deterministic_disjoint_and_answerable() -> None:
    first = shapes_dataset(num_train=120, num_eval=40, seed=5, text_only_fraction=0.25)
    again = shapes_dataset(num_train=120, num_eval=40, seed=5, text_only_fraction=0.25)
    other = shapes_dataset(num_train=120, num_eval=40, seed=6, text_only_fraction=0.25)

    def content(ds):  # images compared by pixels
        return [(None if r["image"] is None else np.asarray(r["image"]).tobytes(), r["prompt"], r["response"]) for r in ds]

    for split in ("train", "eval"):
        assert content(first[split]) == content(again[split])
    assert content(first["train"]) != content(other["train"])
    train_images = {c[0] for c in content(first["train"]) if c[0] is not None}
    eval_images = {c[0] for c in content(first["eval"]) if c[0] is not None}
    assert len(train_images) == sum(r["image"] is not None for r in first["train"])  # all distinct
    assert not train_images & eval_images
    answers = {f"{c} {q}" for c in COLORS for q in QUADRANTS}
    rows = list(first["train"]) + list(first["eval"])
    assert {r["response"] for r in rows} <= answers
    with_image = [r for r in rows if r["image"] is not None]
    assert 0 < len(rows) - len(with_image) < len(rows) / 2  # some text-only rows
    assert {r["prompt"] for r in with_image} == {f"{IMAGE}Colour and place?"}  # the text says nothing: the answer is in the image
    for r in with_image:
        assert r["image"].size == (32, 32) and r["image"].mode == "RGB"
        color, quadrant = r["response"].split(" ", 1)
        lit = np.argwhere(np.asarray(r["image"]).max(-1) >= 60)  # the shape's pixels (the background stays < 40)
        top, left = (lit < 16).all(0)
        bottom, right = (lit >= 16).all(0)
        assert quadrant == f"{'top' if top else 'bottom' if bottom else '?'} {'left' if left else 'right' if right else '?'}"
    for r in rows:
        if r["image"] is None:
            assert IMAGE not in r["prompt"] and all(word in r["prompt"] for word in r["response"].split())


def test_shapes_colour_is_in_the_pixels() -> None:
    image = np.asarray(draw_shape("blue", "square", 12, 3, 5, 32, seed=0)).astype(int)
    inside = image[5:17, 3:15].reshape(-1, 3).mean(0)
    assert inside[2] > 150 and inside[0] < 100  # blue fill
    assert image[20:, 20:].max() < 40  # dark background outside the box


def test_shapes_rejects_too_many_rows() -> None:
    with pytest.raises(UserInputError, match="data.num_train"):
        shapes_dataset(num_train=10**6, num_eval=1, seed=0)
    with pytest.raises(UserInputError, match="data.image_size"):
        shapes_dataset(num_train=2, num_eval=1, seed=0, image_size=8)


# --- preprocessing -------------------------------------------------------------------------------


def test_preprocess_resizes_converts_and_normalizes() -> None:
    gray = Image.new("L", (40, 20), color=255)  # grayscale, non-square: converted to RGB and resized
    red = Image.new("RGB", (16, 16), color=(255, 0, 51))
    out = ImageProcessor(16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 0.2))([gray, red])
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.tensor([1.0, 3.0, 5.0])[:, None, None].expand(3, 16, 16))
    torch.testing.assert_close(out[1], torch.tensor([1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 16))
    assert ImageProcessor(8)([]).shape == (0, 3, 8, 8)
    with pytest.raises(UserInputError, match="data.image_std"):
        ImageProcessor(8, std=(0.5, 0.0, 0.5))


# --- sources -------------------------------------------------------------------------------------


def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        draw_shape("red", "circle", 10, i, 2, 32, seed=i).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


def test_imagefolder_dataset(tmp_path: Path) -> None:
    names = _write_images(tmp_path / "train", 4)
    rows = [{"file_name": name, "question": f"{IMAGE}What?", "answer": f"circle {i}"} for i, name in enumerate(names)]
    (tmp_path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_image_dataset(str(tmp_path), seed=0, prompt_key="question", response_key="answer", eval_fraction=0.25)
    assert (data["train"].num_rows, data["eval"].num_rows) == (3, 1)
    row = data["train"][0]
    assert len(row["images"]) == 1 and row["images"][0].size == (32, 32)
    assert row["messages"][0]["content"] == f"{IMAGE}What?" and row["messages"][1]["content"].startswith("circle")
    with pytest.raises(UserInputError, match="data.image_key=picture"):
        load_image_dataset(str(tmp_path), seed=0, image_key="picture", prompt_key="question", response_key="answer")
    with pytest.raises(UserInputError, match="data.prompt_key=prompt"):
        load_image_dataset(str(tmp_path), seed=0, response_key="answer")


def test_parquet_with_image_lists_and_messages(tmp_path: Path) -> None:
    a, b = draw_shape("red", "square", 10, 0, 0, 32, 0), draw_shape("blue", "circle", 10, 0, 0, 32, 1)
    ds = datasets.Dataset.from_dict(
        {"pics": [[a, b], []], "chat": [_pair(f"{IMAGE}{IMAGE}Both?", "red square, blue circle"), _pair("Hi", "hello")]},
        features=datasets.Features({"pics": datasets.List(datasets.Image()),
                                    "chat": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})}))
    ds.to_parquet(tmp_path / "train.parquet")
    data = load_image_dataset(str(tmp_path / "train.parquet"), seed=0, image_key="pics", messages_key="chat", eval_fraction=0.5)
    rows = sorted(list(data["train"]) + list(data["eval"]), key=lambda r: len(r["images"]))
    assert [len(r["images"]) for r in rows] == [0, 2]
    assert np.array_equal(np.asarray(rows[1]["images"][1]), np.asarray(b))


def test_json_with_relative_image_paths(tmp_path: Path) -> None:
    names = _write_images(tmp_path / "pics", 2)
    rows = [{"image": f"pics/{name}", "prompt": f"{IMAGE}?", "response": "red circle"} for name in names]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_image_dataset(str(tmp_path / "data.jsonl"), seed=0, eval_fraction=0.5)
    assert data["train"][0]["images"][0].size == (32, 32)
    (tmp_path / "bad.jsonl").write_text((json.dumps({"image": 3, "prompt": "p", "response": "r"}) + "\n") * 2)
    with pytest.raises(UserInputError, match="data.image_key=image"):
        load_image_dataset(str(tmp_path / "bad.jsonl"), seed=0, eval_fraction=0.5)


# --- tokenization --------------------------------------------------------------------------------


def test_markers_expand_to_contiguous_placeholders_without_loss(tok) -> None:
    out = _tokenize(tok, _pair(f"a{IMAGE}b{IMAGE}", "ok"), num_images=2)
    expected = [USER, ord("a"), *[PH] * K, ord("b"), *[PH] * K, END, ASSISTANT, ord("o"), ord("k"), END]
    assert out["input_ids"] == expected
    n_prompt = expected.index(ASSISTANT) + 1
    assert out["prompt_ids"] == expected[:n_prompt]
    # labels[t] = ids[t + 1] on the answer and its end token only
    assert out["labels"] == [IGNORE_INDEX] * (n_prompt - 1) + [ord("o"), ord("k"), END, IGNORE_INDEX]
    assert out["reference"] == "ok" and out["num_images"] == 2


def test_text_only_row_matches_the_text_path(tok) -> None:
    from automodel_mimo.data.tokenize import tokenize_messages

    messages = _pair("12+3=", "15")
    out = _tokenize(tok, messages, num_images=0)
    text = tokenize_messages(messages, tok, max_seq_len=64)
    assert {k: out[k] for k in text} == text and out["num_images"] == 0


def test_marker_count_mismatch_is_an_error(tok) -> None:
    with pytest.raises(UserInputError, match="holds 1 <\\|image\\|> markers but the row has 2 images"):
        _tokenize(tok, _pair(f"{IMAGE}x", "y"), num_images=2)
    with pytest.raises(UserInputError, match="holds 0 .* but the row has 1 images"):
        _tokenize(tok, _pair("x", "y"), num_images=1)
    with pytest.raises(UserInputError, match="assistant message holds the image marker"):
        _tokenize(tok, _pair(f"{IMAGE}x", f"y{IMAGE}"), num_images=2)


def test_max_seq_len_and_truncation_never_cut_placeholders(tok) -> None:
    messages = _pair(f"{IMAGE}q", "abcdef")  # 1 + K + 1 + 2 prompt tokens, then 6 + 1 answer tokens
    full = _tokenize(tok, messages, 1)
    assert len(full["input_ids"]) == 15
    with pytest.raises(UserInputError, match="data.max_seq_len=12 is too short"):
        _tokenize(tok, messages, 1, max_seq_len=12)
    cut = _tokenize(tok, messages, 1, max_seq_len=12, truncate=True)
    assert cut["input_ids"] == full["input_ids"][:12] and cut["prompt_ids"] == full["prompt_ids"]
    assert cut["input_ids"].count(PH) == K
    with pytest.raises(UserInputError, match="would cut through image placeholders"):
        _tokenize(tok, _pair(f"xxxx{IMAGE}", "a"), 1, max_seq_len=6, truncate=True)


def test_tokenize_dataset_keeps_images_and_names_the_row(tok) -> None:
    raw = load_image_dataset("synthetic:shapes", seed=0, num_train=6, num_eval=2, text_only_fraction=0.3)
    out = tokenize_mimo_dataset(raw["train"], tok, placeholder_id=PH, tokens_per_image=K, max_seq_len=80,
                                use_chat_template=True, truncate=False, split_name="train")
    assert out.column_names == ["images", "input_ids", "labels", "prompt_ids", "reference", "num_images"]
    for row in out:
        assert row["input_ids"].count(PH) == K * row["num_images"] == K * len(row["images"])
        assert all(isinstance(image, Image.Image) for image in row["images"])
    with pytest.raises(UserInputError, match="row 0 of the train split: data.max_seq_len=8"):
        tokenize_mimo_dataset(raw["train"], tok, placeholder_id=PH, tokens_per_image=K, max_seq_len=8,
                              use_chat_template=True, truncate=False, split_name="train")


# --- collate -------------------------------------------------------------------------------------


def test_collate_mixed_rows_is_batch_major(tok) -> None:
    processor = ImageProcessor(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    shade = [Image.new("RGB", (8, 8), color=(v, v, v)) for v in (10, 20, 30)]
    pairs = [(_pair(f"{IMAGE}{IMAGE}a", "x"), shade[:2]), (_pair("text only", "yz"), []), (_pair(f"{IMAGE}b", "w"), shade[2:])]
    tokenized = [_tokenize(tok, m, len(images)) for m, images in pairs]
    columns = {"input_ids": [t["input_ids"] for t in tokenized], "labels": [t["labels"] for t in tokenized],
               "images": [images for _, images in pairs]}
    batch = collate_mimo(mimo_rows(columns, processor), pad_id=PAD)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "loss_mask", "position_ids", "pixel_values", "image_counts"}
    B, T = batch["input_ids"].shape
    assert B == 3 and T == max(len(t["input_ids"]) for t in tokenized)
    assert batch["image_counts"].tolist() == [2, 0, 1] and batch["image_counts"].dtype == torch.long
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    # batch-major: row 0's two images, then row 2's one, in prompt order
    torch.testing.assert_close(batch["pixel_values"][:, 0, 0, 0], torch.tensor([10, 20, 30]) / 255.0)
    assert (batch["input_ids"] == PH).sum(1).tolist() == [2 * K, 0, K]
    for i, t in enumerate(tokenized):
        n = len(t["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == t["input_ids"] and (batch["input_ids"][i, n:] == PAD).all()
        assert batch["labels"][i, :n].tolist() == t["labels"] and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
    assert batch["position_ids"].tolist() == [list(range(T))] * 3
    part = split_mimo_rows(batch, 1, 3)
    assert part["image_counts"].tolist() == [0, 1] and torch.equal(part["pixel_values"], batch["pixel_values"][2:])
    assert split_mimo_rows(batch, 1, 2)["pixel_values"].shape == (0, 3, 8, 8)
    text_only = collate_mimo(mimo_rows({k: v[1:2] for k, v in columns.items()}, processor), pad_id=PAD)
    assert text_only["pixel_values"].shape == (0, 3, 8, 8) and text_only["image_counts"].tolist() == [0]


# --- config --------------------------------------------------------------------------------------


def test_config_keys_reach_the_data(tok) -> None:
    from automodel_mimo.config import load_config
    from automodel_mimo.data.mimo_tokenize import prepare_mimo_data

    cfg = load_config("sft", overrides=["data.dataset=synthetic:shapes", "data.num_train=6", "data.num_eval=2",
                                        "data.image_size=16", "data.text_only_fraction=0.5", "data.max_seq_len=80",
                                        "data.image_mean=[0.0, 0.0, 0.0]", "data.image_std=[1.0, 1.0, 1.0]"])
    data = prepare_mimo_data(cfg, tok, tokens_per_image=4)
    assert (data["train"].num_rows, data["eval"].num_rows) == (6, 2)
    pixels = ImageProcessor.from_config(cfg.data)([image for row in data["train"]["images"] for image in row])
    assert len(pixels) > 0 and pixels.shape[1:] == (3, 16, 16) and pixels.min() >= 0 and pixels.max() <= 1
    for bad, key in (("data.image_std=[1.0, 0.0, 1.0]", "data.image_std"), ("data.image_mean=[0.5]", "data.image_mean"),
                     ("data.text_only_fraction=1.0", "data.text_only_fraction"), ("data.image_size=0", "data.image_size")):
        with pytest.raises(UserInputError, match=key):
            load_config("sft", overrides=[bad])
