"""Train the shapes_pref scorer (rewards/shapes_pref.py) contrastively on procedural data.

    python scripts/train_shapes_pref.py --out rewards/weights/shapes_pref --minutes 6 [--seed 0]

Data: jittered renders of the *train* split only (bench.shapes.world), lightly augmented (noise up to
0.04, partial blur) so that the imperfect samples of a generator still read as their prompt. Each step
draws B distinct train combinations and optimises the symmetric CLIP loss (Radford et al. 2021) with
extra negatives on both sides:
  - image -> text: the B batch prompts + K hard-negative prompts of the image (one attribute changed);
  - text -> image: the B batch images + degraded versions of the prompt's own image (heavy noise, blur,
    an object colour shifted half-way to another palette colour, a ghosted second object, a faded object,
    an empty canvas, a shapeless blob of the right colour, size and place, a mottled interior, the union
    with a differently shaped object), so a prompt prefers its clean, correct rendering over flawed ones.
Held-out report (``evaluate``): on renders of the *eval* split, the fraction of (image, matching prompt,
mismatching prompt) triples ranked correctly, for random and one-attribute-off mismatches, and the
fraction of (prompt, clean image, degraded image) triples ranked correctly.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import world
from rewards.shapes_pref import ShapesPrefNet, save_net

BG = torch.tensor(world.BACKGROUND).view(1, 3, 1, 1)
PALETTE = torch.tensor([world.COLOURS[c] for c in world.COLOURS])  # [6, 3]
COLOUR_INDEX = {c: i for i, c in enumerate(world.COLOURS)}
DEGRADATIONS = ("noise", "blur", "colourshift", "ghost", "fade", "blank", "blob", "texture", "morph")
_VALUES = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "size": list(world.SIZES),
           "position": list(world.POSITIONS)}


def blur(x: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x


def render_bank(combos: Sequence[world.Attributes], per_combo: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jittered renders [len(combos), per_combo, 3, H, W] float32, and for each a morph: the silhouette
    half-way between the object and a differently shaped one drawn with the same jitter."""
    rng = np.random.default_rng(seed)
    imgs, morphs = [], []
    for a in combos:
        for _ in range(per_combo):
            s = int(rng.integers(2**31))
            x = world.render(a, np.random.default_rng(s))
            other = world.Attributes(a.colour, str(rng.choice([v for v in world.SHAPES if v != a.shape])), a.size,
                                     a.position)
            y = world.render(other, np.random.default_rng(s))
            # silhouette half-way between the two shapes: mean coverage, re-sharpened at 0.5
            bg = x[:, :1, :1]
            ax, ay = np.abs(x - bg).max(axis=0), np.abs(y - bg).max(axis=0)
            peak = ax.max()
            colour = x[:, ax == peak][:, :1].reshape(3, 1, 1)
            cov = torch.from_numpy(np.stack([ax, ay]) / max(peak, 1e-3))[:, None]
            mix = blur(cov, 2).mean(0)[0].numpy()  # blurred coverages act as soft distance fields
            alpha = 1 / (1 + np.exp(-(mix - 0.5) * 14))
            imgs.append(x)
            morphs.append((bg + alpha[None] * (colour - bg)).astype(np.float32))
    shape = (len(combos), per_combo, 3, world.RESOLUTION, world.RESOLUTION)
    return torch.from_numpy(np.stack(imgs)).view(shape), torch.from_numpy(np.stack(morphs)).view(shape)


def mild_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Positives: small noise and a partial blur, like a generator's slightly soft samples."""
    B = x.shape[0]
    w = torch.rand(B, 1, 1, 1, generator=gen) * 0.6 * (torch.rand(B, 1, 1, 1, generator=gen) < 0.5)
    x = (1 - w) * x + w * blur(x, 1)
    sigma = torch.rand(B, 1, 1, 1, generator=gen) * 0.04
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def object_alpha(x: torch.Tensor, colour_idx: torch.Tensor) -> torch.Tensor:
    """Soft object coverage [B, 1, H, W] of renders x whose object colour is PALETTE[colour_idx]."""
    c = PALETTE[colour_idx].view(-1, 3, 1, 1)
    return ((x - BG).norm(dim=1, keepdim=True) / (c - BG).norm(dim=1, keepdim=True)).clamp(0, 1)


def degrade(x: torch.Tensor, kind: str, colour_idx: torch.Tensor, partner: torch.Tensor, morph: torch.Tensor,
            gen: torch.Generator, is_circle: torch.Tensor | None = None) -> torch.Tensor:
    """Flawed versions of renders x [B, 3, H, W] (negatives for their own prompt)."""
    B = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, 1, 1, 1, generator=gen)
    if kind == "noise":
        out = x + u(0.12, 0.45) * torch.randn(x.shape, generator=gen)
    elif kind == "blur":
        out = blur(x, int(torch.randint(2, 5, (1,), generator=gen)))
    elif kind == "colourshift":
        other = (colour_idx + torch.randint(1, len(PALETTE), (B,), generator=gen)) % len(PALETTE)
        shift = (PALETTE[other] - PALETTE[colour_idx]).view(B, 3, 1, 1)
        out = x + object_alpha(x, colour_idx) * shift * u(0.4, 0.7)
    elif kind == "ghost":
        mask = (partner - BG).abs().amax(dim=1, keepdim=True) > 0.1
        out = torch.where(mask, partner, x)
    elif kind == "fade":
        out = BG + (x - BG) * u(0.25, 0.55)
    elif kind == "blank":
        out = BG + u(0.0, 0.05) * torch.randn(x.shape, generator=gen)
    elif kind == "blob":  # the right colour, size and place, but a rounded silhouette (circles: mottled)
        a = object_alpha(blur(x, int(torch.randint(2, 4, (1,), generator=gen))), colour_idx)
        a = torch.sigmoid((a - 0.45) * 12)
        bg = x[:, :, :1, :1]
        out = bg + a * (PALETTE[colour_idx].view(-1, 3, 1, 1) - bg)
        if is_circle is not None:
            mottled = x + object_alpha(x, colour_idx) * u(0.1, 0.25) * torch.randn(x.shape, generator=gen)
            out = torch.where(is_circle.view(-1, 1, 1, 1), mottled, out)
    elif kind == "texture":  # a mottled object interior
        out = x + object_alpha(x, colour_idx) * u(0.08, 0.25) * torch.randn(x.shape, generator=gen)
    elif kind == "morph":
        out = morph
    else:
        raise ValueError(f"unknown degradation {kind!r}")
    return out.clamp(0, 1)


def hard_negative(a: world.Attributes, attr: str, rng: np.random.Generator) -> world.Attributes:
    d = a.as_dict()
    d[attr] = rng.choice([v for v in _VALUES[attr] if v != d[attr]])
    return world.Attributes.from_mapping(d)


def train(out: Path, minutes: float, seed: int = 0, max_steps: int | None = None, batch_size: int = 96,
          per_combo: int = 24, lr: float = 2e-3, log_every: int = 25, width: int = 16,
          eval_per_combo: int = 4) -> ShapesPrefNet:
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    combos = world.split("train")
    bank, morphs = render_bank(combos, per_combo, seed)
    colour_of = torch.tensor([COLOUR_INDEX[a.colour] for a in combos])
    circle_of = torch.tensor([a.shape == "circle" for a in combos])
    net = ShapesPrefNet(world.VOCABULARY, width=width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    total = max_steps or 10**9
    print(f"training shapes_pref: {sum(p.numel() for p in net.parameters()) / 1e3:.0f} K parameters, "
          f"{len(combos)} train combinations, batch {batch_size}", flush=True)
    step, losses = 0, []
    while time.time() - t0 < 60 * minutes and step < total:
        frac = min(1.0, (time.time() - t0) / (60 * minutes)) if max_steps is None else step / total
        for g in opt.param_groups:  # cosine decay after a short warm-up
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * frac))
        ci = torch.from_numpy(rng.permutation(len(combos))[:batch_size])
        vi = torch.randint(per_combo, (len(ci),), generator=gen)
        clean = bank[ci, vi]
        anchors = mild_augment(clean, gen)
        partner = bank[ci.roll(1), torch.randint(per_combo, (len(ci),), generator=gen)]
        morph = morphs[ci, vi]
        degraded = torch.stack([degrade(clean, k, colour_of[ci], partner, morph, gen, circle_of[ci]) for k in DEGRADATIONS], 1)
        texts = [combos[i].prompt for i in ci.tolist()]
        hard = [hard_negative(combos[i], attr, rng).prompt for i in ci.tolist() for attr in world.ATTRIBUTES]
        B, K, M = len(ci), len(world.ATTRIBUTES), len(DEGRADATIONS)
        img = net.encode_images(torch.cat([anchors, degraded.flatten(0, 1)]))
        im_a, im_d = img[:B], img[B:].view(B, M, -1)
        txt = net.encode_text(texts + hard)
        tx, tx_h = txt[:B], txt[B:].view(B, K, -1)
        scale = net.logit_scale.clamp(max=4.6).exp()
        i2t = scale * torch.cat([im_a @ tx.T, torch.einsum("bd,bkd->bk", im_a, tx_h)], 1)  # [B, B + K]
        t2i = scale * torch.cat([tx @ im_a.T, torch.einsum("bd,bmd->bm", tx, im_d)], 1)  # [B, B + M]
        target = torch.arange(B)
        loss = F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % log_every == 0:
            print(f"step {step:5d}  loss {np.mean(losses[-log_every:]):.4f}  {(time.time() - t0) / 60:5.2f} min",
                  flush=True)
    net.eval()
    info = {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "seed": seed, "batch_size": batch_size}
    report = evaluate(net, per_combo=eval_per_combo)
    print(json.dumps(report, indent=1), flush=True)
    save_net(net, out, extra={"training": info, "heldout": report})
    print(f"saved {out}", flush=True)
    return net


@torch.no_grad()
def evaluate(net: ShapesPrefNet, per_combo: int = 4, seed: int = 12345, split: str = "eval") -> dict:
    """Held-out ranking accuracies (see the module docstring) on fresh renders of ``split``."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    combos = world.split(split)
    everything = world.all_combinations()
    bank, morphs = render_bank(combos, per_combo, seed)  # [C, V, 3, H, W]
    C, V = bank.shape[:2]
    imgs = bank.flatten(0, 1)
    owners = [combos[i] for i in range(C) for _ in range(V)]
    im = net.encode_images(imgs)
    true = net.encode_text([a.prompt for a in owners])
    s_true = (im * true).sum(-1)
    res: dict[str, float] = {}
    rand = [everything[j].prompt for j in rng.integers(len(everything), size=len(owners))]
    keep = torch.tensor([r != a.prompt for r, a in zip(rand, owners)])
    s_rand = (im * net.encode_text(rand)).sum(-1)
    res["acc_random"] = float((s_true > s_rand)[keep].float().mean())
    hard_all = []
    for attr in world.ATTRIBUTES:
        s_h = (im * net.encode_text([hard_negative(a, attr, rng).prompt for a in owners])).sum(-1)
        hard_all.append(s_true > s_h)
        res[f"acc_{attr}"] = float(hard_all[-1].float().mean())
    res["acc_hard"] = float(torch.stack(hard_all).float().mean())
    colour_idx = torch.tensor([COLOUR_INDEX[a.colour] for a in owners])
    is_circle = torch.tensor([a.shape == "circle" for a in owners])
    partner = imgs.roll(V, 0)
    deg_all = []
    for k in DEGRADATIONS:
        s_d = (net.encode_images(degrade(imgs, k, colour_idx, partner, morphs.flatten(0, 1), gen, is_circle)) * true).sum(-1)
        deg_all.append(s_true > s_d)
        res[f"acc_degraded_{k}"] = float(deg_all[-1].float().mean())
    res["acc_degraded"] = float(torch.stack(deg_all).float().mean())
    res["n_images"] = len(owners)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the shapes_pref scorer")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "rewards/weights/shapes_pref")
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--per-combo", type=int, default=24)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layer")
    p.add_argument("--eval-per-combo", type=int, default=4, help="held-out renders per combination in the report")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train(a.out, a.minutes, seed=a.seed, max_steps=a.steps, batch_size=a.batch_size, per_combo=a.per_combo,
          width=a.width, eval_per_combo=a.eval_per_combo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
