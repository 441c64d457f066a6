"""AWM: Advantage Weighted Matching, a likelihood-free policy gradient on the flow-matching loss.

Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models", arXiv 2509.25050;
reference code scxue/advantage_weighted_matching at commit be51372 (2026-03-27):
``advantage_weighted_matching/scripts/train_sd3_awm.py`` (``main``: sampling, advantages, timestep draw,
the training loop, the EMA-policy update; ``compute_log_prob_awm``: the weighted matching "log-prob"),
``config/dgx_awm.py`` (the SD3.5-M recipes ``pickscore_sd3_no_cfg_*``, ``geneval_sd3_no_cfg_*``,
``ocr_sd3_no_cfg_*``), ``config/base_awm.py`` (defaults), ``flow_grpo/stat_tracking.py``.

Implementation details:
- Sampling (``plan``): G = ``group_size`` images per prompt (``num_image_per_prompt`` 24), each from its own
  initial noise, no CFG in the recipes (``guidance_scale`` 1.0), T = 14 steps. Only the clean final latents
  x0 are trained on, so any solver serves: ``solver`` "dpm2" (default: the engine's deterministic
  DPM-Solver++(2M)), "ode" (Euler) or "sde" (the Flow-GRPO SDE); see the differences below for the
  reference's SA-Solver.
- Advantages (``advantages``): the Flow-GRPO stat tracker, cleared every epoch
  (``PerPromptStatTracker(global_std=True)``): A = (r - mean_prompt) / (std_all + 1e-4), numpy population
  std (``algorithms.common.flow_grpo_advantages``). In the loss A is clamped to +-``adv_clip_max`` (5) and
  rescaled to A / adv_clip_max * ``advantage_max`` (1: A in [-1, 1]).
- Trained timesteps (``train_step_indices``, the trainer's ``time_type`` branch): K = ``train_timesteps`` (6)
  step indices per image, one per stratum of [0, int(T * ``timestep_fraction``)) ("discrete", the PickScore
  recipe), of [1, int(T f)) ("discrete_wo_init", GenEval/OCR) or step 0 plus K - 1 strata of [1, int(T f))
  ("discrete_with_init"): boundaries b = linspace(lo, hi, n + 1) truncated to integers, index
  b_j + floor(u_j (b_{j+1} - b_j)), u ~ U[0, 1). t = the step's sigma (the reference's timestep / 1000).
- Loss (eq. 9 of the paper: the flow-matching loss weighted by the advantage, written as a PPO-style ratio
  of the matching "log-likelihood"; ``compute_log_prob_awm`` and the training loop): for every (image, step)
  term, x_t = (1 - t) x0 + t eps with fresh eps ~ N(0, I), v = v_theta(x_t, t),
  mse = mean((v - (eps - x0))^2) (in float64), log_prob = -w(mse, t) with ``weighting`` "ghuber" (the
  recipes): w = ((mse + 1e-10)^p - 1e-10^p) t / p, p = ``ghuber_power`` 0.25; "uniform": mse; "t": mse t;
  "t2": mse t^2; "huber": (sqrt(mse + 1e-10) - 1e-5) t. ratio = exp(log_prob - log_prob_old) with the old
  log-prob of the same forward detached (on-policy: the recipes' ``off_policy`` False), so the ratio is 1
  and the policy term max(-A ratio, -A clip(ratio, 1 -+ ``clip_range``)) has the gradient A grad w.
  KL terms: ``beta`` mean((v - v_ref)^2) to the weights before training and ``ema_beta``
  mean((v - v_ema)^2) to the EMA policy ("uniform" ``kl_weight`` / ``kl_ema_weight``; "elbo" divides by
  2 std^2 with std = 0.7 sqrt(sigma / (1 - min(sigma, 0.99))), the trainer's constant).
  loss = mean over terms of (policy + beta KL_ref + ema_beta KL_ema) (``exp_first`` loss type).
- Optimizer steps: the images of an iteration split into ``train.optimizer_steps`` mini-batches of whole
  images (the recipes: one step per epoch, gradient accumulation over all micro-batches); the loss is the
  mean over the mini-batch's terms. Gradient clipping ``train.max_grad_norm`` (1.0).
- EMA policy (the trainer's second LoRA adapter "ema", ``kl_ema_decay_type`` "linear"): after the
  iteration's update, ema <- d ema + (1 - d) theta with d = min(``kl_ema_decay``, 0.001 s), s = optimizer
  steps so far ("constant": d = kl_ema_decay). Weight snapshot "ema" (``bench.model.snapshots``), checkpointed
  with the policy; the step count is the algorithm's checkpointed state.
- NFE: rollout P G T (x2 with CFG); update, per (image, step): 1 forward with gradients + 1 of the initial
  weights (beta > 0) + 1 of the EMA policy (ema_beta > 0), unguided (``train.cfg`` False; ``cfg`` True
  guides them with the sampler's scale: x2 each).

Where treebench differs, and why:
- Sampler: the recipes sample with SA-Solver (``use_sa_solver``: stochastic Adams predictor-corrector,
  orders 2/2, PEC, time grid with t_0 = 1 - 1e-3 and the last positive sigma halved; stochasticity
  ``noise_level`` 0.4 for sigma in [0.3, 0.9] in GenEval/OCR, 0 for PickScore). SA-Solver is not in the
  engine; treebench samples with its deterministic DPM-Solver++(2M) (``dpm2``: the SA-Solver predictor at
  zero stochasticity, without the Adams-Moulton corrector). Same NFE (one evaluation per step).
- Timesteps and noise are drawn per image from the run seed; the reference draws one set of K timesteps per
  micro-batch of ``train.batch_size`` (2 or 3) images and ``randn`` per micro-batch, so the update here does
  not depend on micro-batching (each image's timesteps have the reference's distribution).
- KL reference: the reference disables the LoRA adapter; treebench evaluates the snapshot "initial" of the
  weights before training (equal to the LoRA base, whose B starts at 0; also works for full fine-tuning).
- The EMA term is added whenever ``ema_beta`` > 0; the trainer adds it only inside its ``beta > 0`` branch
  (with beta = 0 the released script fails on an undefined ``log_prob_ref``, so it has no behaviour to copy).
- Not offered: the continuous ``time_type`` "uniform" / "logit_normal" (the update evaluates the model at
  the rollout's step grid), ``loss_type`` "sum_first" (identical gradient on-policy), ``off_policy``
  sampling with the EMA adapter (off in every recipe).
- Evaluation EMA (``ema``; ``train.ema`` True in every recipe, on in the presets; off by default, as for the
  other algorithms): ``EMAModuleWrapper(decay=0.99, update_step_interval=1)`` stepped once per epoch after
  the training loop, ``ema.step(params, global_step)`` with global_step = the optimizer steps so far
  (``main``, after the inner loop): s <- d s + (1 - d) theta with d = min((1 + g) / (10 + g), ``ema_decay``)
  when (g + 1) % ``ema_interval`` == 0 (``algorithms.common.ema_decay``). Kept in the weight snapshot
  "eval_ema" (checkpointed with the run, restored on resume); evaluation samples with it (``eval_weights``),
  as the trainer's "eval_reward_ema" does (it also logs the non-EMA evaluation; treebench evaluates one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from algorithms.common import (
    EMA_SNAPSHOT,
    StepCountState,
    chain_edge_advantages,
    check_count,
    check_ema_settings,
    check_fraction,
    flow_grpo_advantages,
    optimizer_step,
    per_term_noise,
)
from algorithms.common import ema_decay as eval_ema_decay
from bench.engine.rollout import RolloutEngine
from bench.engine.seeding import generator
from bench.model.policy import Policy
from bench.types import (
    Advantages,
    PromptBatch,
    RewardOutput,
    Rollout,
    RolloutPlan,
    SamplerSpec,
    TrainSpec,
    UpdateStats,
)

TIME_TYPES = ("discrete", "discrete_wo_init", "discrete_with_init")
WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")
KL_WEIGHTS = ("uniform", "elbo")
EMA_DECAY_TYPES = ("linear", "constant")
SOLVERS = ("dpm2", "ode", "sde")
#: the constants of ``compute_log_prob_awm``: the huber floor and the noise scale of the "elbo" KL weight
HUBER_EPS = 1e-10
ELBO_NOISE = 0.7


def train_step_indices(num_steps: int, fraction: float, k: int, time_type: str, u: Tensor) -> Tensor:
    """Trained step indices [..., k] (long) for uniforms u [..., n] in [0, 1) (n = k, or k - 1 for
    "discrete_with_init"): the trainer's stratified discrete draw (``time_type`` branch of ``main``).

    "discrete": strata of linspace(0, hi, k + 1), hi = int(num_steps * fraction); "discrete_wo_init": of
    linspace(1, hi, k + 1); "discrete_with_init": step 0, then strata of linspace(1, hi, k)."""
    if time_type not in TIME_TYPES:
        raise ValueError(f"unknown time_type {time_type!r}; valid: {', '.join(TIME_TYPES)}")
    hi = int(num_steps * float(fraction))
    n = k - 1 if time_type == "discrete_with_init" else k
    if u.shape[-1] != n:
        raise ValueError(f"need {n} uniforms per image for time_type {time_type!r} and k={k}, got {u.shape[-1]}")
    if n == 0:
        return torch.zeros((*u.shape[:-1], 1), dtype=torch.long)
    lo = 0 if time_type == "discrete" else 1
    b = torch.linspace(lo, hi, n + 1)
    lower, upper = b[:-1].long(), b[1:].long()
    idx = lower + (u * (upper - lower)).long()
    if time_type == "discrete_with_init":
        idx = torch.cat([torch.zeros((*u.shape[:-1], 1), dtype=torch.long), idx], dim=-1)
    return idx


def max_step_index(num_steps: int, fraction: float, k: int, time_type: str) -> int:
    """The largest index ``train_step_indices`` can return (u -> 1 in every stratum)."""
    return int(train_step_indices(num_steps, fraction, k, time_type,
                                  torch.full((k - 1 if time_type == "discrete_with_init" else k,),
                                             1.0 - 1e-7)).max())


def matching_log_prob(mse: Tensor, t: Tensor, weighting: str, ghuber_power: float = 0.25) -> Tensor:
    """AWM's "log-prob" of one (image, step) term [B]: minus the weighted flow-matching error
    (``compute_log_prob_awm``); mse [B] = mean((v - (eps - x0))^2), t [B] = sigma."""
    mse, t = mse.double(), t.double().reshape(-1)
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "t2":
        return -mse * t**2
    if weighting == "huber":
        return -(torch.sqrt(mse + HUBER_EPS) - 1e-5) * t
    if weighting == "ghuber":
        p = float(ghuber_power)
        floor = torch.tensor(HUBER_EPS, dtype=torch.float64, device=mse.device) ** p
        return -((mse + HUBER_EPS) ** p - floor) * t / p
    raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def kl_term(v: Tensor, v_other: Tensor, t: Tensor, weight: str) -> Tensor:
    """[B] mean((v - v_other)^2) over latent dims ("uniform"), or divided by 2 std^2 with
    std = 0.7 sqrt(t / (1 - min(t, 0.99))) ("elbo"; the trainer's ``std_dev_t``)."""
    d = ((v.double() - v_other.double()) ** 2).mean(dim=tuple(range(1, v.dim())))
    if weight == "uniform":
        return d
    if weight == "elbo":
        t = t.double().reshape(-1)
        std = torch.sqrt(t / (1 - t.clamp(0, 0.99))) * ELBO_NOISE
        return d / (2 * std**2)
    raise ValueError(f"unknown KL weight {weight!r}; valid: {', '.join(KL_WEIGHTS)}")


def scaled_advantages(adv: Tensor, adv_clip_max: float, advantage_max: float | None) -> Tensor:
    """clamp(A, -c, c), then A / c * advantage_max when ``advantage_max`` is set (the training loop)."""
    a = adv.double().clamp(-adv_clip_max, adv_clip_max)
    return a if advantage_max is None else a / adv_clip_max * float(advantage_max)


def policy_terms(log_prob: Tensor, log_prob_old: Tensor, adv: Tensor, clip_range: float) -> Tensor:
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)) per term [B], r = exp(log_prob - log_prob_old)
    (``exp_first``); A already clamped and scaled."""
    ratio = torch.exp(log_prob - log_prob_old)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))


def ema_decay(step: int, decay: float, decay_type: str) -> float:
    """Decay of the EMA-policy update after ``step`` optimizer steps: min(decay, 0.001 step) ("linear") or
    ``decay`` ("constant")."""
    if decay_type == "linear":
        return min(float(decay), 0.001 * step)
    if decay_type == "constant":
        return float(decay)
    raise ValueError(f"unknown kl_ema_decay_type {decay_type!r}; valid: {', '.join(EMA_DECAY_TYPES)}")


#: settings every released SD3.5-M recipe shares (config/dgx_awm.py); their LoRA (rank 32, alpha 64) and
#: lr 3e-4 are the sd3.5-medium model preset's
_RECIPE: dict[str, Any] = {
    "sampler.steps": 14, "sampler.guidance": 1.0, "algo.group_size": 24, "algo.global_std": True,
    "algo.train_timesteps": 6, "algo.timestep_fraction": 0.9, "algo.weighting": "ghuber",
    "algo.ghuber_power": 0.25, "algo.advantage_max": 1.0, "algo.clip_range": 1.0, "algo.kl_weight": "uniform",
    "algo.ema_beta": 1.0, "algo.kl_ema_weight": "uniform", "algo.kl_ema_decay": 0.3,
    "algo.kl_ema_decay_type": "linear", "algo.solver": "dpm2", "train.optimizer_steps": 1,
    # the evaluation EMA: train.ema True, ema_decay 0.99, ema_update_step_interval 1 in every recipe
    "algo.ema": True, "algo.ema_decay": 0.99, "algo.ema_interval": 1}


@dataclass(frozen=True)
class AWMConfig:
    """AWM settings (``algo.<field>``).

    group_size:        images per prompt [count]; default 24 (``num_image_per_prompt``)
    global_std:        normalise by the std of all the batch's rewards (True, the recipes' ``sample.global_std``)
                       or of the prompt's own
    std_eps:           added to the std; default 1e-4 (``stat_tracking.py``)
    adv_clip_max:      advantage clamp [std units]; default 5 (``train.adv_clip_max``)
    advantage_max:     clamped advantages are rescaled to A / adv_clip_max * advantage_max; default 1.0
                       (``train.advantage_max``); null = no rescaling
    clip_range:        PPO epsilon on the matching-likelihood ratio; default 1.0 (``train.clip_range``); the
                       ratio is exactly 1 on-policy, so it never clips
    train_timesteps:   K, trained steps per image [count]; default 6 (``train.train_timesteps``)
    timestep_fraction: the strata cover steps below int(T * fraction) (0, 1]; default 0.9
    time_type:         "discrete" (strata of [0, hi); PickScore recipe, default), "discrete_wo_init" (of [1, hi);
                       GenEval/OCR) or "discrete_with_init" (step 0 + strata of [1, hi))
    weighting:         per-term matching weight w(mse, t): "ghuber" (default, the recipes), "uniform", "t", "t2",
                       "huber" (``train.weighting``)
    ghuber_power:      p of "ghuber"; default 0.25
    beta:              weight of the velocity KL to the weights before training (>= 0); default 1e-4 (PickScore;
                       GenEval 1e-3, OCR 3e-3)
    kl_weight:         "uniform" (default) or "elbo" weighting of that KL
    ema_beta:          weight of the velocity KL to the EMA policy (>= 0); default 1.0
    kl_ema_weight:     "uniform" (default) or "elbo" weighting of the EMA KL
    kl_ema_decay:      EMA-policy decay cap; default 0.3
    kl_ema_decay_type: "linear" (d = min(cap, 0.001 * optimizer steps), default) or "constant" (d = cap)
    solver:            rollout solver: "dpm2" (default), "ode" (Euler) or "sde" (Flow-GRPO SDE)
    cfg:               guide the update's forward passes with the sampler's CFG scale (``train.cfg``); default
                       False
    ema:               keep an EMA of the trained weights (``train.ema``) for evaluation; default False (the
                       presets: True)
    ema_decay:         the EMA's largest decay (``train.ema_decay`` 0.99): min((1 + g) / (10 + g), ema_decay)
    ema_interval:      an EMA update when (g + 1) % interval == 0 (``train.ema_update_step_interval`` 1)
    """

    group_size: int = 24
    global_std: bool = True
    std_eps: float = 1e-4
    adv_clip_max: float = 5.0
    advantage_max: float | None = 1.0
    clip_range: float = 1.0
    train_timesteps: int = 6
    timestep_fraction: float = 0.9
    time_type: str = "discrete"
    weighting: str = "ghuber"
    ghuber_power: float = 0.25
    beta: float = 1e-4
    kl_weight: str = "uniform"
    ema_beta: float = 1.0
    kl_ema_weight: str = "uniform"
    kl_ema_decay: float = 0.3
    kl_ema_decay_type: str = "linear"
    solver: str = "dpm2"
    cfg: bool = False
    ema: bool = False
    ema_decay: float = 0.99
    ema_interval: int = 1

    def __post_init__(self) -> None:
        check_count(self, "group_size", 2, "for per-prompt advantages")
        if not float(self.std_eps) >= 0:
            raise ValueError(f"algo.std_eps must be >= 0, got {self.std_eps!r}")
        if not float(self.adv_clip_max) > 0:
            raise ValueError(f"algo.adv_clip_max must be > 0, got {self.adv_clip_max!r}")
        if self.advantage_max is not None and not float(self.advantage_max) > 0:
            raise ValueError(f"algo.advantage_max must be > 0 or null, got {self.advantage_max!r}")
        if not float(self.clip_range) > 0:
            raise ValueError(f"algo.clip_range must be > 0, got {self.clip_range!r}")
        check_count(self, "train_timesteps", 1)
        check_fraction(self, "timestep_fraction")
        for key, value, valid in (("time_type", self.time_type, TIME_TYPES), ("weighting", self.weighting, WEIGHTINGS),
                                  ("kl_weight", self.kl_weight, KL_WEIGHTS),
                                  ("kl_ema_weight", self.kl_ema_weight, KL_WEIGHTS),
                                  ("kl_ema_decay_type", self.kl_ema_decay_type, EMA_DECAY_TYPES),
                                  ("solver", self.solver, SOLVERS)):
            if value not in valid:
                raise ValueError(f"algo.{key} must be one of {', '.join(valid)}, got {value!r}")
        if not float(self.ghuber_power) > 0:
            raise ValueError(f"algo.ghuber_power must be > 0, got {self.ghuber_power!r}")
        for key in ("beta", "ema_beta"):
            if not float(getattr(self, key)) >= 0:
                raise ValueError(f"algo.{key} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= float(self.kl_ema_decay) < 1.0:
            raise ValueError(f"algo.kl_ema_decay must be in [0, 1), got {self.kl_ema_decay!r}")
        check_ema_settings(self)


class AWM(StepCountState):
    name: ClassVar[str] = "awm"
    Config: ClassVar[type] = AWMConfig
    #: no sampling log-probs: approx_kl, clip_frac and first_ratio are NaN (null in iterations.jsonl)
    likelihood_free: ClassVar[bool] = True
    FINAL_IMAGE: ClassVar[str] = "sample"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # config/dgx_awm.py::pickscore_sd3_no_cfg_1node (SD3.5-M): T = 14, no CFG, G = 24, 6 trained steps of
        # [0, 12) ("discrete"), ghuber 0.25, KL 1e-4 + EMA KL 1, one optimizer step per epoch
        "awm-paper": {**_RECIPE, "algo.time_type": "discrete", "algo.beta": 1e-4},
        # config/dgx_awm.py::geneval_sd3_no_cfg_1node: "discrete_wo_init", KL 1e-3
        "awm-geneval": {**_RECIPE, "algo.time_type": "discrete_wo_init", "algo.beta": 1e-3},
        # config/dgx_awm.py::ocr_sd3_no_cfg_1node: "discrete_wo_init", KL 3e-3
        "awm-ocr": {**_RECIPE, "algo.time_type": "discrete_wo_init", "algo.beta": 3e-3},
    }

    log_keys: ClassVar[dict[str, str]] = {
        "awm/matching_loss": "AWM: mean weighted flow-matching error w(mse, t) of the update's terms (minus the "
                             "matching log-prob)",
        "awm/weighted_matching_loss": "AWM: mean of A * w(mse, t) over the terms (the advantage-weighted matching "
                                      "loss whose gradient the update follows)",
        "awm/policy_loss": "AWM: mean PPO-form policy term max(-A r, -A clip(r)) (= -mean A on-policy)",
        "awm/ema_kl": "AWM: mean velocity KL to the EMA policy over the terms",
        "awm/ema_decay": "AWM: decay d of this iteration's EMA-policy update (ema <- d ema + (1 - d) theta)",
        "awm/optimizer_steps_total": "AWM: optimizer steps so far (drives the EMA decay)",
        "awm/mean_t": "AWM: mean sigma of the trained steps",
    }
    search_space: ClassVar[dict[str, Any]] = {
        "beta": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True, "help": "KL-to-reference weight"},
        "ema_beta": {"type": "float", "low": 0.0, "high": 2.0, "help": "KL-to-EMA-policy weight"},
        "train_timesteps": {"type": "int", "low": 2, "high": 10},
        "group_size": {"type": "int", "low": 4, "high": 24, "step": 4},
    }
    search_default: ClassVar[tuple[str, ...]] = ("beta",)

    def __init__(self, config: AWMConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        if sampler.prediction != "flow":
            raise ValueError("algo: AWM's flow-matching loss is defined for flow (velocity) models, got sampler "
                             f"prediction {sampler.prediction!r}")
        T, c = sampler.steps, config
        if int(T * float(c.timestep_fraction)) < 1:
            raise ValueError(f"algo.timestep_fraction={c.timestep_fraction} leaves no step to train with "
                             f"sampler.steps={T} (int(T * fraction) must be >= 1)")
        top = max_step_index(T, c.timestep_fraction, c.train_timesteps, c.time_type)
        if top > T - 1:
            raise ValueError(f"algo.timestep_fraction={c.timestep_fraction} with algo.train_timesteps="
                             f"{c.train_timesteps} can draw step {top}, past the last step {T - 1} of "
                             f"sampler.steps={T} (sigma 0 has no velocity to match)")
        #: weight snapshots (bench.model.snapshots): "initial" is the KL reference, "ema" the EMA policy
        self.snapshots: tuple[str, ...] = tuple(n for n, w in (("initial", c.beta), ("ema", c.ema_beta)) if w > 0)
        if c.ema:  # the EMA of the trained weights, which evaluation samples with
            self.snapshots += (EMA_SNAPSHOT,)
        self.eval_weights = EMA_SNAPSHOT if c.ema else "current"
        self.optimizer_steps_total = 0

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=(self.config.solver,) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size, noise_level=self.sampler.noise_level,
                           sde_type=self.sampler.sde_type, guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE)

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        leaf = flow_grpo_advantages(rewards.scores, rollout.leaf_prompts(), self.config.global_std,
                                    self.config.std_eps)
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf)

    def terms(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """The update's (image, step) terms in training order: ([M] leaf indices, [M] step indices), M = L K.
        Images are shuffled; each trains K steps of its own stratified draw (``train_step_indices``)."""
        c, L = self.config, rollout.num_leaves
        gen = generator(self.seed, rollout.iteration, "update")
        images = torch.randperm(L, generator=gen)
        n = c.train_timesteps - 1 if c.time_type == "discrete_with_init" else c.train_timesteps
        u = torch.rand((L, n), generator=gen)
        steps = train_step_indices(rollout.plan.num_steps, c.timestep_fraction, c.train_timesteps, c.time_type, u)
        return images.repeat_interleave(c.train_timesteps), steps[images].flatten()

    def term_noise(self, rollout: Rollout, term_ids: Tensor, shape: tuple[int, ...]) -> Tensor:
        """eps for terms ``term_ids`` [B]: one generator seed per term, so micro-batching changes nothing."""
        return per_term_noise(self.seed, rollout.iteration, "awm_noise", term_ids, shape)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        """Advantage-weighted flow-matching loss on re-noised final samples; then the EMA-policy update."""
        if rollout.latents is None:
            raise ValueError("AWM trains on the rollout's final latents; sample with keep_latents=True")
        cfg = self.config
        leaf_idx, step_idx = self.terms(rollout)
        M = leaf_idx.numel()
        x0_all = rollout.latents[rollout.leaves]
        a_all = scaled_advantages(adv.leaf, cfg.adv_clip_max, cfg.advantage_max)
        params = policy.trainable_parameters()
        guidance = self.sampler.guidance if cfg.cfg else 1.0
        rows = max(1, self.train.micro_batch // (2 if guidance > 1.0 else 1))
        n_opt = max(1, min(self.train.optimizer_steps, rollout.num_leaves))
        K = cfg.train_timesteps
        bounds = torch.linspace(0, rollout.num_leaves, n_opt + 1).round().long().tolist()
        sums = dict.fromkeys(("loss", "kl", "ema_kl", "policy", "match", "weighted", "t"), 0.0)
        nfe = micro = 0
        grad_norm = 0.0
        for s in range(n_opt):
            lo, hi = bounds[s] * K, bounds[s + 1] * K  # whole images per mini-batch
            if hi <= lo:
                continue
            optimizer.zero_grad(set_to_none=True)
            for c in range(lo, hi, rows):
                ids = torch.arange(c, min(c + rows, hi))
                nfe += self._micro_batch(engine, rollout, ids, leaf_idx, step_idx, x0_all, a_all, guidance,
                                         hi - lo, sums)
                micro += 1
            grad_norm = optimizer_step(optimizer, params, self.train.max_grad_norm, nfe)
            self.optimizer_steps_total += 1
        g = self.optimizer_steps_total
        if cfg.ema and (g + 1) % cfg.ema_interval == 0:  # train_sd3_awm.py: ema.step(params, global_step) per epoch
            engine.snapshots.blend(EMA_SNAPSHOT, eval_ema_decay(g, cfg.ema_decay))
        decay = ema_decay(self.optimizer_steps_total, cfg.kl_ema_decay, cfg.kl_ema_decay_type)
        if "ema" in self.snapshots:
            engine.snapshots.blend("ema", decay)
        nan = float("nan")
        return UpdateStats(loss=sums["loss"] / M, approx_kl=nan, clip_frac=nan, grad_norm=grad_norm, first_ratio=nan,
                           edges=M, optimizer_steps=n_opt, micro_batches=micro, kl=sums["kl"] / M, nfe=nfe,
                           metrics={"awm/matching_loss": sums["match"] / M,
                                    "awm/weighted_matching_loss": sums["weighted"] / M,
                                    "awm/policy_loss": sums["policy"] / M, "awm/ema_kl": sums["ema_kl"] / M,
                                    "awm/ema_decay": decay,
                                    "awm/optimizer_steps_total": float(self.optimizer_steps_total),
                                    "awm/mean_t": sums["t"] / M})

    def _micro_batch(self, engine: RolloutEngine, rollout: Rollout, ids: Tensor, leaf_idx: Tensor, step_idx: Tensor,
                     x0_all: Tensor, a_all: Tensor, guidance: float, denom: int, sums: dict[str, float]) -> int:
        """Forward and backward of terms ``ids``; the mini-batch loss is the mean over its ``denom`` terms.
        Returns the NFE spent."""
        cfg = self.config
        leaves, steps = leaf_idx[ids], step_idx[ids]
        dev = engine.policy.device
        x0 = x0_all[leaves].to(dev, torch.float32)
        t = rollout.sigmas[steps].to(dev, torch.float32)
        eps = self.term_noise(rollout, ids, tuple(x0.shape[1:])).to(dev)
        tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - tt) * x0 + tt * eps  # the forward process at the step's noise level
        prompts = rollout.leaf_prompts()[leaves]
        cur = engine.predict(rollout, xt, steps, prompts, guidance=guidance)
        nfe = cur.nfe
        dims = tuple(range(1, x0.dim()))
        v = cur.out.double()
        mse = ((v - (eps.double() - x0.double())) ** 2).mean(dim=dims)
        log_prob = matching_log_prob(mse, t, cfg.weighting, cfg.ghuber_power)
        a = a_all[leaves].to(dev)
        pol = policy_terms(log_prob, log_prob.detach(), a, cfg.clip_range)
        loss = pol.sum()
        if cfg.beta > 0:
            ref = engine.predict(rollout, xt, steps, prompts, weights="initial", guidance=guidance)
            nfe += ref.nfe
            kl = kl_term(v, ref.out, t, cfg.kl_weight)
            loss = loss + cfg.beta * kl.sum()
            sums["kl"] += float(kl.detach().sum())
        else:
            kl = torch.zeros_like(pol)
        ema_kl = torch.zeros_like(pol)
        if cfg.ema_beta > 0:
            ema = engine.predict(rollout, xt, steps, prompts, weights="ema", guidance=guidance)
            nfe += ema.nfe
            ema_kl = kl_term(v, ema.out, t, cfg.kl_ema_weight)
            loss = loss + cfg.ema_beta * ema_kl.sum()
        (loss / denom).backward()
        total = pol.detach() + cfg.beta * kl.detach() + cfg.ema_beta * ema_kl.detach()
        sums["loss"] += float(total.sum())
        sums["ema_kl"] += float(ema_kl.detach().sum())
        sums["policy"] += float(pol.detach().sum())
        sums["match"] += float((-log_prob.detach()).sum())
        sums["weighted"] += float((-a * log_prob.detach()).sum())
        sums["t"] += float(t.sum())
        return nfe

