"""`hf` generator backend: an own sampling loop with a KV cache over a transformers model.

The model is the generator's OWN inference copy (loaded from the HF folder the trainer exported at
setup), never the training modules; refits copy streamed tensors into it. The n samples of a prompt
decode together as one batch (equal lengths, so no padding); prompts run one after another. Logprobs
follow the convention of automodel_mimo.generation.sampling (temperature and top-p applied).
A LLaVA folder (a MIMO model's export) is served by transformers' LlavaForConditionalGeneration: a prompt's
images (pixel values as the trainer preprocesses them) go into the first forward, whose vision tower and
projector fill the prompt's placeholder positions; later steps read the KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from automodel_mimo.generation.generator import Generator
from automodel_mimo.generation.sampling import Generation, SamplingParams


def sampling_logprobs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """log of the distribution tokens are drawn from: logits / T without the banned tokens, top-p truncated
    and renormalized."""
    logits = logits.float()
    if sampling.banned_token_ids:
        logits = logits.index_fill(-1, torch.tensor(sampling.banned_token_ids, device=logits.device), float("-inf"))
    logp = torch.log_softmax(logits / sampling.logprob_temperature, dim=-1)
    if sampling.top_p < 1.0 and sampling.temperature > 0:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the tokens ranked above
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= sampling.top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


class HFGenerator(Generator):
    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        llava = isinstance(AutoConfig.from_pretrained(model_path), LlavaConfig)
        model_class = LlavaForConditionalGeneration if llava else AutoModelForCausalLM
        self.model = model_class.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device, self.takes_images = torch.device(device), llava

    def parameter_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(p.shape), p.dtype) for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def update_weights(self, stream: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in stream:
            params[name].copy_(tensor)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, images=None) -> list[Generation]:
        if images is not None and not self.takes_images:
            raise ValueError("prompts with images need a LLaVA folder (a MIMO model's export); this model is a causal LM")
        rng = torch.Generator(self.device)
        rng.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ())))
        out = []
        for i, prompt in enumerate(prompts):
            out.extend(self._sample(i, prompt, sampling, rng, images[i] if images is not None else None))
        return out

    def _sample(self, index: int, prompt: list[int], sampling: SamplingParams, rng: torch.Generator,
                pixels: torch.Tensor | None = None) -> list[Generation]:
        n = sampling.n
        ids = torch.tensor([prompt] * n, device=self.device)
        first = {}  # the prompt's images, each sample's copy: consumed by the first forward (the prompt's)
        if pixels is not None and len(pixels):
            first["pixel_values"] = pixels.to(self.device, self.model.dtype).repeat(n, 1, 1, 1)
        stop = torch.tensor(sampling.stop_token_ids, device=self.device, dtype=torch.long)
        tokens, logprobs = [], []
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        finished_at = torch.full((n,), sampling.max_new_tokens, device=self.device)
        past = None
        for step in range(sampling.max_new_tokens):
            result = self.model(input_ids=ids, past_key_values=past, use_cache=True, **(first if step == 0 else {}))
            past = result.past_key_values
            logp = sampling_logprobs(result.logits[:, -1], sampling)
            if sampling.temperature == 0:
                nxt = logp.argmax(-1)
            else:
                nxt = torch.multinomial(logp.exp(), 1, generator=rng)[:, 0]
            tokens.append(nxt)
            logprobs.append(logp.gather(-1, nxt[:, None])[:, 0])
            hit = torch.isin(nxt, stop) & ~done
            finished_at = torch.where(hit, step + 1, finished_at)
            done |= hit
            if bool(done.all()):
                break
            ids = nxt[:, None]
        tokens, logprobs = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
        return [Generation(index, tokens[r][:int(finished_at[r])], logprobs[r][:int(finished_at[r])],
                           "stop" if bool(done[r]) else "length") for r in range(n)]
