"""Train the embedded shapes text-to-image model from scratch on CPU.

    python -m bench.shapes.train_model --out bench/shapes/model --minutes 90 --threads 1 [--seed 0]

(3500 steps of batch 32, the shipped model; it took 49 minutes on 2 CPU cores shared with other jobs
(load 5-12), ~0.25 CPU-seconds per step. Use ``--threads 1`` on a busy machine: two torch threads
competing with other processes were 15x slower per step in a measurement here.)

The result is a treebench pipeline directory (``bench.model.random_models.save_pipeline``) loadable by
``bench.model.models.load_policy``: a pixel-space (32 x 32 x 3) ``SD3Transformer2DModel`` (patch 4, 4 layers,
4 heads x 32; 2.3 M parameters), a ``CLIPTextModelWithProjection`` (hidden 128, 2 layers; 0.3 M) and a
word-level tokenizer over the world's vocabulary, with a ``FlowMatchEulerDiscreteScheduler`` config.

Training follows exactly the conventions the policy samples with (bench/model/policy.py, bench/engine/sde.py):
  - images scaled to [-1, 1]; rectified flow x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0
    (Liu et al. 2022; Esser et al. 2024, SD3 eq. 1-3), sigma ~ logit-normal(0, 1) (SD3 sec. 3.1);
  - the transformer sees timestep = sigma * 1000, encoder_hidden_states = the text encoder's
    last_hidden_state and pooled_projections = its text_embeds, prompts padded to max_length;
  - 10% of prompts are replaced by "" so classifier-free guidance works (Ho & Salimans 2022);
  - the text encoder is trained jointly; the saved weights are an exponential moving average (0.999).
Training images are jittered renders (``world.render(attrs, rng)``) of the *train* split only.

The model is deliberately stopped early: the shipped one gets about 40% of the held-out prompts
fully right (shape is its weak attribute), which leaves room for RL post-training to show. ``--snapshot-every N`` writes an EMA pipeline every
N steps (next to ``--out``) so the stopping point can be chosen by evaluation (scripts/eval_shapes_base.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.model.random_models import save_pipeline, word_tokenizer
from bench.shapes import world

MAX_LENGTH = 10
DEFAULT_GUIDANCE = 3.0


def build_components(seed: int) -> tuple[nn.Module, nn.Module, Any, Any]:
    """Fresh (transformer, text encoder, tokenizer, scheduler) with the shipped architecture."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = word_tokenizer(world.VOCABULARY, MAX_LENGTH)
    tcfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=128,
                          eos_token_id=3, pad_token_id=0, bos_token_id=2)
    text = CLIPTextModelWithProjection(tcfg)
    den = SD3Transformer2DModel(sample_size=world.RESOLUTION, patch_size=4, in_channels=3, out_channels=3,
                                num_layers=4, attention_head_dim=32, num_attention_heads=4,
                                joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
                                pos_embed_max_size=world.RESOLUTION // 4)
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return den, text, tok, sch


def model_meta(guidance: float = DEFAULT_GUIDANCE) -> dict[str, Any]:
    return {"prediction": "flow", "resolution": world.RESOLUTION, "latent_channels": 3, "max_length": MAX_LENGTH,
            "defaults": {"sampler.steps": 10, "sampler.guidance": guidance, "sampler.noise_level": 0.7,
                         "sampler.shift": 1.0}}


def tokenize(tok: Any, prompts: Sequence[str]) -> Tensor:
    """input_ids [P, MAX_LENGTH], the same call ``Policy.encode_prompts`` makes."""
    return tok(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
               return_tensors="pt")["input_ids"]


def build_bank(combos: Sequence[world.Attributes], per_combo: int, seed: int) -> Tensor:
    """Jittered renders uint8 [len(combos), per_combo, 3, H, W] (the first of each is canonical)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(combos), per_combo, 3, world.RESOLUTION, world.RESOLUTION), dtype=np.uint8)
    for i, a in enumerate(combos):
        for j in range(per_combo):
            out[i, j] = np.round(world.render(a, None if j == 0 else rng) * 255).astype(np.uint8)
    return torch.from_numpy(out)


def flow_loss(den: nn.Module, text: nn.Module, ids: Tensor, x0: Tensor, gen: torch.Generator) -> Tensor:
    """Rectified-flow velocity loss ||v_theta(x_sigma, sigma, c) - (eps - x0)||^2 on images x0 in [-1, 1]."""
    B = x0.shape[0]
    sigma = torch.sigmoid(torch.randn(B, generator=gen))  # logit-normal(0, 1)
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma.view(B, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    out = text(input_ids=ids)
    pred = den(hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=out.last_hidden_state,
               pooled_projections=out.text_embeds, return_dict=False)[0]
    return torch.mean((pred.float() - (eps - x0)) ** 2)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)


def train(out: Path, minutes: float, seed: int = 0, max_steps: int | None = 3500, batch_size: int = 32,
          lr: float = 5e-4, ema_decay: float = 0.999, cfg_dropout: float = 0.1, per_combo: int = 64,
          snapshot_every: int | None = None, guidance: float = DEFAULT_GUIDANCE, log_every: int = 50) -> dict:
    t_start = time.time()
    den, text, tok, sch = build_components(seed)
    combos = world.split("train")
    bank = build_bank(combos, per_combo, seed)
    ids_all = tokenize(tok, [a.prompt for a in combos])
    ids_empty = tokenize(tok, [""])
    ema_den, ema_text = copy.deepcopy(den).eval(), copy.deepcopy(text).eval()
    params = list(den.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 200
    gen = torch.Generator().manual_seed(seed)
    den.train(), text.train()
    n_params = sum(p.numel() for p in params)
    print(f"training shapes model: {n_params / 1e6:.2f} M parameters, {len(combos)} train combinations, "
          f"batch {batch_size}, lr {lr}, budget {minutes} min" + (f" / {max_steps} steps" if max_steps else ""),
          flush=True)
    step, losses = 0, []
    deadline = t_start + 60 * minutes
    while time.time() < deadline and (max_steps is None or step < max_steps):
        ci = torch.randint(len(combos), (batch_size,), generator=gen)
        vi = torch.randint(per_combo, (batch_size,), generator=gen)
        x0 = bank[ci, vi].float() / 127.5 - 1.0
        ids = ids_all[ci].clone()
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        ids[drop] = ids_empty
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = flow_loss(den, text, ids, x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        ema_update(ema_den, den, decay)
        ema_update(ema_text, text, decay)
        step += 1
        losses.append(loss.item())
        elapsed = (time.time() - t_start) / 60
        if step % log_every == 0:
            print(f"step {step:6d}  loss {np.mean(losses[-log_every:]):.4f}  {elapsed:6.2f} min", flush=True)
        if snapshot_every and step % snapshot_every == 0:
            snap = out.parent / f"{out.name}-snapshots" / f"step{step:05d}"
            save_pipeline(snap, denoiser=ema_den, text_encoder=ema_text, tokenizer=tok, scheduler=sch,
                          meta=model_meta(guidance))
            print(f"snapshot {snap} at {elapsed:.2f} min", flush=True)
    save_pipeline(out, denoiser=ema_den, text_encoder=ema_text, tokenizer=tok, scheduler=sch,
                  meta=model_meta(guidance))
    info = {"steps": step, "minutes": round((time.time() - t_start) / 60, 2), "seed": seed,
            "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
            "final_loss": float(np.mean(losses[-log_every:])) if losses else math.nan}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out}: {info}", flush=True)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shapes.train_model", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output pipeline directory")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock training budget (stops earlier at --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3500, help="stop after this many steps (the shipped model: 3500)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--per-combo", type=int, default=64, help="jittered renders per train combination")
    p.add_argument("--snapshot-every", type=int, default=None, help="steps between EMA snapshots")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale stored as the default")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is much faster on a machine shared with other jobs)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train(a.out, a.minutes, seed=a.seed, max_steps=a.steps, batch_size=a.batch_size, lr=a.lr,
          per_combo=a.per_combo, snapshot_every=a.snapshot_every, guidance=a.guidance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
