"""models/moe_local_dispatch.py: the sync-free expert dispatch (every expert local) equals nemo's grouped-GEMM path,
outputs and gradients, with padding tokens masked out."""

from __future__ import annotations

import torch

from automodel_mimo.models.moe import backend, moe_config, weighted_swiglu
from automodel_mimo.models.moe_local_dispatch import local_permutation, use_local_dispatch
from tests.unit.test_moe import moe_config as tiny_qwen3_moe


def _experts(local: bool):
    from nemo_automodel.components.moe.experts import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(moe_config(tiny_qwen3_moe()), backend=backend())
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    experts.expert_activation_grouped = weighted_swiglu
    if local:
        use_local_dispatch(experts)
    return experts


def _run(local: bool, x, mask, weights, indices):
    experts = _experts(local)
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    y = experts(x, mask, weights, indices)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, weights.grad, {n: p.grad for n, p in experts.named_parameters()}


def test_local_dispatch_equals_nemos_grouped_mm_path(monkeypatch):
    from automodel_mimo.models import moe_local_dispatch

    calls = []
    monkeypatch.setattr(moe_local_dispatch, "local_permutation",
                        lambda *a: calls.append(1) or local_permutation(*a))  # the local path did run
    torch.manual_seed(1)
    tokens, experts, k = 24, tiny_qwen3_moe().num_experts, tiny_qwen3_moe().num_experts_per_tok
    x = torch.randn(tokens, tiny_qwen3_moe().hidden_size)
    indices = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    mask = torch.ones(tokens, dtype=torch.bool)
    mask[[3, 10, 11, 23]] = False  # padding
    ours, nemo = _run(True, x, mask, weights, indices), _run(False, x, mask, weights, indices)
    assert calls == [1]
    for a, b in zip(ours[:3], nemo[:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours[3].keys() == nemo[3].keys()
    for name in ours[3]:
        torch.testing.assert_close(ours[3][name], nemo[3][name], rtol=1e-6, atol=1e-6)
    assert ours[0][~mask].abs().max() == 0 and ours[1][~mask].abs().max() == 0  # padding: no output, no gradient


def test_local_permutation_sorts_pairs_by_expert_and_counts_them():
    indices = torch.tensor([[2, 0], [1, 2], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    tokens, probs, counts = local_permutation(indices, weights, torch.tensor([True, False, True]), 3)
    assert tokens.tolist() == [0, 2, 1, 2, 0, 1]  # expert 0: tokens 0, 2; expert 1: 1, 2; expert 2: 0, 1
    torch.testing.assert_close(probs, torch.tensor([0.4, 0.5, 0.0, 0.5, 0.6, 0.0]))  # token 1 masked: weight 0
    assert counts.tolist() == [2, 2, 2]
