"""The modules of a MIMO model besides the LLM: an HF vision tower and its projector (one MIMO module, one grid),
and the tower's tensor-parallel plan.

nemo has no TP plan for HF vision towers, so `vision_tp_plan` is ours (q/k/v and fc1 column-parallel,
out_proj and fc2 row-parallel, the projector likewise).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from automodel_mimo.errors import UserInputError


class Projector(nn.Module):
    """Two-layer MLP from the encoder's hidden size to the LLM's."""

    def __init__(self, in_size: int, out_size: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or out_size
        self.fc1, self.act, self.fc2 = nn.Linear(in_size, hidden), nn.GELU(), nn.Linear(hidden, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionModule(nn.Module):
    """An HF vision tower (SigLIP / CLIP vision model) and its projector: one MIMO module, one grid."""

    def __init__(self, encoder: nn.Module, projector: Projector):
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.config = encoder.config  # nemo's parallelizer checks heads against tp on it

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, C, H, W) -> (images, tokens_per_image, llm hidden)."""
        return self.projector(self.encoder(pixel_values=pixel_values).last_hidden_state)


COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")
ROW = ("self_attn.out_proj", "mlp.fc2")


def vision_tp_plan(module: VisionModule) -> dict:
    """TP plan of a SigLIP/CLIP vision tower + projector, from the module's own names (towers nest their
    layers differently across models and transformers versions): q/k/v and fc1 column-parallel, out_proj
    and fc2 row-parallel, so activations between blocks stay replicated."""
    plan = {}
    for name, _ in module.named_modules():
        if name.startswith("encoder.") and name.endswith(COLUMN):
            plan[name] = ColwiseParallel()
        elif name.startswith("encoder.") and name.endswith(ROW):
            plan[name] = RowwiseParallel()
    if not plan:
        raise UserInputError(f"mimo.encoder: no attention/MLP projections ({', '.join(COLUMN + ROW)}) found in "
                             f"{type(module.encoder).__name__}; its tensor-parallel plan is unknown, use tp=1 for it")
    return {**plan, "projector.fc1": ColwiseParallel(), "projector.fc2": RowwiseParallel()}


def build_vision_module(encoder_cfg: dict, llm_hidden: int, seed: int, projector_hidden: int | None = None) -> VisionModule:
    """From `{"pretrained": path}` (a vision-tower checkpoint, or a full CLIP/SigLIP one) or HF config kwargs
    with model_type (e.g. siglip_vision_model, clip_vision_model). Same seed -> same weights on every rank."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    cfg = dict(encoder_cfg)
    if cfg.get("pretrained"):
        config = AutoConfig.from_pretrained(cfg["pretrained"])
        config = getattr(config, "vision_config", config)
        cls = AutoModel._model_mapping[type(config)]
        encoder = cls.from_pretrained(cfg["pretrained"], config=config, dtype=torch.float32)
    else:
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise UserInputError("mimo.encoder.model_type: missing; e.g. siglip_vision_model or clip_vision_model")
        encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32)
    projector = Projector(encoder.config.hidden_size, llm_hidden, projector_hidden)
    return VisionModule(encoder, projector)
