"""Routing agreement between an MoE model's trainer and its generator, on the generator's own samples (docs/moe.md).

  python bench/moe_routing_agreement.py <hf folder of a Qwen3-MoE run> [--dtype bfloat16] [--prompts 32]

The generator is the hf backend (transformers' Qwen3-MoE, KV-cached decoding at `--dtype`), sampling 2-digit
addition prompts at temperature 1; the trainer's routes come from the trainer's model (nemo's MoE layers, fp32,
one process) on each whole sampled sequence. For every sampled token (the positions whose logits give the sampled
tokens' logprobs) and every MoE layer, the top-k expert sets of the two routers are compared.
"""

from __future__ import annotations

import argparse
import copy

import torch

from automodel_mimo.generation import SamplingParams
from automodel_mimo.generation.hf_backend import HFGenerator
from automodel_mimo.models.moe import build_moe_model
from automodel_mimo.models.tokenizer import build_default_tokenizer


def generator_routes(gen: HFGenerator, prompts: list[list[int]], n: int, new: int) -> list[tuple[list[int], torch.Tensor]]:
    """(sequence, [layers, positions, k] expert ids) of every sample, the routes the generator took while sampling."""
    k = gen.model.config.num_experts_per_tok
    calls = {i: [] for i in range(len(gen.model.model.layers))}
    for i, layer in enumerate(gen.model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: calls[i].append(out[2].clone()))
    samples = []
    for p in prompts:
        for c in calls.values():
            c.clear()
        for j, g in enumerate(gen.generate([p], SamplingParams(temperature=1.0, max_new_tokens=new, n=n, seed=len(samples)))):
            # the prompt's forward, then one decode step per further token: positions 0 .. len(seq) - 2
            routes = [torch.cat([c[0].view(n, len(p), k)[j], *(c[s].view(n, k)[j][None] for s in range(1, len(g.token_ids)))])
                      for c in calls.values()]
            samples.append((p + g.token_ids, torch.stack(routes), len(g.token_ids)))
    return samples


def trainer_routes(seq: list[int], model, got: dict) -> torch.Tensor:
    """[layers, positions, k] expert ids of the trainer's routers on a whole sequence (`got`: filled by hooks)."""
    model(torch.tensor([seq]))
    return torch.stack([got[i][: len(seq) - 1] for i in range(len(got))])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    args = parser.parse_args()
    tok = build_default_tokenizer()
    g = torch.Generator().manual_seed(0)
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in torch.randint(10, 100, (args.prompts, 2), generator=g).tolist()]
    samples = generator_routes(HFGenerator(args.folder, dtype=getattr(torch, args.dtype)), prompts, args.samples,
                               args.max_new_tokens)
    trainer = build_moe_model(copy.deepcopy(HFGenerator(args.folder).model)).eval()
    got = {}
    for i, layer in enumerate(trainer.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out[1].clone()))
    pairs = differ_pairs = tokens = differ_tokens = 0
    with torch.no_grad():
        for seq, routes, generated in samples:
            mine = trainer_routes(seq, trainer, got)
            differ = (mine.sort(-1).values != routes.sort(-1).values).any(-1)[:, -generated:]  # [layers, sampled tokens]
            pairs, differ_pairs = pairs + differ.numel(), differ_pairs + int(differ.sum())
            tokens, differ_tokens = tokens + differ.shape[1], differ_tokens + int(differ.any(0).sum())
    print(f"generator {args.dtype}: {len(samples)} samples, {tokens} sampled tokens x {len(got)} layers: top-k set differs "
          f"in {differ_pairs}/{pairs} = {differ_pairs / pairs:.2%} (token, layer) pairs; tokens with any layer "
          f"differing {differ_tokens}/{tokens} = {differ_tokens / tokens:.2%}")


if __name__ == "__main__":
    main()
