"""ReFL and DRaFT-K: direct gradient of a differentiable reward through the last denoising steps.

ReFL (Reward Feedback Learning): Xu et al., "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", arXiv 2304.05977, Sec. 4 and Alg. 1; reference code THUDM/ImageReward at commit
c1392c6 (2025-01-24): ``ImageReward/ReFL.py`` (``Trainer.train``: the sampling loop, the gradient step, the
loss), ``scripts/train_refl.sh`` (the released settings). DRaFT-K: Clark et al., "Directly Fine-Tuning
Diffusion Models on Differentiable Rewards", arXiv 2309.17400, Alg. 1 with truncated backpropagation
(DRaFT-K, Sec. 4.1); no official code is public, so DRaFT-K here follows the paper's equations (parity:
"paper equations").

Implementation details:
- Sampling (``plan``): G = ``group_size`` images per prompt (ReFL: 1), every step of the ``solver``: "sde"
  (default: ancestral sampling, ReFL's ``DDPMScheduler.step``; on epsilon models DDIM with eta =
  ``sampler.noise_level`` 1, which is DDPM's "fixed_small" posterior; on flow models the Flow-GRPO SDE) or
  "ode" (DDIM eta 0 / Euler, DRaFT's deterministic sampler). The rollout keeps every latent.
- Stop step (``stop_steps``): per image m uniform in [lo, hi] (ReFL: ``random.randint(30, 39)`` of 40
  DDPM steps; default lo = 3T // 4, hi = T - K; negative values count from the end). The no-grad part of the reference's trajectory, steps
  0..m-1, is the rollout's: the update starts from the rollout's latent after m steps.
- Gradient steps (``grad_steps`` K): from x_m, K denoiser evaluations with gradients at steps m..m+K-1;
  between them deterministic steps (Euler / DDIM eta 0, DRaFT's sampler), and the image is the data
  prediction of the last one (ReFL: ``pred_original_sample`` at step m; x0 = x - sigma v on flow models,
  (x - sqrt(1 - abar) eps) / sqrt(abar) on epsilon models), decoded with gradients (VAE) and scored with
  gradients by the training reward. DRaFT-K is stop = T - K with the ODE:
  the last data prediction at step T - 1 is then the sampler's final image (``stop_steps`` (-K, -K)).
- Loss: ReFL ``loss`` "hinge": relu(``margin`` - r) (``F.relu(-rewards + 2)``), DRaFT "negative": -r; times
  ``loss_scale`` (ReFL's ``grad_scale`` 1e-3), mean over the mini-batch's images (``loss.mean()``).
- Advantages: none (the reward's gradient replaces them); ``advantages`` returns NaN edges and zero leaf
  values so the shared records stay well-formed.
- Optimizer steps: the images split into ``train.optimizer_steps`` mini-batches; ReFL steps once per
  64 images (2 per GPU x 8 GPUs x GA 4), lr 1e-5, gradient clipping 1.0, constant schedule.
- NFE: rollout P G T (x2 with CFG); update P G K (x2 with CFG: the gradient steps use the sampler's
  guidance, as the trajectory they continue), forward with gradients. The update also decodes and scores
  P G images with gradients: traced as ``vae_decode_backward`` (latent models) and ``reward_backward``.

Where treebench differs, and why:
- The rollout samples all T steps (its images are scored like every algorithm's, the reward curve the
  harness reports); the reference samples only to the stop step (mean 34.5 of 40 at the released setting)
  and never scores a finished image. treebench thus spends T - m more evaluations per image (about 14 % at
  the released setting, DRaFT-K: K), all counted in NFE and the trace.
- The stop step and (for the SDE) the noise are drawn per image from the run seed; the reference draws one
  stop step per micro-batch of ``train_batch_size`` (2) images with Python's ``random``.
- The reward's preprocessing is treebench's (``rewards/``): ReFL's gradient path resizes with torchvision
  (Resize(224, bicubic), CenterCrop(224)); treebench's rewards use the preprocessing of each reward model.
- Evaluation EMA (``ema``; ``--use_ema`` in ``scripts/train_refl.sh``, on in the ``refl-paper`` preset, off by
  default): diffusers' ``EMAModel`` at its defaults (decay 0.9999, no warm-up) stepped after every optimizer
  step (``Trainer.train``: ``ema_unet.step`` when the accumulation syncs): s <- d s + (1 - d) theta with
  d = 0 at the first call and min((1 + n) / (10 + n), ``ema_decay``) at call n + 1
  (``algorithms.common.ema_model_decay``). Kept in the weight snapshot "eval_ema" (checkpointed, resumed with
  the step count); evaluation samples with it, as the reference's validation does (``store``/``copy_to``).
  The reference's EMA starts from a second copy of the pretrained UNet; the first call makes it a copy of
  the trained weights either way.
- Not offered: DRaFT-LV (several noisings of the final image).
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
    chain_step_edges,
    check_count,
    check_ema_settings,
    ema_model_decay,
    optimizer_step,
)
from bench.engine import sde
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

SOLVERS = ("sde", "ode")
LOSSES = ("hinge", "negative")


def reward_loss(r: Tensor, loss: str, margin: float, scale: float) -> Tensor:
    """Per-image loss [B]: ``scale`` relu(margin - r) ("hinge", ReFL) or ``scale`` (-r) ("negative", DRaFT)."""
    if loss == "hinge":
        return torch.relu(float(margin) - r) * float(scale)
    if loss == "negative":
        return -r * float(scale)
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


def data_prediction(out: Tensor, x: Tensor, level: Tensor, prediction: str) -> Tensor:
    """x0 from the model output at latents x [B, ...] whose noise levels are ``level`` [B] (flow: sigma,
    x - sigma v; epsilon: alpha_bar, (x - sqrt(1 - abar) eps) / sqrt(abar), the DDPM scheduler's
    ``pred_original_sample``)."""
    lv = level.to(x.device, torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    if prediction == "flow":
        return x - lv * out
    return (x - torch.sqrt(1 - lv) * out) / torch.sqrt(lv)


@dataclass(frozen=True)
class ReFLConfig:
    """ReFL / DRaFT-K settings (``algo.<field>``).

    group_size:  images per prompt [count]; default 1 (ReFL samples one image per prompt)
    stop_steps:  (lo, hi): the first gradient step m is uniform in [lo, hi] (inclusive) per image; a negative
                 value counts from the end (-K = T - K); empty = (3T // 4, T - grad_steps), ReFL's [30, 39]
                 at T = 40. DRaFT-K: (-K, -K)
    grad_steps:  K, denoiser evaluations with gradients per image (ReFL: 1); between them deterministic steps
    solver:      rollout steps: "sde" (ancestral, ReFL's DDPM; default) or "ode" (DRaFT's deterministic sampler)
    loss:        "hinge" (relu(margin - r), ReFL; default) or "negative" (-r, DRaFT)
    margin:      the hinge's margin lambda [reward units]; default 2.0 (ReFL on ImageReward)
    loss_scale:  multiplies the loss (ReFL's ``grad_scale``); default 1e-3
    ema:         keep an EMA of the trained weights (``--use_ema``) for evaluation; default False (``refl-paper``:
                 True)
    ema_decay:   the EMA's largest decay (diffusers ``EMAModel`` default 0.9999)
    """

    group_size: int = 1
    stop_steps: tuple[int, ...] = ()
    grad_steps: int = 1
    solver: str = "sde"
    loss: str = "hinge"
    margin: float = 2.0
    loss_scale: float = 1e-3
    ema: bool = False
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        check_count(self, "group_size", 1)
        rng = tuple(int(v) for v in self.stop_steps)
        if rng and (len(rng) != 2 or (rng[0] < 0) != (rng[1] < 0) or rng[0] > rng[1]):
            raise ValueError(f"algo.stop_steps must be empty or (lo, hi) with lo <= hi, both >= 0 or both < 0 "
                             f"(counted from the end), got {self.stop_steps!r}")
        object.__setattr__(self, "stop_steps", rng)
        check_count(self, "grad_steps", 1)
        if self.solver not in SOLVERS:
            raise ValueError(f"algo.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"algo.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not float(self.loss_scale) > 0:
            raise ValueError(f"algo.loss_scale must be > 0, got {self.loss_scale!r}")
        check_ema_settings(self)


class ReFL(StepCountState):
    name: ClassVar[str] = "refl"
    Config: ClassVar[type] = ReFLConfig
    #: no sampling log-probs: approx_kl, clip_frac and first_ratio are NaN (null in iterations.jsonl)
    likelihood_free: ClassVar[bool] = True
    #: the update back-propagates the training reward (engine.decode_grad / engine.reward_grad)
    reward_gradient: ClassVar[bool] = True
    FINAL_IMAGE: ClassVar[str] = "sample"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # ImageReward scripts/train_refl.sh + ReFL.py (SD 1.4): 40 DDPM steps, no CFG, stop step in [30, 39],
        # one image per prompt, 64 images per optimizer step (2 x 8 GPUs x GA 4), relu(2 - r) * 1e-3, lr 1e-5,
        # full fine-tuning of the UNet; the paper's reward is ImageReward (--reward image_reward)
        "refl-paper": {"sampler.steps": 40, "sampler.guidance": 1.0, "sampler.noise_level": 1.0,
                       "algo.group_size": 1, "algo.stop_steps": [30, 39], "algo.grad_steps": 1, "algo.solver": "sde",
                       "algo.loss": "hinge", "algo.margin": 2.0, "algo.loss_scale": 1e-3,
                       "train.prompts_per_iteration": 64, "train.optimizer_steps": 1, "train.lr": 1e-5,
                       "train.max_grad_norm": 1.0, "model.lora_rank": 0, "algo.ema": True},
        # DRaFT-1 (arXiv 2309.17400, Sec. 4.1): deterministic sampler, gradient through the last step only,
        # loss -r; the sampler's other settings stay the model preset's
        "draft-1": {"algo.grad_steps": 1, "algo.solver": "ode", "algo.loss": "negative", "algo.loss_scale": 1.0,
                    "algo.stop_steps": [-1, -1], "algo.group_size": 1},
    }

    log_keys: ClassVar[dict[str, str]] = {
        "refl/trained_reward": "ReFL: mean reward of the images the update back-propagated through (the data "
                               "predictions at the gradient steps)",
        "refl/hinge_active_frac": "ReFL: fraction of those images with reward below the hinge margin (they carry "
                                  "gradient; 1 for the 'negative' loss)",
        "refl/stop_step_mean": "ReFL: mean first gradient step m of the iteration's images",
    }
    search_space: ClassVar[dict[str, Any]] = {
        "grad_steps": {"type": "int", "low": 1, "high": 4, "help": "K, steps back-propagated through"},
        "loss_scale": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
        "margin": {"type": "float", "low": 0.0, "high": 4.0},
    }
    search_default: ClassVar[tuple[str, ...]] = ("grad_steps",)

    def __init__(self, config: ReFLConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        T, K = sampler.steps, config.grad_steps
        if K > T:
            raise ValueError(f"algo.grad_steps={K} exceeds sampler.steps={T}")
        lo, hi = self.stop_range()
        if lo < 0 or hi + K > T:
            raise ValueError(f"algo.stop_steps={self.config.stop_steps or (lo, hi)} with algo.grad_steps={K} is "
                             f"outside the {T} steps (need 0 <= lo and hi + K <= sampler.steps={T})")
        #: weight snapshots (bench.model.snapshots): the EMA of the trained weights, when on; evaluation samples
        #: with it
        self.snapshots: tuple[str, ...] = (EMA_SNAPSHOT,) if config.ema else ()
        self.eval_weights = EMA_SNAPSHOT if config.ema else "current"
        self.optimizer_steps_total = 0

    def stop_range(self) -> tuple[int, int]:
        """(lo, hi) of the first gradient step, inclusive."""
        if self.config.stop_steps:
            T = self.sampler.steps
            lo, hi = self.config.stop_steps
            return (lo + T, hi + T) if lo < 0 else (lo, hi)
        T, K = self.sampler.steps, self.config.grad_steps
        return min(3 * T // 4, T - K), T - K

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=(self.config.solver,) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size, noise_level=self.sampler.noise_level,
                           sde_type=self.sampler.sde_type, guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE)

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        return Advantages(edge=torch.full((rollout.num_nodes,), float("nan")), leaf=torch.zeros(rollout.num_leaves))

    def stops(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """([L] leaf indices in training order, [L] their first gradient step m), pure in the iteration."""
        lo, hi = self.stop_range()
        gen = generator(self.seed, rollout.iteration, "update")
        order = torch.randperm(rollout.num_leaves, generator=gen)
        m = torch.randint(lo, hi + 1, (rollout.num_leaves,), generator=gen)
        return order, m[order]

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        """Back-propagate the reward of the data prediction after K gradient steps from the stop step."""
        if rollout.latents is None:
            raise ValueError("ReFL restarts from the rollout's latents; sample with keep_latents=True")
        leaves, m = self.stops(rollout)
        chains = chain_step_edges(rollout)  # [C, T]: node of step i of chain c
        roots = torch.nonzero(rollout.parent < 0).flatten()
        root_of = torch.empty_like(roots)
        root_of[rollout.tree[roots]] = roots
        nodes = torch.cat([root_of[:, None], chains], dim=1)  # [C, T + 1]: node at level j of chain c
        chain_of_leaf = rollout.tree[rollout.leaves]
        start = nodes[chain_of_leaf[leaves], m]  # the latent after m rollout steps
        L = leaves.numel()
        params = policy.trainable_parameters()
        rows = max(1, self.train.micro_batch // rollout.plan.cfg_factor())
        n_opt = max(1, min(self.train.optimizer_steps, L))
        bounds = torch.linspace(0, L, n_opt + 1).round().long().tolist()
        sums = {"loss": 0.0, "reward": 0.0, "active": 0.0}
        nfe = micro = 0
        grad_norm = 0.0
        for s in range(n_opt):
            lo, hi = bounds[s], bounds[s + 1]
            if hi <= lo:
                continue
            optimizer.zero_grad(set_to_none=True)
            for c in range(lo, hi, rows):
                ids = torch.arange(c, min(c + rows, hi))
                nfe += self._micro_batch(engine, rollout, leaves[ids], start[ids], m[ids], hi - lo, sums)
                micro += 1
            grad_norm = optimizer_step(optimizer, params, self.train.max_grad_norm, nfe)
            self.optimizer_steps_total += 1
            if self.config.ema:  # ReFL.py: ema_unet.step(unet.parameters()) after every optimizer step
                engine.snapshots.blend(EMA_SNAPSHOT, ema_model_decay(self.optimizer_steps_total, self.config.ema_decay))
        nan = float("nan")
        return UpdateStats(loss=sums["loss"] / L, approx_kl=nan, clip_frac=nan, grad_norm=grad_norm, first_ratio=nan,
                           edges=L, optimizer_steps=n_opt, micro_batches=micro, nfe=nfe,
                           metrics={"refl/trained_reward": sums["reward"] / L,
                                    "refl/hinge_active_frac": sums["active"] / L,
                                    "refl/stop_step_mean": float(m.float().mean())})

    def _micro_batch(self, engine: RolloutEngine, rollout: Rollout, leaves: Tensor, start: Tensor, m: Tensor,
                     denom: int, sums: dict[str, float]) -> int:
        """K gradient steps from the latents ``start`` (nodes at levels ``m``), decode, score, backward of the
        mini-batch mean loss. Returns the NFE spent."""
        cfg, plan = self.config, rollout.plan
        dev = engine.policy.device
        prediction = engine.policy.prediction
        x = rollout.latents[start.to(rollout.latents.device)].to(dev, torch.float32)
        prompts = rollout.leaf_prompts()[leaves]
        levels = rollout.sigmas
        nfe = 0
        for j in range(cfg.grad_steps):
            lvl = m + j
            out = engine.predict(rollout, x, lvl, prompts, guidance=plan.guidance)
            nfe += out.nfe
            a, b = levels[lvl].to(dev), levels[lvl + 1].to(dev)
            if j < cfg.grad_steps - 1:  # a deterministic step (DRaFT's sampler) with gradients
                x = (sde.flow_ode_step(out.out, x, a, b) if prediction == "flow"
                     else sde.ddim_step(out.out, x, a, b, 0.0)).prev_sample
            else:
                x = data_prediction(out.out.float(), x, a, prediction)
        images = engine.decode_grad(x)
        r = engine.reward_grad(rollout, images, leaves)
        per = reward_loss(r, cfg.loss, cfg.margin, cfg.loss_scale)
        (per.sum() / denom).backward()
        sums["loss"] += float(per.detach().sum())
        sums["reward"] += float(r.detach().sum())
        active = (r.detach() < cfg.margin) if cfg.loss == "hinge" else torch.ones_like(r, dtype=torch.bool)
        sums["active"] += float(active.float().sum())
        return nfe

