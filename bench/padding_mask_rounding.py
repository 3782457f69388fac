"""Does dropping the padding mask change a right-padded causal LM's numbers? (CPU, fp32, one process.)

  python bench/padding_mask_rounding.py

transformers' Llama (SDPA) on right-padded rows, once with the padding mask and once without (causal only), at the
embedded defaults' LLM shapes: the real tokens' logits (bitwise?) and every parameter's gradient of a loss on them
(largest relative difference). Rows are right-padded, so no real token attends a pad either way: any difference is
the kernels' rounding, not the attention pattern (docs/benchmarks.md, "The padded path now drops the padding mask").
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# (heads, kv heads, tokens per row, rows): the MIMO default's LLM (4 / 2 heads; 2 / 1 per rank under tp2)
SHAPES = [(4, 2, 40, 4), (2, 1, 40, 4), (4, 2, 34, 32), (2, 1, 34, 32), (2, 1, 70, 8)]


def compare(heads: int, kv: int, tokens: int, rows: int) -> tuple[bool, float]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=32, max_position_embeddings=128,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).float()
    lengths = torch.randint(tokens // 2, tokens + 1, (rows,))
    lengths[0] = tokens
    mask = (torch.arange(tokens)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 300, (rows, tokens)) * mask
    positions = torch.arange(tokens).expand(rows, -1)

    def run(with_mask: bool):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask if with_mask else None, position_ids=positions).logits
        real = logits[mask.bool()]
        real.log_softmax(-1)[:, 5].sum().backward()
        return real.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (a, ga), (b, gb) = run(True), run(False)
    return torch.equal(a, b), max(((ga[n] - gb[n]).norm() / gb[n].norm()).item() for n in ga)


def main() -> None:
    print(f"torch {torch.__version__}")
    for shape in SHAPES:
        same, rel = compare(*shape)
        print(f"heads {shape[0]}/{shape[1]}, {shape[2]} tokens x {shape[3]} rows: logits bitwise equal {same}, "
              f"largest relative gradient difference {rel:.1e}")


if __name__ == "__main__":
    main()
