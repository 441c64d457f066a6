"""Deterministic sampling for evaluating the shapes model outside the training loop.

``sample_images(policy, prompts, ...)`` runs the probability-flow ODE (Euler, ``bench.engine.sde.flow_ode_step``)
on the policy's schedule (``bench.engine.sde.flow_sigmas``) with classifier-free guidance
v = v_uncond + w (v_cond - v_uncond) (Ho & Salimans 2022), batched, from noise drawn with a fixed seed
(one generator per call, so the same prompts + seed give the same images). It is the same step rule
and conditioning the rollout engine uses for deterministic evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bench.engine.sde import flow_ode_step, flow_sigmas
from bench.model.policy import Conditioning, Policy


@torch.no_grad()
def sample_images(policy: Policy, prompts: Sequence[str], steps: int | None = None, guidance: float | None = None,
                  seed: int = 0, shift: float | None = None, batch_size: int = 128) -> Tensor:
    """Images [L, 3, H, W] float32 in [0, 1] for ``prompts`` (one image per prompt; repeat prompts for more).
    ``steps``/``guidance``/``shift`` default to the model's ``sampler.*`` defaults."""
    d = policy.default_settings()
    steps = int(steps if steps is not None else d.get("sampler.steps", 10))
    guidance = float(guidance if guidance is not None else d.get("sampler.guidance", 1.0))
    shift = float(shift if shift is not None else d.get("sampler.shift", 1.0))
    if policy.prediction != "flow":
        raise NotImplementedError("sample_images implements the flow ODE only; epsilon models need DDIM")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=gen)
    sigmas = flow_sigmas(steps, shift)
    was_training = policy.denoiser.training
    policy.denoiser.eval()
    out = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo:lo + batch_size])
        B = len(chunk)
        cond = policy.encode_prompts(chunk)
        if guidance != 1.0:
            empty = policy.empty_conditioning()
            uncond = Conditioning({k: v.expand(B, *v.shape[1:]) for k, v in empty.tensors.items()})
            cond = Conditioning.cat([cond, uncond])
        x = noise[lo:lo + B].to(policy.device)
        for i in range(steps):
            s, sn = float(sigmas[i]), float(sigmas[i + 1])
            xin = torch.cat([x, x]) if guidance != 1.0 else x
            t = policy.timestep_values(torch.full((xin.shape[0],), s))
            v = policy.predict(xin, t, cond)
            if guidance != 1.0:
                vc, vu = v.chunk(2)
                v = vu + guidance * (vc - vu)
            x = flow_ode_step(v, x, s, sn).prev_sample
        out.append(policy.decode(x).cpu())
    policy.denoiser.train(was_training)
    return torch.cat(out)
