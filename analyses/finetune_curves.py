"""The run-curves figure of docs/finetune.md: the ``train_curves.png`` a DRIFT run writes, here on the tiny model.

A tiny Qwen2.5-VL (``deltakit.tiny``) with the offline processor, a partner reasoner and its prior (``deltakit
prior``), 32 synthetic one-image chain-of-thought records, 24 steps of ``deltakit finetune`` with DRIFT
(adaptive rule, length grouping, cached data, one loader worker); its ``train_curves.png`` is copied to
docs/figures/finetune_curves.png.

    python analyses/finetune_curves.py
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from PIL import Image, ImageDraw  # noqa: E402

from deltakit.prior import export_prior  # noqa: E402
from deltakit.tiny import save_partner_llm, save_tiny  # noqa: E402
from deltakit.tiny_processor import save_tiny_processor  # noqa: E402
from deltakit.train import TrainConfig, finetune  # noqa: E402

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}


def records(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` counting questions on drawn circles, answers ``<think>...</think> \\boxed{k}``."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        img = Image.new("RGB", (112, 112), "white")
        draw = ImageDraw.Draw(img)
        colors = [rng.choice(list(COLORS)) for _ in range(rng.randint(1, 5))]
        for j, c in enumerate(colors):
            x, y = 8 + 34 * (j % 3), 8 + 50 * (j // 3)
            draw.ellipse((x, y, x + 28, y + 28), fill=COLORS[c])
        img.save(root / f"{i}.png")
        target = rng.choice(colors)
        k = colors.count(target)
        think = " ".join(f"a {c} circle" for c in colors) + f". The {target} ones: {k}."
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"<image>How many {target} circles are there?"},
                                              {"role": "assistant", "content": f"<think>I see {think}</think> The answer is \\boxed{{{k}}}."}],
                                 "images": [f"{i}.png"]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = save_tiny_processor(save_tiny("qwen2_5_vl", tmp / "mllm"))
        export_prior(model, save_partner_llm(model, tmp / "llm", noise=0.3), tmp / "prior.safetensors")
        (tmp / "data").mkdir()
        data = records(tmp / "data", 32)
        finetune(TrainConfig(model=str(model), data=str(data), out=str(tmp / "out"), prior=str(tmp / "prior.safetensors"),
                             rule="adaptive", max_steps=24, batch_size=2, grad_accum=2, lr=2e-3, warmup_ratio=0.1,
                             group_by_length=True, num_workers=1, cache_dir=str(tmp / "cache")))
        target = ROOT / "docs" / "figures" / "finetune_curves.png"
        shutil.copy(tmp / "out" / "train_curves.png", target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
