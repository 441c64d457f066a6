"""DiffusionNFT: online RL on the forward process, without likelihoods.

Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117;
reference code NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` (``main``: sampling, advantages, the
training loop and the old-policy update; ``return_decay``), ``config/nft.py`` (the SD3.5-M recipes),
``config/base.py`` (defaults), ``flow_grpo/stat_tracking.py`` and ``flow_grpo/diffusers_patch/solver.py``.

Implementation details:
- Sampling (``plan``): G = ``group_size`` images per prompt (``num_image_per_prompt`` 24), each from its
  own initial noise, by a deterministic solver: ``solver="dpm2"`` (the released recipe: ``deterministic``,
  ``solver="dpm2"``, the multistep DPM-Solver++(2M) the engine shares with MixGRPO-Flash; its first step
  is a DDIM/Euler step, its last returns x0), ``"ode"`` (Euler) or ``"sde"`` (the Flow-GRPO SDE with the
  sampler's noise level, ``deterministic=False``). Only the clean final latents are kept for training.
  Rollouts use the *old* policy (``set_adapter("old")`` around the pipeline call): the weight snapshot
  "old" (``bench.model.snapshots``), ``RolloutPlan.weights="old"``. The recipes sample without CFG
  (``config.sample.guidance_scale = 1.0`` in ``config/nft.py``); the preset sets ``sampler.guidance`` 1.
- Advantages (``advantages``): the Flow-GRPO stat tracker (``PerPromptStatTracker(global_std=True)``,
  cleared every epoch): (r - mean_prompt) / (std_all + 1e-4) with numpy's population std
  (``algorithms.common.flow_grpo_advantages``).
- Optimality probability (``optimality_probability``): A clamped to [-c, c] (c = ``adv_clip_max`` 5),
  reshaped by ``adv_mode`` ("all" in the recipes), then r = clamp(A / c / 2 + 1/2, 0, 1).
- Loss (``nft_loss``, the paper's implicit positive and negative policies; ``main``'s training loop):
  for each image j and each trained step i, x_t = (1 - t) x0 + t eps with t = sigma_i and fresh
  eps ~ N(0, I); v = v_theta(x_t, t), v_old = v_old(x_t, t) (no gradient);
  v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v; x0+- = x_t - t v+-;
  L+- = mean((x0+- - x0)^2 / w+-) with the adaptive weight w+- = clip(mean|x0+- - x0|, 1e-5) (no gradient);
  loss = c * mean_j,i [r_j L+ / beta + (1 - r_j) L- / beta] + kl_beta * mean((v - v_ref)^2).
  ``beta`` = ``config.beta`` (1.0; 0.1 for OCR and multi-reward), ``kl_beta`` = ``train.beta`` (1e-4).
- Trained steps: per image a random permutation of the T steps, its first int(T * ``timestep_fraction``)
  (0.99: 9 of 10); the reference loops over those steps with the image's own permutation
  (``perms_time``). treebench draws eps per (image, step) from a seed of its own, so the update does not
  depend on micro-batching.
- Optimizer steps: the images of an iteration split into ``train.optimizer_steps`` mini-batches (the
  recipes: one step per epoch, two for OCR); the loss is the mean over the mini-batch's (image, step)
  terms (``loss / effective_grad_accum_steps``). Gradient clipping ``train.max_grad_norm`` (1.0).
- Old policy (``decay_type``): after the iteration's update, old <- d old + (1 - d) theta with
  d = ``old_policy_decay(optimizer steps so far)``: type 0 -> 0 (on-policy), 1 -> min(0.001 s, 0.5),
  2 -> 0 for s < 75, then min(0.0075 (s - 75), 0.999) (``return_decay``). The optimizer-step count is
  the algorithm's checkpointed state; the "old" weights are checkpointed with the policy.
- NFE: rollout P G T (x2 with CFG); update, per trained (image, step): 1 forward with gradients + 1 of
  the old policy (+ 1 of the reference when kl_beta > 0), all unguided (training is CFG-free, as the
  recipes are).

Where treebench differs, and why:
- The reference's KL reference is the base model with the LoRA adapter disabled and fails for full
  fine-tuning (``assert False``); treebench evaluates a weight snapshot "initial" taken before training,
  which equals the LoRA base (LoRA's B starts at zero) and also works for full fine-tuning, at the
  memory of one more copy of the trainable weights.
- EMA (``ema``; ``train.ema`` in ``config/base.py``, on in the presets): ``EMAModuleWrapper(decay=0.9,
  update_step_interval=1)`` stepped after every optimizer step with the step count s, decay
  min((1 + s) / (10 + s), 0.9) (``algorithms.common.ema_schedule``), kept in the weight snapshot "eval_ema"
  (checkpointed with the run, restored on resume); evaluation samples with it (``eval_weights``) and
  ``bench export-lora`` exports it, as ``eval`` and ``save_checkpoint`` copy the EMA in. The rollouts use the
  "old" policy and the loss the trained weights, as in the reference.
- The reference's CFG branch of training (``guidance_scale > 1`` concatenates negative
  embeddings) is never used by its recipes; treebench trains unguided whatever the sampler's guidance.
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
    ema_schedule,
    flow_grpo_advantages,
    optimizer_step,
    per_term_noise,
)
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

ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")
SOLVERS = ("dpm2", "ode", "sde")
#: (flat, uprate, uphold) of each ``decay_type`` (``return_decay``)
DECAY_TYPES: dict[int, tuple[int, float, float]] = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
#: lower bound of the adaptive loss weight (``.clip(min=0.00001)``)
WEIGHT_FLOOR = 1e-5


def old_policy_decay(step: int, decay_type: int) -> float:
    """Decay d of the old-policy update old <- d old + (1 - d) theta after ``step`` optimizer steps
    (``return_decay``): 0 before ``flat`` steps, then min((step - flat) * uprate, uphold)."""
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"unknown decay_type {decay_type!r}; valid: {sorted(DECAY_TYPES)}")
    flat, uprate, uphold = DECAY_TYPES[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


def optimality_probability(adv: Tensor, adv_clip_max: float, mode: str = "all") -> Tensor:
    """r in [0, 1] from advantages [B]: clamp to [-c, c], reshape by ``mode`` (ADV_MODES), then
    r = clamp(A / c / 2 + 0.5, 0, 1) (the training loop's ``normalized_advantages_clip``)."""
    c = float(adv_clip_max)
    a = adv.float().clamp(-c, c)
    if mode == "positive_only":
        a = a.clamp(0, c)
    elif mode == "negative_only":
        a = a.clamp(-c, 0)
    elif mode == "one_only":
        a = torch.where(a > 0, torch.ones_like(a), torch.zeros_like(a))
    elif mode == "binary":
        a = torch.sign(a)
    elif mode != "all":
        raise ValueError(f"unknown adv_mode {mode!r}; valid: {', '.join(ADV_MODES)}")
    return (a / c / 2.0 + 0.5).clamp(0, 1)


def _adaptive_mse(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """[B] mean((x0_pred - x0)^2 / w) with w = clip(mean|x0_pred - x0|, WEIGHT_FLOOR), w without gradient."""
    dims = tuple(range(1, x0.dim()))
    with torch.no_grad():
        w = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(WEIGHT_FLOOR)
    return ((x0_pred - x0) ** 2 / w).mean(dim=dims)


@dataclass(frozen=True)
class NFTLoss:
    """Per-term values [B]: ``loss`` (with gradients) and the adaptive-weighted x0 errors of the implicit
    positive and negative policies (detached)."""

    loss: Tensor
    positive: Tensor
    negative: Tensor


def nft_loss(v: Tensor, v_old: Tensor, x0: Tensor, xt: Tensor, t: Tensor, r: Tensor, beta: float,
             adv_clip_max: float) -> NFTLoss:
    """Per-term policy loss [B] of DiffusionNFT (before the mean over terms): the implicit positive
    policy v+ = beta v + (1 - beta) v_old is pulled towards x0 with weight r, the implicit negative one
    v- = (1 + beta) v_old - beta v with weight 1 - r (arXiv 2509.16117, the NFT objective; reference
    ``train_nft_sd3.py`` training loop): c * (r L+ + (1 - r) L-) / beta.

    v, v_old, x0, xt [B, C, h, w]; t [B] (the noise level sigma of xt); r [B] in [0, 1]."""
    t = t.to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
    v_old = v_old.detach()
    v_pos = beta * v + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v
    pos = _adaptive_mse(xt - t * v_pos, x0)
    neg = _adaptive_mse(xt - t * v_neg, x0)
    r = r.to(pos.dtype)
    loss = float(adv_clip_max) * (r * pos / beta + (1.0 - r) * neg / beta)
    return NFTLoss(loss=loss, positive=pos.detach(), negative=neg.detach())


@dataclass(frozen=True)
class DiffusionNFTConfig:
    """DiffusionNFT settings (``algo.<field>``).

    group_size:        images per prompt [count]; default 24 (``num_image_per_prompt``)
    beta:              NFT's beta, the step between the old policy and its implicit positive/negative
                       policies (> 0); default 1.0 (``config.beta``; 0.1 in the OCR and multi-reward recipes)
    kl_beta:           weight of the velocity MSE to the initial weights (>= 0); default 1e-4 (``train.beta``)
    decay_type:        old-policy decay schedule 0 | 1 | 2 (``return_decay``); default 1 (2 for OCR)
    adv_mode:          reshaping of the advantages before r: one of ADV_MODES; default "all"
    adv_clip_max:      advantage clamp and loss scale c [std units]; default 5 (``train.adv_clip_max``)
    timestep_fraction: trained steps per image, int(T * fraction) of a random permutation (0, 1]; default 0.99
    global_std:        normalise by the std of all the batch's rewards (True, ``sample.global_std``) or of the
                       prompt's own
    std_eps:           added to the std; default 1e-4 (``stat_tracking.py``)
    solver:            rollout solver: "dpm2" (default, the recipes), "ode" (Euler) or "sde" (Flow-GRPO SDE)
    ema:               keep an EMA of the trained weights (``train.ema``) for evaluation and export; default
                       False (presets True)
    ema_decay:         the EMA's largest decay (``decay=0.9``): min((1 + s) / (10 + s), ema_decay) at step s
    """

    group_size: int = 24
    beta: float = 1.0
    kl_beta: float = 1e-4
    decay_type: int = 1
    adv_mode: str = "all"
    adv_clip_max: float = 5.0
    timestep_fraction: float = 0.99
    global_std: bool = True
    std_eps: float = 1e-4
    solver: str = "dpm2"
    ema: bool = False
    ema_decay: float = 0.9

    def __post_init__(self) -> None:
        check_count(self, "group_size", 2, "for per-prompt advantages")
        if not float(self.beta) > 0:
            raise ValueError(f"algo.beta must be > 0 (the loss divides by it), got {self.beta!r}")
        if not float(self.kl_beta) >= 0:
            raise ValueError(f"algo.kl_beta must be >= 0, got {self.kl_beta!r}")
        if self.decay_type not in DECAY_TYPES or isinstance(self.decay_type, bool):
            raise ValueError(f"algo.decay_type must be one of {sorted(DECAY_TYPES)}, got {self.decay_type!r}")
        if self.adv_mode not in ADV_MODES:
            raise ValueError(f"algo.adv_mode must be one of {', '.join(ADV_MODES)}, got {self.adv_mode!r}")
        if not float(self.adv_clip_max) > 0:
            raise ValueError(f"algo.adv_clip_max must be > 0, got {self.adv_clip_max!r}")
        check_fraction(self, "timestep_fraction")
        if not float(self.std_eps) >= 0:
            raise ValueError(f"algo.std_eps must be >= 0, got {self.std_eps!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"algo.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        check_ema_settings(self)


class DiffusionNFT(StepCountState):
    name: ClassVar[str] = "diffusionnft"
    Config: ClassVar[type] = DiffusionNFTConfig
    #: no log-probs: approx_kl, clip_frac and first_ratio are NaN (null in iterations.jsonl)
    likelihood_free: ClassVar[bool] = True
    FINAL_IMAGE: ClassVar[str] = "sample"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # config/nft.py::sd3_geneval / sd3_pickscore / sd3_hpsv2 (SD3.5-M): T = 10, no CFG, dpm2, G = 24,
        # beta 1, decay type 1, train.beta 1e-4, one optimizer step per epoch (gradient_step_per_epoch=1)
        "diffusionnft-paper": {"sampler.steps": 10, "sampler.guidance": 1.0, "algo.group_size": 24,
                               "algo.beta": 1.0, "algo.decay_type": 1, "algo.kl_beta": 1e-4,
                               "algo.solver": "dpm2", "algo.ema": True, "train.optimizer_steps": 1},
        # config/nft.py::sd3_ocr: beta 0.1, decay type 2, two optimizer steps per epoch
        "diffusionnft-ocr": {"sampler.steps": 10, "sampler.guidance": 1.0, "algo.group_size": 24,
                             "algo.beta": 0.1, "algo.decay_type": 2, "algo.kl_beta": 1e-4,
                             "algo.solver": "dpm2", "algo.ema": True, "train.optimizer_steps": 2},
    }

    log_keys: ClassVar[dict[str, str]] = {
        "diffusionnft/old_decay": "DiffusionNFT: decay d of this iteration's old-policy update "
                                  "(old <- d old + (1 - d) theta)",
        "diffusionnft/optimizer_steps_total": "DiffusionNFT: optimizer steps so far (drives the decay schedule)",
        "diffusionnft/old_deviation": "DiffusionNFT: mean squared velocity difference between the trained and "
                                      "the old (sampling) policy over the update's terms",
        "diffusionnft/positive_loss": "DiffusionNFT: mean adaptive-weighted x0 error of the implicit positive "
                                      "policy",
        "diffusionnft/negative_loss": "DiffusionNFT: mean adaptive-weighted x0 error of the implicit negative "
                                      "policy",
        "diffusionnft/r_extreme_frac": "DiffusionNFT: fraction of images whose optimality probability r is 0 or 1 "
                                       "(advantage at the clamp)",
    }
    search_space: ClassVar[dict[str, Any]] = {
        "beta": {"type": "float", "low": 0.05, "high": 1.0, "log": True, "help": "NFT beta"},
        "decay_type": {"type": "categorical", "choices": [0, 1, 2], "help": "old-policy decay schedule"},
        "group_size": {"type": "int", "low": 4, "high": 24, "step": 4},
    }
    search_default: ClassVar[tuple[str, ...]] = ("beta",)

    def __init__(self, config: DiffusionNFTConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        if sampler.prediction != "flow":
            raise ValueError("algo: DiffusionNFT's forward process is defined for flow (velocity) models, got "
                             f"sampler prediction {sampler.prediction!r}")
        if self._n_train() < 1:
            raise ValueError(f"algo.timestep_fraction={config.timestep_fraction} trains no step with "
                             f"sampler.steps={sampler.steps} (int(T * fraction) must be >= 1)")
        #: weight snapshots (bench.model.snapshots): "old" samples the rollouts; "initial" is the KL reference
        self.snapshots: tuple[str, ...] = ("old", "initial") if config.kl_beta > 0 else ("old",)
        if config.ema:  # the EMA of the trained weights, which evaluation samples with
            self.snapshots += (EMA_SNAPSHOT,)
        self.eval_weights = EMA_SNAPSHOT if config.ema else "current"
        self.optimizer_steps_total = 0

    def _n_train(self) -> int:
        return int(self.sampler.steps * float(self.config.timestep_fraction))

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=(self.config.solver,) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size, noise_level=self.sampler.noise_level,
                           sde_type=self.sampler.sde_type, guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE, weights="old")

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        leaf = flow_grpo_advantages(rewards.scores, rollout.leaf_prompts(), self.config.global_std,
                                    self.config.std_eps)
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf)

    def terms(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """The update's (image, step) terms in training order: ([M] leaf indices, [M] step indices).
        Images are shuffled; each trains the first int(T * fraction) steps of its own random permutation."""
        L, T, n = rollout.num_leaves, rollout.plan.num_steps, self._n_train()
        gen = generator(self.seed, rollout.iteration, "update")
        images = torch.randperm(L, generator=gen)
        steps = torch.argsort(torch.rand((L, T), generator=gen), dim=1)[:, :n]
        return images.repeat_interleave(n), steps[images].flatten()

    def term_noise(self, rollout: Rollout, term_ids: Tensor, shape: tuple[int, ...]) -> Tensor:
        """eps for terms ``term_ids`` [B]: one generator seed per term, so micro-batching changes nothing."""
        return per_term_noise(self.seed, rollout.iteration, "diffusionnft_noise", term_ids, shape)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        """Flow-matching NFT loss on forward-noised final samples; then the old-policy update."""
        if rollout.latents is None:
            raise ValueError("DiffusionNFT trains on the rollout's final latents; sample with keep_latents=True")
        cfg = self.config
        leaf_idx, step_idx = self.terms(rollout)
        M = leaf_idx.numel()
        x0_all = rollout.latents[rollout.leaves]
        r_all = optimality_probability(adv.leaf, cfg.adv_clip_max, cfg.adv_mode)
        params = policy.trainable_parameters()
        n_opt = max(1, min(self.train.optimizer_steps, rollout.num_leaves))
        per_image = self._n_train()
        bounds = torch.linspace(0, rollout.num_leaves, n_opt + 1).round().long().tolist()
        sums = {"loss": 0.0, "kl": 0.0, "dev": 0.0, "pos": 0.0, "neg": 0.0}
        nfe = micro = 0
        grad_norm = 0.0
        for s in range(n_opt):
            lo, hi = bounds[s] * per_image, bounds[s + 1] * per_image  # whole images per mini-batch
            if hi <= lo:
                continue
            optimizer.zero_grad(set_to_none=True)
            for c in range(lo, hi, max(1, self.train.micro_batch)):
                ids = torch.arange(c, min(c + max(1, self.train.micro_batch), hi))
                n_mb = self._micro_batch(engine, rollout, ids, leaf_idx, step_idx, x0_all, r_all, hi - lo, sums)
                nfe += n_mb
                micro += 1
            grad_norm = optimizer_step(optimizer, params, self.train.max_grad_norm, nfe)
            if cfg.ema:  # train_nft_sd3.py: ema.step(params, global_step) after each optimizer step
                for _, d in ema_schedule(self.optimizer_steps_total, 1, 1, 1, cfg.ema_decay):
                    engine.snapshots.blend(EMA_SNAPSHOT, d)
            self.optimizer_steps_total += 1
        decay = old_policy_decay(self.optimizer_steps_total, cfg.decay_type)
        engine.snapshots.blend("old", decay)
        nan = float("nan")
        return UpdateStats(loss=sums["loss"] / M, approx_kl=nan, clip_frac=nan, grad_norm=grad_norm, first_ratio=nan,
                           edges=M, optimizer_steps=n_opt, micro_batches=micro, kl=sums["kl"] / M, nfe=nfe,
                           metrics={"diffusionnft/old_decay": decay,
                                    "diffusionnft/optimizer_steps_total": float(self.optimizer_steps_total),
                                    "diffusionnft/old_deviation": sums["dev"] / M,
                                    "diffusionnft/positive_loss": sums["pos"] / M,
                                    "diffusionnft/negative_loss": sums["neg"] / M,
                                    "diffusionnft/r_extreme_frac": float(((r_all <= 0) | (r_all >= 1)).float().mean())})

    def _micro_batch(self, engine: RolloutEngine, rollout: Rollout, ids: Tensor, leaf_idx: Tensor,
                     step_idx: Tensor, x0_all: Tensor, r_all: Tensor, denom: int, sums: dict[str, float]) -> int:
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
        old = engine.predict(rollout, xt, steps, prompts, weights="old")
        cur = engine.predict(rollout, xt, steps, prompts)
        nfe = old.nfe + cur.nfe
        terms = nft_loss(cur.out, old.out, x0, xt, t, r_all[leaves].to(dev), cfg.beta, cfg.adv_clip_max)
        loss = terms.loss.sum()
        if cfg.kl_beta > 0:
            ref = engine.predict(rollout, xt, steps, prompts, weights="initial")
            nfe += ref.nfe
            kl = ((cur.out - ref.out) ** 2).mean(dim=tuple(range(1, x0.dim())))  # kl_div_loss
            loss = loss + cfg.kl_beta * kl.sum()
            sums["kl"] += float(kl.detach().sum())
        (loss / denom).backward()
        dims = tuple(range(1, x0.dim()))
        sums["loss"] += float(terms.loss.detach().sum())
        sums["dev"] += float(((cur.out.detach() - old.out) ** 2).mean(dim=dims).sum())
        sums["pos"] += float(terms.positive.sum())
        sums["neg"] += float(terms.negative.sum())
        return nfe

