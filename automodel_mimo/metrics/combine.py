"""How per-microbatch metric shares combine: `*_min` by min, `*_max` by max, everything else summed."""

from __future__ import annotations


def combine_metrics(metrics: list[dict]) -> dict:
    """Per-microbatch metric dicts -> one: `*_min` by min, `*_max` by max, everything else summed."""
    out: dict = {}
    for m in metrics:
        for k, v in m.items():
            v = float(v)
            if k not in out:
                out[k] = v
            elif k.endswith("_min"):
                out[k] = min(out[k], v)
            elif k.endswith("_max"):
                out[k] = max(out[k], v)
            else:
                out[k] += v
    return out
