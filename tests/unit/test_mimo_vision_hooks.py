"""The vision tower keeps only the output-capturing hooks its features need (mimo/modules.py): compiled, each
of its layers is one graph (an attention-map hook inside the layer split it in two: slower than eager on GPU)."""

from __future__ import annotations

import torch

from automodel_mimo.mimo.modules import build_vision_module, capture_key
from tests.unit.mimo_oracle import VISION
from tests.unit.oracle import tiny_llama_config


def _capture_keys(module: torch.nn.Module) -> list[str]:
    return [key for hook in module._forward_hooks.values() if (key := capture_key(hook)) is not None]


def test_only_hidden_state_hooks_remain_and_a_compiled_layer_is_one_graph():
    from torch._dynamo.utils import counters

    vision = build_vision_module({**VISION, "num_hidden_layers": 2}, tiny_llama_config(), seed=11)
    layers = vision.layers_owner.layers
    assert all(_capture_keys(layer) == ["hidden_states"] for layer in layers)  # the features' layer outputs
    assert not [k for m in vision.modules() if m not in set(layers) for k in _capture_keys(m)]  # no attention maps
    pixels = torch.randn(3, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(0))
    eager = vision(pixels)
    torch._dynamo.reset()
    counters.clear()
    for layer in layers:
        layer.compile(backend="aot_eager")  # where train.compile splits graphs (inductor itself not needed)
    compiled = vision(pixels)
    compiled.square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 1  # the same layer code: one graph (two with the attention hook)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
