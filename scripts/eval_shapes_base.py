"""Evaluate a shapes model directory with the exact checker (and optionally the learned scorer).

    python scripts/eval_shapes_base.py [--model bench/shapes/model] [--split eval] [--per-prompt 4]
                                       [--guidance G] [--grid docs/shapes_base_samples.png] [--pref]

Deterministic probability-flow ODE sampling (bench.shapes.sampling) from fixed noise (``--seed``) with the
model's default steps and CFG scale unless overridden. Prints, per split: the mean shapes_attr score,
the all-attributes-right rate and the per-attribute accuracies (and the mean shapes_pref score with
``--pref``, plus how often shapes_pref orders two samples of one prompt the same way as shapes_attr when
their shapes_attr scores differ). Writes a sample grid (rows: prompts; columns: samples, then the exact
render) with ``--grid``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model.models import load_policy
from bench.shapes import world
from bench.shapes.sampling import sample_images
from rewards.shapes_attr import ShapesAttr


def pairwise_agreement(pref: np.ndarray, attr: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Fraction of same-prompt sample pairs with different attr scores that pref orders the same way."""
    agree, n = 0, 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        for i in range(len(idx)):
            for j in range(i + 1, len(idx)):
                a, b = idx[i], idx[j]
                if attr[a] != attr[b]:
                    n += 1
                    agree += int((pref[a] - pref[b]) * (attr[a] - attr[b]) > 0)
    return (agree / n if n else float("nan")), n


def evaluate(model: Path, split: str, per_prompt: int, seed: int, guidance: float | None, steps: int | None,
             with_pref: bool) -> tuple[dict, torch.Tensor, list[str]]:
    policy = load_policy(model)
    recs = world.prompt_records(split)
    prompts = [r["prompt"] for r in recs for _ in range(per_prompt)]
    meta = [r for r in recs for _ in range(per_prompt)]
    t0 = time.time()
    images = sample_images(policy, prompts, steps=steps, guidance=guidance, seed=seed)
    t_sample = time.time() - t0
    out = ShapesAttr()(images, prompts, meta)
    res = {"split": split, "n_images": len(prompts), "guidance": guidance if guidance is not None else
           policy.default_settings().get("sampler.guidance"), "sample_seconds": round(t_sample, 2),
           "shapes_attr": round(float(out.scores.mean()), 4)}
    for k, v in out.components.items():
        res[f"shapes_attr/{k}"] = round(float(v.mean()), 4)
    if with_pref:
        from rewards.shapes_pref import ShapesPref

        pref = ShapesPref()(images, prompts, meta).scores.numpy()
        res["shapes_pref"] = round(float(pref.mean()), 4)
        groups = np.repeat(np.arange(len(recs)), per_prompt)
        agree, n = pairwise_agreement(pref, out.scores.numpy(), groups)
        res["pref_attr_pair_agreement"] = round(agree, 4)
        res["pref_attr_pairs"] = n
    return res, images, prompts


def save_grid(path: Path, images: torch.Tensor, prompts: Sequence[str], per_prompt: int, rows: int = 10,
              cols: int = 6, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    cols = min(cols, per_prompt)
    R = world.RESOLUTION * scale
    label_w, pad = 200, 4
    n_rows = min(rows, len(prompts) // per_prompt)
    W = label_w + (cols + 1) * (R + pad) + pad
    canvas = Image.new("RGB", (W, pad + n_rows * (R + pad) + 18), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w + pad, 2), "samples (deterministic ODE, fixed noise)", fill=(0, 0, 0))
    draw.text((label_w + cols * (R + pad) + pad, 2), "exact render", fill=(0, 0, 0))
    to_img = lambda x: Image.fromarray((x.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)).resize(
        (R, R), Image.NEAREST)
    for r in range(n_rows):
        y = 18 + r * (R + pad)
        p = prompts[r * per_prompt]
        draw.text((pad, y + R // 2 - 6), p, fill=(0, 0, 0))
        for c in range(cols):
            canvas.paste(to_img(images[r * per_prompt + c]), (label_w + c * (R + pad), y))
        canvas.paste(to_img(torch.from_numpy(world.render(p))), (label_w + cols * (R + pad) + pad, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a shapes model with shapes_attr")
    p.add_argument("--model", type=Path, default=ROOT / "bench/shapes/model")
    p.add_argument("--split", choices=["eval", "train", "both"], default="both")
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--pref", action="store_true", help="also score with shapes_pref")
    p.add_argument("--grid", type=Path, default=None, help="write a sample grid of the eval split here")
    p.add_argument("--json", type=Path, default=None, help="append results as JSON lines here")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    for split in (["eval", "train"] if a.split == "both" else [a.split]):
        res, images, prompts = evaluate(a.model, split, a.per_prompt, a.seed, a.guidance, a.steps, a.pref)
        res["model"] = str(a.model)
        print(json.dumps(res), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        if a.grid and split == "eval":
            save_grid(a.grid, images, prompts, a.per_prompt)
            print(f"wrote {a.grid}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
