"""The modules of a MIMO model besides the LLM: an HF vision tower and LLaVA's projector (one MIMO module, one
grid), and the tower's tensor-parallel plan.

nemo has no TP plan for HF vision towers, so `vision_tp_plan` is ours (q/k/v and fc1 column-parallel,
out_proj and fc2 row-parallel, the projector's linear_1 / linear_2 likewise).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from automodel_mimo.errors import UserInputError


def _drop_unused_capture_hooks(encoder: nn.Module) -> None:
    """transformers captures `output_hidden_states` (the features' layer) with forward hooks, and installs one for
    every output its model can record: also on each attention module, for attention maps nothing here asks for.
    Each hook reads a ContextVar, which torch.compile cannot trace: under train.compile the one inside a layer
    (attention) split every compiled layer into two graphs, and the compiled tower ran slower than eager on one
    H200 (docs/benchmarks.md). Only the hidden-state hooks (on the layers' outputs) are kept."""
    for module in encoder.modules():
        for handle_id, hook in list(module._forward_hooks.items()):
            if capture_key(hook) not in (None, "hidden_states"):
                del module._forward_hooks[handle_id]


def capture_key(hook) -> str | None:
    """The output a transformers output-capturing forward hook records ("hidden_states", "attentions", ...), read
    from its closure; None for any other hook."""
    if getattr(hook, "__name__", "") != "output_capturing_hook":
        return None
    return dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__ or ()))).get("key")


class VisionModule(nn.Module):
    """An HF vision tower (SigLIP / CLIP vision model) and LLaVA's projector (linear-GELU-linear to the LLM's
    hidden size): one MIMO module, one grid. The features are LLaVA's (`LlavaModel.get_image_features`): the
    tower's hidden states after `vision_feature_layer` (before any post-layernorm), without the first (CLS) row
    under `vision_feature_select_strategy="default"`, so the module is exactly the image path of
    `LlavaForConditionalGeneration` built from `llava_config` (mimo/llava.py exports and loads it)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, llava_config):
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.llava_config = llava_config  # feature layer(s) and strategy; the export's config
        self.config = encoder.config  # nemo's parallelizer checks heads against tp on it
        self._freeze_unused()  # its forward also installs transformers' output-capturing hooks
        _drop_unused_capture_hooks(self.encoder)

    def _freeze_unused(self) -> None:
        """Freeze the tower's parameters that LLaVA's features never reach (its post-layernorm, a pooling head,
        layers after the feature layer), found by autograd on a blank image: they would never get a gradient,
        so their optimizer state would exist on a fresh optimizer only and a checkpoint could not resume."""
        c = self.config
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        blank = torch.zeros(1, c.num_channels, c.image_size, c.image_size)
        with torch.enable_grad():  # also when built under no_grad
            grads = torch.autograd.grad(self(blank).sum(), params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                p.requires_grad_(False)

    @property
    def layers_owner(self) -> nn.Module:
        """The tower's module holding its transformer layers as `.layers` (SigLIP, CLIP: `.encoder` under transformers 5,
        `.vision_model.encoder` under 4.x), where train.compile finds them (models/build.py `compile_layers`; nemo looks
        at the root only, then guesses)."""
        owners = [m for m in self.encoder.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)]
        if len(owners) != 1:
            raise UserInputError(f"train.compile: {len(owners)} layer lists (.layers) found in the vision tower "
                                 f"{type(self.encoder).__name__}, expected one; set train.compile=false")
        return owners[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, C, H, W) -> (images, tokens_per_image, llm hidden)."""
        hidden = self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        layer = self.llava_config.vision_feature_layer
        drop = 1 if self.llava_config.vision_feature_select_strategy == "default" else 0
        layers = [layer] if isinstance(layer, int) else layer
        return self.projector(torch.cat([hidden[i][:, drop:] for i in layers], -1))


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
    return {**plan, "projector.linear_1": ColwiseParallel(), "projector.linear_2": RowwiseParallel()}


def build_vision_module(encoder_cfg: dict, text_config, seed: int, vision_feature_layer: int | list[int] = -1,
                        vision_feature_select_strategy: str = "full") -> VisionModule:
    """From `{"pretrained": path}` (a vision-tower checkpoint, or a full CLIP/SigLIP one) or HF config kwargs
    with model_type (e.g. siglip_vision_model, clip_vision_model), and the LLM's config `text_config`.
    Same seed -> same weights on every rank."""
    from transformers import AutoConfig, AutoModel, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

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
    # from dicts: LlavaConfig resets the attention implementation of the config objects it is given
    llava = LlavaConfig(vision_config=encoder.config.to_dict(), text_config=text_config.to_dict(),
                        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy)
    return VisionModule(encoder, LlavaMultiModalProjector(llava), llava)
