"""MIMO models in transformers' LLaVA layout (mimo/llava.py): the export is a LlavaForConditionalGeneration folder
that plain transformers loads with the trainer's logits, it loads back as a MIMO model bit for bit, a LLaVA folder
built with transformers' own classes trains through the CLI under a heterogeneous layout, and a bad
model.pretrained is one line, exit 2, before any rank starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from automodel_mimo.models.tokenizer import IMAGE, build_default_tokenizer
from tests.unit.cli_runner import metrics, run_cli
from tests.unit.mimo_oracle import PLACEHOLDER, TOKENS_PER_IMAGE, build_modules, mimo_collate, mimo_rows
from tests.unit.oracle import full, full_params, rel_err

CPU = torch.device("cpu")
LAYOUT = {"vision": {"dp": 2}, "language": {"tp": 2}}  # fan-in: each rank encodes half of the images
CONFIG = ("--config", "configs/mimo_sft_tiny.yaml")
SHORT = ["data.num_train=64", "data.num_eval=6", "train.global_batch_size=8", "train.micro_batch_size=4",
         "train.warmup_steps=0", "eval.every_steps=2", "eval.max_new_tokens=3", "eval.batch_size=4",
         "logging.progress=false", "logging.tensorboard=false"]


def test_names_map_every_llava_parameter_both_ways():
    from transformers import LlavaForConditionalGeneration

    from automodel_mimo.mimo.llava import export_config, from_llava, to_llava

    encoders, llm = build_modules()
    ours = {**{f"vision.{k}": v for k, v in encoders["vision"].state_dict().items()},
            **{f"language.{k}": v for k, v in llm.state_dict().items()}}
    config = export_config(encoders["vision"].llava_config, encoders["vision"].encoder.config, llm.config, PLACEHOLDER, TOKENS_PER_IMAGE)
    with torch.device("meta"):
        theirs = LlavaForConditionalGeneration(config).state_dict()
    mapped = to_llava(ours, "vision")
    assert mapped.keys() == theirs.keys()
    assert all(mapped[k].shape == theirs[k].shape for k in theirs)
    assert from_llava(mapped, "vision").keys() == ours.keys()


def _export_and_reload(out: str) -> dict:
    """The trainer's logits on an image batch (vision dp2 + language tp2), its HF export, and the export loaded
    back as a MIMO model (model.pretrained's path) under the same layout."""
    from automodel_mimo.checkpoint import export_hf
    from automodel_mimo.mimo.handle import MimoHandle
    from automodel_mimo.mimo.llava import load_llava

    encoders, llm = build_modules()
    model = MimoHandle(encoders, llm, LAYOUT, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=8)
    batch = mimo_collate(mimo_rows(seed=5))  # 8 rows with 0-2 images each, right-padded
    model.eval()
    with torch.no_grad():
        logits, _ = model._forward(batch)
    logits = full(logits)
    exported = full_params(model.named_parameters())
    export_hf(model, build_default_tokenizer(), Path(out) / "hf")
    model.destroy()
    vision, llm = load_llava(str(Path(out) / "hf"))
    reloaded = MimoHandle({"vision": vision}, llm, LAYOUT, CPU, PLACEHOLDER, TOKENS_PER_IMAGE, global_batch_size=8)
    loaded = full_params(reloaded.named_parameters())
    reloaded.destroy()
    return {"logits": logits, "batch": batch, "exported": exported, "loaded": loaded} if dist.get_rank() == 0 else {}


def test_export_is_a_llava_folder_with_the_trainers_logits_and_loads_back_bit_identical(tmp_path):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from tests.unit.multirank import run_ranks

    result = run_ranks(_export_and_reload, 2, str(tmp_path))[0]
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")  # plain transformers, no processor
    batch = result["batch"]
    assert int(batch["pixel_values"].shape[0]) == 7 and int((batch["input_ids"] == PLACEHOLDER).sum()) == 7 * TOKENS_PER_IMAGE
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"]).logits
    real = batch["attention_mask"].bool()
    assert rel_err(logits[real], result["logits"][real]) < 1e-5, rel_err(logits[real], result["logits"][real])
    assert hf.config.image_token_id == PLACEHOLDER and hf.config.image_seq_length == TOKENS_PER_IMAGE
    assert (hf.config.vision_feature_layer, hf.config.vision_feature_select_strategy) == (-1, "full")

    exported, loaded = result["exported"], result["loaded"]
    assert exported.keys() == loaded.keys()
    assert [k for k in exported if not torch.equal(exported[k], loaded[k])] == []
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "language")  # the LLM alone, for text-only tools


def _llava_folder(path: Path, model_type: str = "llava", image_token: int | None = None, tower: str = "siglip",
                  lm: str = "llama", new_token: str | None = None, vocab_multiple: int = 8) -> Path:
    """A tiny LLaVA checkpoint made with transformers' own classes and random weights: a SigLIP tower (all rows)
    or a CLIP one (without its CLS row, as llava-1.5), 32 px images in 8 px patches (16 rows), features of
    the second-to-last layer, a Llama or Qwen2 LM, the built-in tokenizer (plus `new_token` as the image token,
    as llava-hf's <image>); or a plain Llama folder (model_type="llama")."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

    tok = build_default_tokenizer()
    if new_token:
        tok.add_tokens([new_token], special_tokens=True)
        image_token = tok.convert_tokens_to_ids(new_token)
    text = {"llama": LlamaConfig, "qwen2": Qwen2Config}[lm](
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=-(-len(tok) // vocab_multiple) * vocab_multiple, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                 patch_size=8)
    vision = SiglipVisionConfig(**sizes, vision_use_head=False) if tower == "siglip" else CLIPVisionConfig(**sizes)
    image_token = tok.convert_tokens_to_ids(IMAGE) if image_token is None else image_token
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=16,
                         vision_feature_layer=-2, vision_feature_select_strategy="full" if tower == "siglip" else "default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config) if model_type == "llava" else LlamaForCausalLM(text)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("tower,lm,token", [("siglip", "llama", None), ("clip", "qwen2", "<image>")])
def test_a_transformers_llava_folder_trains_from_the_cli_and_its_export_loads_again(tmp_path, tower, lm, token):
    """<image>: the checkpoint's own image token; the data's <|image|> markers are written as it."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from automodel_mimo.mimo.llava import load_llava

    source = _llava_folder(tmp_path / "llava", tower=tower, lm=lm, new_token=token)
    out = tmp_path / "run"
    r = run_cli("sft", *CONFIG, *SHORT, f"model.pretrained={source}", f"output_dir={out}", "train.max_steps=1",
                timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vision: dp=2 tp=1 cp=1 pp=1, language: dp=1 tp=2 cp=1 pp=1" in r.stdout
    assert "the mimo.encoder entries are ignored" in r.stderr
    rows = metrics(out)
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [1] and train[0]["loss"] > 0
    assert [row["eval/num_samples"] for row in rows if "eval/accuracy" in row] == [6]

    hf = LlavaForConditionalGeneration.from_pretrained(out / "hf")
    start = LlavaForConditionalGeneration.from_pretrained(source)
    assert hf.config.image_token_id == AutoTokenizer.from_pretrained(out / "hf").convert_tokens_to_ids(token or IMAGE)
    differ = {k for k, v in hf.config.to_dict().items() if start.config.to_dict().get(k) != v}
    assert differ <= {"_name_or_path", "text_config"}, differ  # tower, feature selection, image token (text: below)
    assert all(getattr(hf.config.text_config, k) == getattr(start.config.text_config, k)
               for k in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"))
    trained, initial = hf.state_dict(), start.state_dict()
    assert trained.keys() == initial.keys()
    for name in ("model.multi_modal_projector.linear_1.weight", "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                 "model.language_model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        assert not torch.equal(trained[name], initial[name]), name  # one step was taken on every module
    unused = "model.vision_tower.encoder.layers.2.mlp.fc1.weight"  # after the feature layer: kept as loaded
    assert torch.equal(trained[unused], initial[unused])
    vision, llm = load_llava(str(out / "hf"))  # model.pretrained's loader
    assert torch.equal(vision.projector.linear_1.weight, trained["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(llm.lm_head.weight, trained["lm_head.weight"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {"llama": _llava_folder(root / "llama", model_type="llama"), "llava": _llava_folder(root / "llava"),
            "byte_token": _llava_folder(root / "byte_token", image_token=ord("b")),
            "no_token": _llava_folder(root / "no_token", image_token=5000),
            "odd_vocab": _llava_folder(root / "odd_vocab", new_token="<image>", vocab_multiple=1)}


@pytest.mark.parametrize("folder,overrides,expected", [
    ("llama", [], "is a llama checkpoint; under mimo it must be a transformers LLaVA folder"),
    ("llava", ["mimo.tokens_per_image=12"], "mimo.tokens_per_image=12, but the LLaVA folder's siglip_vision_model tower "
                                            "(vision_feature_select_strategy=full) yields 16 rows per image; set "
                                            "mimo.tokens_per_image=16"),
    ("byte_token", [], "its image token 'b' (image_token_index=98) is not a special token of the tokenizer"),
    ("no_token", [], "its image_token_index=5000 is not a token of the tokenizer"),
    ("odd_vocab", [], "mimo.layout.language.tp=2 must divide the LLM's vocab_size=265"),
])
def test_bad_pretrained_folders_are_one_line(folders, tmp_path, folder, overrides, expected):
    r = run_cli("sft", *CONFIG, f"model.pretrained={folders[folder]}", f"output_dir={tmp_path / 'out'}", *overrides,
                timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()  # stopped before any rank started


def test_a_llava_checkpoint_missing_weights_is_an_error_not_a_random_init(tmp_path):
    """transformers only reports missing weights (and initializes them at random): load_llava refuses."""
    from safetensors.torch import load_file, save_file

    from automodel_mimo.errors import UserInputError
    from automodel_mimo.mimo.llava import load_llava

    folder = _llava_folder(tmp_path / "llava")
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if "multi_modal_projector.linear_1.weight" in k)
    save_file({k: v for k, v in weights.items() if k != key}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserInputError, match="1 weights of its LLaVA config are missing from its checkpoint"):
        load_llava(str(folder))
