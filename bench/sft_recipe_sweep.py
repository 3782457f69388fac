"""Single-process replica of the SFT default recipe (same init, data order and optimizer as `automodel-mimo sft`),
for recipe sweeps over seeds: held-out greedy accuracy every --every steps, per-digit accuracy with --digits.
  python bench/sft_recipe_sweep.py --seed 8 train.max_steps=1000 model.config.num_attention_heads=8
Prints one JSON line: first step at >= 0.95 (first95), the accuracies, the seconds. See docs/benchmarks.md."""
import argparse
import json
import sys
import time

import torch

torch.set_num_threads(1)  # one process per core: sweeps run many seeds side by side
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from automodel_mimo.config import load_config
from automodel_mimo.models.tokenizer import build_default_tokenizer
from automodel_mimo.models.build import build_hf_config, build_model
from automodel_mimo.algorithms.sft import prepare_sft_data
from automodel_mimo.data.batching import global_batch_indices, collate
from automodel_mimo.optim import build_optimizer, lr_factor
from automodel_mimo.losses import token_logprobs

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=1234)
ap.add_argument("--every", type=int, default=50)
ap.add_argument("--neval", type=int, default=200)
ap.add_argument("--digits", action="store_true")
ap.add_argument("overrides", nargs="*")
a = ap.parse_args()
cfg = load_config("sft", None, [f"seed={a.seed}", "launch.nproc=1", *a.overrides])
tok = build_default_tokenizer()
data = prepare_sft_data(cfg, tok)
model = build_model(cfg.model, build_hf_config(cfg.model, tok), cfg.seed)
opt = build_optimizer(model.named_parameters(), cfg.train)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.train))
train, ev = data["train"], data["eval"]
pad = tok.pad_token_id
stops = torch.tensor(sorted(tok.all_special_ids))

@torch.no_grad()
def digit_acc():
    """teacher-forced accuracy per answer position (hundreds, tens, units, end) on eval rows"""
    rows = ev[:a.neval]
    mb = collate([{"input_ids": i, "labels": l} for i, l in zip(rows["input_ids"], rows["labels"])], pad)
    model.eval()
    pred = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.argmax(-1)
    model.train()
    lab = mb["labels"]; out = []
    for r in range(lab.shape[0]):
        pos = (lab[r] != -100).nonzero().flatten().tolist()
        out.append([int(pred[r, p] == lab[r, p]) for p in pos])
    t = torch.tensor(out, dtype=torch.float)
    return [round(x, 2) for x in t.mean(0).tolist()]

@torch.no_grad()
def evaluate():
    model.eval()
    correct = 0
    P, R = ev["prompt_ids"][:a.neval], ev["reference"][:a.neval]
    for b in range(0, len(P), 250):
        ps = P[b:b+250]
        w = max(map(len, ps))
        ids = torch.full((len(ps), w), pad); mask = torch.zeros_like(ids)
        for i, p in enumerate(ps):
            ids[i, w-len(p):] = torch.tensor(p); mask[i, w-len(p):] = 1
        done = torch.zeros(len(ps), dtype=torch.bool); out = []
        for _ in range(cfg.eval.max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1)-1).clamp(min=0)).logits
            nxt = logits[:, -1].argmax(-1); nxt = torch.where(done, pad, nxt); out.append(nxt)
            done |= torch.isin(nxt, stops)
            ids = torch.cat([ids, nxt[:, None]], 1); mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if done.all(): break
        toks = torch.stack(out, 1).tolist()
        for t, r in zip(toks, R[b:b+250]):
            cut = next((i for i, x in enumerate(t) if x in tok.all_special_ids), len(t))
            correct += tok.decode(t[:cut]).strip() == r.strip()
    model.train()
    return correct / len(P)

t0 = time.time(); accs = []; losses = []
for step in range(cfg.train.max_steps):
    idx = global_batch_indices(step, len(train), cfg.train.global_batch_size, cfg.seed)
    rows = train[idx]
    mb = collate([{"input_ids": i, "labels": l} for i, l in zip(rows["input_ids"], rows["labels"])], pad)
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    loss = -(token_logprobs(logits, mb["labels"]) * mb["loss_mask"]).sum() / mb["loss_mask"].sum()
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else 1e9)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    if (step + 1) % a.every == 0 or step + 1 == cfg.train.max_steps:
        accs.append(round(evaluate(), 3))
        if a.digits: print(step + 1, accs[-1], digit_acc(), round(sum(losses[-20:]) / 20, 3), flush=True)
        if len(accs) >= 2 and min(accs[-2:]) >= 0.99: break
first = next(((i + 1) * a.every for i, x in enumerate(accs) if x >= 0.95), None)
print(json.dumps({"first95": first, "seed": a.seed, "overrides": a.overrides, "acc": accs, "loss_last": round(sum(losses[-20:])/20, 4), "s": round(time.time()-t0)}), flush=True)
