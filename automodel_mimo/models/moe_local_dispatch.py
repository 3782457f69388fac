"""The experts' token dispatch when every expert is on this rank (ep = 1), without reading device values on the host.

nemo's grouped-GEMM path (`GroupedExperts._forward_grouped_mm`) selects this rank's (token, choice) pairs by
boolean-mask indexing and counts them with `bincount`; on CUDA both wait for the device, once per MoE layer per
forward, and the GPU idles while the host catches up (the one-GPU MoE step's kernels were ~580 ms of 1.08 s:
docs/benchmarks.md). With every expert local there is nothing to select: all pairs are sorted by expert, padding
tokens keep their experts at routing weight 0 (their rows then contribute exactly 0 to the output and to every
gradient), and the counts come from a scatter-add. The sizes depend on shapes only, so compiled layers neither
sync nor recompile on token counts. The math is nemo's non-bias path: x[sorted tokens], the weighted SwiGLU between
two grouped GEMMs (`_torch_mm_experts_fwd`), an fp32 scatter-add back. With ep > 1 (experts on other ranks), an
expert bias, MXFP8 or the router weight applied after the down projection, nemo's path runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def local_permutation(indices: torch.Tensor, weights: torch.Tensor, token_mask: torch.Tensor,
                      n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token of each pair, its fp32 routing weight — 0 for a masked token —, tokens per expert), pairs sorted by
    expert (stable: within an expert in token order, as nemo's)."""
    topk = indices.shape[1]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    probs = (weights.float() * token_mask.unsqueeze(-1)).reshape(-1)[order]
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order // topk, probs, counts


def use_local_dispatch(experts: nn.Module) -> None:
    """Route `experts`' grouped-GEMM forward through `local_permutation` whenever all its experts are local."""
    from nemo_automodel.components.moe.experts import _torch_mm_experts_fwd

    nemo_forward = experts._forward_grouped_mm

    def forward(x, token_mask, weights, indices, gate_and_up_projs, down_projs, gate_up_proj_bias, down_proj_bias,
                n_local_experts, experts_start_idx):
        if (n_local_experts != experts.n_routed_experts or gate_up_proj_bias is not None or experts.use_mxfp8
                or experts.config.apply_router_weight_after_down or x.shape[0] == 0):
            return nemo_forward(x, token_mask, weights, indices, gate_and_up_projs, down_projs, gate_up_proj_bias,
                                down_proj_bias, n_local_experts, experts_start_idx)
        tokens, probs, counts = local_permutation(indices, weights, token_mask, n_local_experts)
        out = _torch_mm_experts_fwd(x[tokens], gate_and_up_projs, down_projs, counts, probs.unsqueeze(-1),
                                    experts.expert_activation_grouped)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return y.scatter_add_(0, tokens.unsqueeze(1).expand_as(out), out.float())

    experts._forward_grouped_mm = forward
