"""A bar chart (PNG) of MFU per variant from bench/sft_throughput.py results, one group per results file.

  python bench/plot_mfu.py docs/img/sft_mfu.png results_1b.json results_8b.json

Pillow only (the project has no plotting dependency); the numbers are printed on the bars.
"""

from __future__ import annotations

import json
import sys

from PIL import Image, ImageDraw, ImageFont

COLORS = {"ours": (120, 150, 200), "ours_compile": (30, 80, 170), "plain": (200, 160, 110), "plain_compile": (170, 100, 30)}
W, H, TOP, BOTTOM, LEFT = 900, 420, 50, 70, 60


def main(out: str, paths: list[str]) -> None:
    groups = []
    for path in paths:
        r = json.load(open(path))
        label = f"{r['model']}  ({r['rows']}x{r['seq']} tok/step, {r['micro']} row/mb{', AC' if r['ac'] else ''})"
        groups.append((label, {k: v["mfu"] for k, v in r["variants"].items() if "mfu" in v}))
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    top_mfu = 0.6
    y = lambda mfu: H - BOTTOM - (H - TOP - BOTTOM) * mfu / top_mfu  # noqa: E731
    for tick in (0.1, 0.2, 0.3, 0.4, 0.5):
        draw.line([(LEFT, y(tick)), (W - 10, y(tick))], fill=(225, 225, 225))
        draw.text((10, y(tick) - 8), f"{tick:.0%}", fill="black", font=font)
    draw.line([(LEFT, y(0.45)), (W - 10, y(0.45))], fill=(200, 40, 40))
    draw.text((W - 120, y(0.45) - 18), "target 45%", fill=(200, 40, 40), font=font)
    group_w = (W - LEFT - 20) / len(groups)
    for g, (label, mfus) in enumerate(groups):
        x0 = LEFT + g * group_w + 20
        bar_w = (group_w - 40) / max(1, len(mfus))
        for i, (name, mfu) in enumerate(mfus.items()):
            x = x0 + i * bar_w
            draw.rectangle([x, y(mfu), x + bar_w - 6, y(0)], fill=COLORS.get(name, (128, 128, 128)))
            draw.text((x + 2, y(mfu) - 18), f"{mfu:.1%}", fill="black", font=font)
            draw.text((x + 2, y(0) + 4), name.replace("_", " "), fill="black", font=ImageFont.load_default(size=12))
        draw.text((x0, H - 30), label, fill="black", font=font)
    draw.text((LEFT, 12), "SFT MFU on one H200 (bf16 compute, fp32 master weights): this trainer vs a plain FSDP2 loop",
              fill="black", font=font)
    img.save(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
