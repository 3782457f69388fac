"""A LLaVA folder whose language model is a Qwen3-MoE (`model.pretrained`, docs/moe.md): built with transformers' own
classes, random init, saved by `save_pretrained` (experts one tensor per expert on disk). The MIMO LLM loads with nemo's
MoE layers holding the folder's experts: the trainer's logprobs on image prompts are transformers' LLaVA's under
language dp2 ep2 (equal dp) and cp2 ep2 (a fan-in from vision dp2), and one SFT step runs from the CLI under ep2
(fp32, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.models.tokenizer import IMAGE, build_default_tokenizer
from tests.unit.cli_runner import metrics, run_cli
from tests.unit.multirank import run_ranks
from tests.unit.oracle import TOL, rel_err

CPU = torch.device("cpu")
IMAGE_SIZE, PATCH = 32, 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2
EXPERTS = 8
# (name, layout, micro batch size): 2 ranks, every LLM rank holds EXPERTS / 2 experts
LAYOUTS = [("vision dp2, language dp2 ep2", {"vision": {"dp": 2}, "language": {"dp": 2, "ep": 2}}, 2),
           ("fan-in: vision dp2, language cp2 ep2", {"vision": {"dp": 2}, "language": {"cp": 2, "ep": 2}}, 2)]
IMAGES_PER_ROW = [1, 0, 2, 1]


def moe_llava_folder(path: Path) -> Path:
    """SigLIP tower (32 px, 8 px patches: 16 rows per image, all rows of the last layer) + projector + a Qwen3-MoE
    (8 experts, top-2, 2 sparse layers), the built-in tokenizer and its <|image|> token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen3MoeConfig, SiglipVisionConfig

    tok = build_default_tokenizer()
    text = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=EXPERTS,
                          num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.01,
                          vocab_size=-(-len(tok) // 8) * 8, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
                         image_seq_length=TOKENS_PER_IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return moe_llava_folder(tmp_path_factory.mktemp("moe_llava"))


def image_rows(image_token: int, seed: int = 3) -> list[dict]:
    """Prompt text, the image rows, response text; labels on every next token (so every position is compared)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in IMAGES_PER_ROW:
        text = lambda n: torch.randint(4, 60, (n,), generator=g)  # noqa: E731 (plain byte tokens)
        ids = torch.cat([text(3), torch.full((k * TOKENS_PER_IMAGE,), image_token), text(int(torch.randint(3, 8, (1,), generator=g)))])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:-1] = ids[1:]
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(),
                     "pixel_values": torch.randn(k, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)})
    return rows


def _reference_from_folder(model, path: str, microbatches: list[dict], initial: list[torch.Tensor]) -> float:
    """dpo.reference=<the folder> of a moved policy: its reference logprobs are the folder's (experts included)."""
    from policies.policy import Policy
    from tests.unit.oracle import train_config

    policy = Policy(model, train_config("sgd", 0.0, 4, 2))
    model.reshard()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    policy.init_reference(model.hf_state(path, "dpo.reference"))
    reference = policy.reference_logprobs(microbatches)
    assert min(rel_err(m, i) for m, i in zip(policy.logprobs(microbatches), initial)) > TOL  # the policy moved
    return max(rel_err(r, i) for r, i in zip(reference, initial))


def _trainer_logprobs(path: str, rows: list[dict]) -> dict:
    """Per layout: this rank's rows' label logprobs from the MIMO handle (model.pretrained's loader), and its experts."""
    from automodel_mimo.data.batching import local_slice
    from automodel_mimo.data.microbatches import MicrobatchBuilder
    from automodel_mimo.mimo.handle import MimoHandle
    from automodel_mimo.mimo.llava import load_llava
    from automodel_mimo.models import packed_attention
    from automodel_mimo.models.moe import moe_layers

    out = {}
    for name, layout, micro in LAYOUTS:
        cp = layout["language"].get("cp", 1)
        vision, llm = load_llava(path, packed_attention.NAME if cp > 1 else "sdpa")
        n_moe = len(moe_layers([llm]))
        model = MimoHandle({"vision": vision}, llm, layout, CPU, vision.llava_config.image_token_index,
                           TOKENS_PER_IMAGE, global_batch_size=len(rows))
        block, blocks = model.data_block()
        builder = MicrobatchBuilder(0, CPU, cp=model.cp_size, pad_multiple=model.pad_multiple,
                                    rows_multiple=model.rows_multiple())
        local = local_slice(rows, block, blocks)
        microbatches = builder.build(local, micro)
        initial = model.logprobs(microbatches)
        logprobs = [row for lp in initial for row in lp]  # whole rows, padded
        reference_error = _reference_from_folder(model, path, microbatches, initial)
        experts = {tuple(p.to_local().shape) for n, p in model.named_parameters()
                   if n.endswith("experts.gate_and_up_projs") and isinstance(p, DTensor)}
        out[name] = {"rows": list(range(block * len(local), (block + 1) * len(local))), "logprobs": logprobs,
                     "moe_layers": n_moe, "local_experts": experts, "reference_error": reference_error}
        model.destroy()
    return out


def test_llava_folder_with_an_moe_llm_gives_transformers_logprobs_under_ep2(folder):
    from transformers import LlavaForConditionalGeneration

    from tests.unit.mimo_oracle import mimo_collate

    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    rows = image_rows(llava.config.image_token_index)
    batch = mimo_collate(rows)
    with torch.no_grad():
        logits = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits.float()
    labels = batch["labels"]
    ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != IGNORE_INDEX)
    per_rank = run_ranks(_trainer_logprobs, 2, str(folder), rows)
    for name, _, _ in LAYOUTS:
        for rank, result in enumerate(per_rank):
            got = result[name]
            assert got["moe_layers"] == 2, (name, got["moe_layers"])  # the folder's sparse blocks: nemo's MoE
            assert got["local_experts"] == {(EXPERTS // 2, 32, 32)}, (name, got["local_experts"])
            assert got["reference_error"] < TOL, (name, rank, got["reference_error"])
            for i, row in zip(got["rows"], got["logprobs"]):
                length = len(rows[i]["input_ids"])
                err = rel_err(row[:length], ref[i, :length])
                assert err < TOL, (name, rank, i, err)
                assert float(row[length:].abs().sum()) == 0.0


@pytest.mark.slow  # ~25 s; the loading itself is proven by the logprob test above
def test_one_sft_step_from_the_cli_on_a_llava_folder_with_an_moe_llm(folder, tmp_path):
    """mimo.layout.language.ep with model.pretrained (refused before): one step, router metrics, a LLaVA export."""
    from transformers import LlavaForConditionalGeneration

    r = run_cli("sft", "--config", "configs/mimo_sft_tiny.yaml", f"model.pretrained={folder}", "mimo.layout.language.tp=1",
                "mimo.layout.language.dp=2", "mimo.layout.language.ep=2", "data.num_train=16", "data.num_eval=4",
                "train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=0", "train.max_steps=1",
                "eval.every_steps=0", "logging.progress=false", "logging.tensorboard=false", f"output_dir={tmp_path}",
                timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "language: dp=2 tp=1 cp=1 pp=1 ep=2" in r.stdout, r.stdout
    rows = [row for row in metrics(tmp_path) if "loss" in row]
    assert [row["step"] for row in rows] == [1] and rows[0]["loss"] > 0 and rows[0]["moe_aux_loss"] > 0, rows
    trained = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    start = LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
    assert trained.keys() == start.keys()
    for name in ("model.language_model.layers.0.mlp.experts.gate_up_proj", "model.language_model.layers.1.mlp.gate.weight"):
        assert not torch.equal(trained[name], start[name]), name  # the step moved the loaded experts and router


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_ep_that_a_llava_folders_llm_cannot_take_is_one_clear_line(folder, tmp_path, kind):
    """A dense LLM has no experts to split; 3 ranks of ep do not divide the MoE folder's 8 experts."""
    from tests.unit.test_mimo_llava import _llava_folder

    if kind == "dense":
        source, layout = _llava_folder(tmp_path / "llava"), ["mimo.layout.language.dp=2", "mimo.layout.language.ep=2",
                                                             "train.micro_batch_size=32"]
        expected = "mimo.layout.language.ep=2 needs a mixture-of-experts language model; this one is a llama"
    else:
        source, layout = folder, ["launch.nproc=3", "mimo.layout.vision.dp=3", "mimo.layout.language.dp=3",
                                  "mimo.layout.language.ep=3", "train.global_batch_size=48", "train.micro_batch_size=16"]
        expected = "mimo.layout.language.ep=3 must divide the model's num_experts=8"
    r = run_cli("sft", "--config", "configs/mimo_sft_tiny.yaml", f"model.pretrained={source}", "mimo.layout.language.tp=1",
                *layout, f"output_dir={tmp_path / 'run'}", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("note:")]
    assert expected in r.stderr and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
