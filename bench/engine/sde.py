"""Step math: pure functions, fp32, one typed return value each.

Conventions (Liu et al. 2025, Flow-GRPO; flow_grpo ``sd3_sde_with_logprob.py``): flow matching
x_sigma = (1 - sigma) x0 + sigma eps, sigma: 1 -> 0, the model predicts the velocity v ~ eps - x0,
dt = sigma_next - sigma < 0. Epsilon-prediction models use DDIM on the alpha_bar schedule.

Every step returns ``StepOutput(prev_sample, log_prob, mean, std)``:
  prev_sample [B, ...]  the next latent (sampled, or the one passed in)
  log_prob    [B]       Gaussian log-density of prev_sample under N(mean, std^2), *mean* over the
                        non-batch dims as in every reference implementation (flow_grpo
                        ``sde_step_with_logprob``, DanceGRPO ``flux_step``, ddpo-pytorch
                        ``ddim_step_with_logprob``); the CPS step keeps only -(x - mean)^2 as its
                        released code does (``cps_log_prob``);
                        NaN for deterministic steps
  mean        [B, ...]  the step's mean (the deterministic update for ODE steps)
  std         [B]       the step's standard deviation (0 for deterministic steps)

When ``prev_sample`` is given, no noise is drawn and its log-prob under the step is returned (this
is how ``engine.logp`` recomputes log-probs with gradients: gradients flow through ``mean``).
``sigma``-like arguments are python floats or tensors of shape [B].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


@dataclass(frozen=True)
class StepOutput:
    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


@dataclass(frozen=True)
class DPMStepOutput(StepOutput):
    """A DPM-Solver++ step also returns its data prediction, which the next multistep update needs."""

    x0: Tensor = None  # type: ignore[assignment]


def _per_sample(v: float | Tensor, like: Tensor) -> Tensor:
    """A float or [B] tensor -> float32 tensor of shape [B, 1, 1, ...] broadcastable against ``like``."""
    t = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample mean over non-batch dims of log N(x; mean, std^2); ``x`` is treated as data
    (detached), gradients flow through ``mean``. ``std`` broadcasts against ``x``."""
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.dim())))


def _sample_or_take(mean: Tensor, std: Tensor, prev_sample: Tensor | None,
                    generator: torch.Generator | None) -> Tensor:
    if prev_sample is not None:
        return prev_sample.to(torch.float32)
    gen_device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
    return mean + std * noise.to(mean.device)


def flow_ode_step(velocity: Tensor, x_t: Tensor, sigma: float | Tensor, sigma_next: float | Tensor
                  ) -> StepOutput:
    """Flow-matching Euler step x_next = x + (sigma_next - sigma) * v (the probability-flow ODE;
    identical to diffusers' ``FlowMatchEulerDiscreteScheduler.step``)."""
    x = x_t.to(torch.float32)
    v = velocity.to(torch.float32)
    s, sn = _per_sample(sigma, x), _per_sample(sigma_next, x)
    mean = x + (sn - s) * v
    B = x.shape[0]
    nan = torch.full((B,), float("nan"), device=x.device)
    return StepOutput(prev_sample=mean, log_prob=nan, mean=mean, std=torch.zeros(B, device=x.device))


def flow_sde_step(velocity: Tensor, x_t: Tensor, sigma: float | Tensor, sigma_next: float | Tensor,
                  noise_level: float, prev_sample: Tensor | None = None,
                  generator: torch.Generator | None = None,
                  log_std_range: tuple[float, float] | None = None) -> StepOutput:
    """Flow-GRPO SDE step (Liu et al. 2025, arXiv 2505.05470, eq. 9; yifan123/flow_grpo
    ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob``).

    Reverse-time SDE dx = [v + sigma_t^2/(2t) (x + (1-t) v)] dt + sigma_t dw with
    sigma_t = a * sqrt(t / (1 - t)), a = ``noise_level``, discretised with step dt = sigma_next - sigma:

        std_dev_t = a * sqrt(sigma / (1 - sigma'))   with sigma' = sigma_next where sigma == 1
        mean      = x (1 + std_dev_t^2 / (2 sigma) dt) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt
        x_next    = mean + std_dev_t sqrt(-dt) z

    ``log_std_range`` = (lo, hi) clamps the step std std_dev_t sqrt(-dt) to [e^lo, e^hi] for sampling and
    the log-prob, as TreeGRPO's released code does (``schedulers_with_logprob/flow_match_euler_discrete.py``,
    ``log_std_min=-5, log_std_max=2``); None = no clamp (Flow-GRPO, MixGRPO).
    """
    x = x_t.to(torch.float32)
    v = velocity.to(torch.float32)
    s, sn = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sn - s
    s_den = torch.where(s >= 1.0, sn, s)  # avoid 1/(1-1) at the first step, as Flow-GRPO does
    std_dev_t = torch.sqrt(s / (1 - s_den)) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    if log_std_range is not None:
        std = std.clamp(math.exp(log_std_range[0]), math.exp(log_std_range[1]))
    nxt = _sample_or_take(mean, std, prev_sample, generator)
    return StepOutput(prev_sample=nxt, log_prob=gaussian_log_prob(nxt, mean, std), mean=mean,
                      std=std.reshape(-1))


def dance_sde_step(velocity: Tensor, x_t: Tensor, sigma: float | Tensor, sigma_next: float | Tensor,
                   noise_level: float, prev_sample: Tensor | None = None,
                   generator: torch.Generator | None = None) -> StepOutput:
    """DanceGRPO SDE step (Xue et al. 2025, arXiv 2505.07818; XueZeyue/DanceGRPO
    ``fastvideo/train_grpo_flux.py::flux_step`` with ``sde_solver=True``).

        x0_hat = x - sigma v;  score = -(x - (1 - sigma) x0_hat) / sigma^2
        mean   = x + dsigma v - (eta^2 / 2) score dsigma;   std = eta sqrt(-dsigma)
    """
    x = x_t.to(torch.float32)
    v = velocity.to(torch.float32)
    s, sn = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dsigma = sn - s
    x0_hat = x - s * v
    score = -(x - x0_hat * (1 - s)) / s**2
    mean = x + dsigma * v + (-0.5 * noise_level**2 * score) * dsigma
    std = noise_level * torch.sqrt(-dsigma)
    nxt = _sample_or_take(mean, std, prev_sample, generator)
    return StepOutput(prev_sample=nxt, log_prob=gaussian_log_prob(nxt, mean, std), mean=mean,
                      std=std.reshape(-1))


def cps_log_prob(x: Tensor, mean: Tensor) -> Tensor:
    """The CPS step's log-prob as flow_grpo computes it: -(x - mean)^2, mean over non-batch dims. Every
    constant of the Gaussian log-density is dropped, *including* the 1 / (2 std^2) scale and -log std
    ("remove all constants" in ``sde_step_with_logprob``): a log-ratio of two such values is the Gaussian
    log-ratio times 2 std^2. ``x`` is treated as data (detached), gradients flow through ``mean``."""
    lp = -((x.detach() - mean) ** 2)
    return lp.mean(dim=tuple(range(1, lp.dim())))


def cps_sde_step(velocity: Tensor, x_t: Tensor, sigma: float | Tensor, sigma_next: float | Tensor,
                 noise_level: float, prev_sample: Tensor | None = None,
                 generator: torch.Generator | None = None) -> StepOutput:
    """Coefficients-preserving sampling (CPS; Wang & Yu 2025, arXiv 2509.05952), as released in
    yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob`` with
    ``sde_type='cps'`` (commit 3d02fd9d65957d45bc7d0b240ad347a9d334fcb9):

        std    = sigma_next sin(a pi / 2)                  (a = ``noise_level``; the paper's sigma_t)
        x0_hat = x - sigma v;   x1_hat = x + (1 - sigma) v  (predicted data and noise)
        mean   = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat
        x_next = mean + std z

    so x_next keeps the coefficients (1 - sigma_next) on the data and sigma_next on the total noise. The
    log-prob is ``cps_log_prob`` (-(x_next - mean)^2 averaged over dims, constants and the variance
    scale dropped as in the released code). At the last step (sigma_next = 0) std = 0 and the step is
    deterministic (x_next = x0_hat, log-prob 0 at sampling); a = 0 gives the Euler step.
    """
    x = x_t.to(torch.float32)
    v = velocity.to(torch.float32)
    s, sn = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = sn * math.sin(noise_level * math.pi / 2)
    x0 = x - s * v
    x1 = x + v * (1 - s)
    mean = x0 * (1 - sn) + x1 * torch.sqrt(sn**2 - std**2)
    nxt = _sample_or_take(mean, std, prev_sample, generator)
    return StepOutput(prev_sample=nxt, log_prob=cps_log_prob(nxt, mean), mean=mean, std=std.reshape(-1))


def ddim_step(eps: Tensor, x_t: Tensor, alpha_bar_t: float | Tensor, alpha_bar_prev: float | Tensor,
              eta: float, prev_sample: Tensor | None = None, generator: torch.Generator | None = None,
              clip_sample: float | None = None) -> StepOutput:
    """DDIM step with log-prob for epsilon-prediction models (Song et al. 2021, eq. 12; DDPO's
    ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py::ddim_step_with_logprob``). ``eta = 0`` is
    deterministic DDIM (log_prob NaN), ``eta = 1`` is DDPM-like ancestral sampling (DDPO's setting).

        x0_hat = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t)
        var    = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev);  std = eta sqrt(var)
        mean   = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - std^2) eps
    """
    x = x_t.to(torch.float32)
    e = eps.to(torch.float32)
    ab, abp = _per_sample(alpha_bar_t, x), _per_sample(alpha_bar_prev, x)
    x0 = (x - torch.sqrt(1 - ab) * e) / torch.sqrt(ab)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    var = (1 - abp) / (1 - ab) * (1 - ab / abp)
    std = eta * torch.sqrt(var)
    mean = torch.sqrt(abp) * x0 + torch.sqrt((1 - abp - std**2).clamp_min(0)) * e
    if eta == 0:
        B = x.shape[0]
        nan = torch.full((B,), float("nan"), device=x.device)
        return StepOutput(prev_sample=mean, log_prob=nan, mean=mean, std=torch.zeros(B, device=x.device))
    nxt = _sample_or_take(mean, std, prev_sample, generator)
    return StepOutput(prev_sample=nxt, log_prob=gaussian_log_prob(nxt, mean, std), mean=mean,
                      std=std.reshape(-1))


def flow_dpm2_step(velocity: Tensor, x_t: Tensor, sigma: float | Tensor, sigma_next: float | Tensor,
                   prev_x0: Tensor | None = None, sigma_prev: float | Tensor | None = None
                   ) -> DPMStepOutput:
    """Deterministic multistep DPM-Solver++(2M), midpoint form, on a flow-matching schedule
    (Lu et al. 2022, arXiv 2211.01095, Alg. 2; used by MixGRPO-Flash after its SDE window).

    With alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_next - lambda and the data
    prediction x0 = x - sigma v:
        first order:  x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) x0
        second order: D1 = (x0 - x0_prev) / r, r = (lambda - lambda_prev) / h, and the extra term
                      - 0.5 alpha_next (e^{-h} - 1) D1
    The last step (sigma_next = 0) returns x0 (lower-order final step, as diffusers does).
    """
    x = x_t.to(torch.float32)
    v = velocity.to(torch.float32)
    s, sn = _per_sample(sigma, x), _per_sample(sigma_next, x)
    x0 = x - s * v
    B = x.shape[0]
    nan = torch.full((B,), float("nan"), device=x.device)
    zeros = torch.zeros(B, device=x.device)
    if bool((sn <= 0).all()):
        return DPMStepOutput(prev_sample=x0, log_prob=nan, mean=x0, std=zeros, x0=x0)
    if bool((s >= 1).any()):  # lambda = -inf at sigma = 1: fall back to Euler, exact there
        out = x + (sn - s) * v
        return DPMStepOutput(prev_sample=out, log_prob=nan, mean=out, std=zeros, x0=x0)
    lam = torch.log(1 - s) - torch.log(s)
    lam_n = torch.log(1 - sn) - torch.log(sn)
    h = lam_n - lam
    phi = torch.expm1(-h)  # e^{-h} - 1
    out = (sn / s) * x - (1 - sn) * phi * x0
    if prev_x0 is not None and sigma_prev is not None:
        sp = _per_sample(sigma_prev, x)
        lam_p = torch.log(1 - sp) - torch.log(sp)
        r = (lam - lam_p) / h
        d1 = (x0 - prev_x0.to(torch.float32)) / r
        out = out - 0.5 * (1 - sn) * phi * d1
    return DPMStepOutput(prev_sample=out, log_prob=nan, mean=out, std=zeros, x0=x0)


def time_shift(sigma: Tensor, shift: float) -> Tensor:
    """SD3/FLUX time shift sigma' = shift sigma / (1 + (shift - 1) sigma) (Esser et al. 2024, SD3 paper
    eq. 23; DanceGRPO ``sd3_time_shift``)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def inverse_time_shift(sigma: Tensor, shift: float) -> Tensor:
    """The t with time_shift(t, shift) = sigma: t = sigma / (shift - (shift - 1) sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


#: Flow schedules (``sampler.schedule``):
#:   "scheduler": the model's own diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps(T)`` sigmas
#:                (Flow-GRPO and TreeGRPO sample SD3/SD3.5 this way: the pipeline is called without
#:                explicit sigmas); timesteps sigma * num_train_timesteps, unquantised, as the SD3
#:                pipeline feeds them
#:   "linspace":  time_shift(linspace(1, 0, T + 1), shift) in float32 (DanceGRPO/MixGRPO's FLUX trainers,
#:                ``sample_reference_model`` / ``run_sample_step``); timesteps int(1000 sigma), i.e. the
#:                transformer sees int(1000 sigma) / 1000 as those trainers feed FLUX
FLOW_SCHEDULES = ("scheduler", "linspace")


@dataclass(frozen=True)
class FlowSchedule:
    """sigmas [T+1] float32 (1 -> 0) and timesteps [T] float32 (what the denoiser sees at step i, on the
    0..num_train_timesteps scale)."""

    sigmas: Tensor
    timesteps: Tensor


def linspace_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """DanceGRPO/MixGRPO's FLUX schedule: time_shift(linspace(1, 0, T + 1), shift), computed in float32
    as those trainers do (so the quantised timesteps match theirs bit for bit). Returns [T+1]."""
    return time_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32), float(shift))


def scheduler_sigmas(num_steps: int, scheduler_config: Mapping[str, Any] | None) -> Tensor:
    """The sigmas [T+1] of diffusers' ``FlowMatchEulerDiscreteScheduler`` built from ``scheduler_config``
    (the model's ``scheduler/scheduler_config.json``; None = the class defaults) after
    ``set_timesteps(T)``: time_shift(linspace(1, sigma_min, T)) + [0], with shift, sigma_min and any
    dynamic shifting taken from the config, computed by diffusers itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in dict(scheduler_config or {}).items() if not k.startswith("_")}
    sch = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if sch.config.get("use_dynamic_shifting", False):
        raise ValueError("this scheduler config uses dynamic (resolution-dependent) shifting, which needs an "
                         "image sequence length: use sampler.schedule=linspace with an explicit sampler.shift")
    sch.set_timesteps(num_steps)
    return sch.sigmas.to(torch.float32).clone()


def flow_schedule(kind: str, num_steps: int, shift: float = 1.0,
                  scheduler_config: Mapping[str, Any] | None = None, num_train_timesteps: int = 1000
                  ) -> FlowSchedule:
    """The base flow schedule of ``kind`` (see ``FLOW_SCHEDULES``) for T = ``num_steps``."""
    if kind == "scheduler":
        sig = scheduler_sigmas(num_steps, scheduler_config)
    elif kind == "linspace":
        sig = linspace_sigmas(num_steps, shift)
    else:
        raise ValueError(f"unknown flow schedule {kind!r}; valid: {', '.join(FLOW_SCHEDULES)}")
    return FlowSchedule(sig, schedule_timesteps(kind, sig[:-1], num_train_timesteps))


def schedule_timesteps(kind: str, sigmas: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """Timesteps the denoiser sees at sigmas [n]: sigma * N ("scheduler"), or int(sigma * 1000) as the
    FLUX GRPO trainers quantise them ("linspace"; ``timestep_value = int(sigma * 1000)``)."""
    sig = sigmas.to(torch.float32)
    if kind == "linspace":
        return torch.floor(sig * 1000.0) * (float(num_train_timesteps) / 1000.0)
    return sig * float(num_train_timesteps)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """Shorthand for the "linspace" schedule's sigmas [T+1] (tests and known-answer checks)."""
    return linspace_sigmas(num_steps, shift)
