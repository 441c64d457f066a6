"""Flow-GRPO and Flow-GRPO-Fast: GRPO on a stochastic flow sampler, with a KL to the reference.

Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470; reference code
yifan123/flow_grpo ``scripts/train_sd3.py`` (the trainer), ``flow_grpo/stat_tracking.py``
(``PerPromptStatTracker.update``), ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``
(``sde_step_with_logprob``), ``config/grpo.py`` (the paper settings). Flow-GRPO-Fast is the same
repository's ``scripts/train_sd3_fast.py`` with ``sd3_pipeline_with_logprob_fast`` (SDE window).

Implementation details:
- Sampling (``plan``): G = ``group_size`` i.i.d. chains per prompt (``num_image_per_prompt``), every
  step the Flow-GRPO SDE (``sampler.sde`` "flow_grpo", noise level a = 0.7); the image is the last
  sampled latent. ``shared_noise`` = the fast trainer's ``same_latent`` (off in the paper settings).
- Advantages (``flow_grpo_advantages``): ``PerPromptStatTracker.update`` with type "grpo", cleared
  every epoch: A = (r - mean_prompt) / (std + 1e-4) with numpy's population std; ``global_std``
  (the ``config/grpo.py`` default) takes the std over *all* rewards of the batch, otherwise the
  prompt's own. Groups are the prompts of the batch (the reference keys on the prompt text).
- Trained steps (``_trained_edges``): the first ``int(T * timestep_fraction)`` steps of every chain, in
  step order (``train_timesteps = range(num_train_timesteps)``, fraction 0.99: with T = 10 all but the
  last step). The released trainer uses no per-sample random permutation of steps (that is
  ddpo-pytorch's ``perms``); chains are shuffled (``perm = torch.randperm(total_batch_size)``).
- Loss (``update`` -> ``algorithms.common.ppo_update``): PPO clip 1e-4 on the stored log-probs,
  advantages clamped to +-5, mean over (chain, step) terms; KL to the frozen reference with weight
  ``beta`` (0.04 GenEval/OCR, 0.01 PickScore): per edge mean over latent dims of
  (mean_theta - mean_ref)^2 / (2 std_dev_t^2), then the mean over edges (``kl_loss``). ``kl_divisor``
  "noise_scale" (default) divides by the code's std_dev_t = a sqrt(sigma / (1 - sigma)), *without* the
  transition's sqrt(-dt); "step_std" uses the transition std (the exact Gaussian KL). The reference
  model's evaluation is one more (guided) forward pass per trained edge, counted as update NFE.
- Flow-GRPO-Fast (``sde_window_size`` > 0, preset "flowgrpo-fast"): one window of
  ``sde_window_size`` consecutive SDE steps per iteration, its start uniform in
  [lo, hi - size] with (lo, hi) = ``sde_window_range`` (default (0, T // 2), the fast configs'
  ``(0, num_steps // 2)``); every other step is a deterministic ODE (noise level 0) step; exactly the
  window's steps are trained (``num_train_timesteps = sde_window_size``). The reference draws the window
  per pipeline call with Python's ``random``; treebench draws it per iteration from the run seed, so
  ``plan`` stays a pure function of the iteration.
- Options: ``sampler.sde=cps`` samples with coefficients-preserving sampling (the same
  ``sde_step_with_logprob`` with ``sde_type='cps'``, commit 3d02fd9; preset "flowgrpo-fast-cps" =
  ``config/grpo.py::pickscore_sd3_fast_nocfg``); ``guard`` = GRPO-Guard (arXiv 2510.22319,
  ``scripts/train_sd3_GRPO_Guard.py`` at commit 2e2f712): RatioNorm and gradient reweighting in place of
  the plain ratio (``algorithms.common.guard_surrogate``; preset "flowgrpo-guard" =
  ``config/grpo_guard.py::general_ocr_sd3_rationorm``).
- EMA (``ema``, ``train.ema`` in every released config, on in the presets): ``EMAModuleWrapper(decay=0.9,
  update_step_interval=8)`` kept in the weight snapshot "eval_ema" (``bench.model.snapshots``: checkpointed with
  the run, restored on resume) and stepped as ``train_sd3.py`` does (``algorithms.common.ema_schedule``:
  after every training batch, ``ema_calls_per_step`` = GA batches per optimizer step, 2 in the presets);
  evaluation samples with it (``eval_weights``), ``bench export-lora`` exports it, as ``eval`` and
  ``save_ckpt`` copy the EMA in. Training and rollouts use the trained weights.
- Not reproduced: dropping samples whose advantages
  are all zero (``mask`` in the trainer: with the global std this only happens for a reward exactly
  equal to its prompt's mean).
- CFG in the update (``cfg_grad``): ``train_sd3.py::compute_log_prob`` detaches the unconditional branch
  (``noise_pred_uncond.detach()``), so with CFG the gradient flows through the conditional branch only:
  ``cfg_grad="cond"`` (default); ``train_sd3_fast.py::compute_log_prob`` differentiates both branches:
  ``cfg_grad="both"`` (preset "flowgrpo-fast"). The NFE are the same (both rows are evaluated).

Why ``grpo`` stays separate: ``algorithms/grpo.py`` is the smallest algorithm of the harness (docs/PLUGINS.md
points to it as the template; smoke tests use it); folding Flow-GRPO's window, KL divisor and
stat-tracking options into it would lose that. ``flowgrpo`` is the benchmarked method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from algorithms.common import (
    EMA_SNAPSHOT,
    KL_DIVISORS,
    PAPER_SAMPLER,
    StepCountState,
    chain_edge_advantages,
    chain_step_edges,
    check_count,
    check_ema_settings,
    check_fraction,
    check_guard,
    check_ppo_settings,
    config_ppo_update,
    ema_schedule,
    flow_grpo_advantages,
    shuffled_chain_edges,
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

#: with CFG, the branches the update differentiates: the conditional only (train_sd3.py) or both
CFG_GRADS = ("cond", "both")


@dataclass(frozen=True)
class FlowGRPOConfig:
    """Flow-GRPO settings (``algo.<field>``).

    group_size:        chains (images) per prompt [count]; default 24 (``num_image_per_prompt``)
    timestep_fraction: the first int(T * fraction) steps of every chain are trained (0, 1]; default 0.99
                       (``train.timestep_fraction``); ignored when ``sde_window_size`` > 0
    global_std:        normalise by the std of all the batch's rewards (True, ``sample.global_std``) or
                       of the prompt's own rewards (False)
    std_eps:           added to the std; default 1e-4 (``stat_tracking.py``)
    shared_noise:      a prompt's chains start from one initial noise; default False (``same_latent``)
    clip_range:        PPO epsilon [ratio]; default 1e-4 (``train.clip_range``)
    adv_clip_max:      advantage clamp [std units]; default 5 (``train.adv_clip_max``)
    beta:              weight of the KL to the reference; default 0 (``config/base.py``; the paper
                       presets set 0.04 for GenEval/OCR and 0.01 for PickScore). The frozen reference
                       is the base model under LoRA (``model.lora_rank`` > 0): with full fine-tuning
                       the harness has no reference copy and beta > 0 raises NotImplementedError
    kl_divisor:        "noise_scale" (the code's std_dev_t^2, default) or "step_std" (the transition's
                       std^2, the exact Gaussian KL)
    sde_window_size:   0 = all steps SDE (Flow-GRPO); > 0 = Flow-GRPO-Fast: this many consecutive SDE
                       steps per iteration, ODE elsewhere, only they are trained (fast configs: 2)
    sde_window_range:  (lo, hi) the window lies in [lo, hi) of the steps; empty = (0, T // 2)
    cfg_grad:          with CFG, the update's gradient flows through the conditional branch only ("cond",
                       default: ``train_sd3.py`` detaches the unconditional one) or through both ("both":
                       ``train_sd3_fast.py``)
    ema:               keep an EMA of the trained weights (``train.ema``) for evaluation and export; default False
                       (presets True)
    ema_decay:         the EMA's largest decay (``decay=0.9``); the decay at optimizer step s is
                       min((1 + s) / (10 + s), ema_decay)
    ema_interval:      an EMA update when (s + 1) % interval == 0 (``update_step_interval=8``)
    ema_calls_per_step: EMA step calls per optimizer step (``train_sd3.py`` calls it after every training
                       batch: its GA, 2 in the paper configs); default 1
    guard:             GRPO-Guard (arXiv 2510.22319): RatioNorm + gradient reweighting in place of the plain
                       PPO ratio (``algorithms.common.guard_surrogate``; flow_grpo
                       ``scripts/train_sd3_GRPO_Guard.py``, ``config.rationorm``); default False. Needs
                       ``sampler.sde=flow_grpo``; its released configs pair it with clip_range 2e-6 to 4e-6
                       (preset "flowgrpo-guard")
    """

    group_size: int = 24
    timestep_fraction: float = 0.99
    global_std: bool = True
    std_eps: float = 1e-4
    shared_noise: bool = False
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.0
    kl_divisor: str = "noise_scale"
    sde_window_size: int = 0
    sde_window_range: tuple[int, ...] = ()
    cfg_grad: str = "cond"
    ema: bool = False
    ema_decay: float = 0.9
    ema_interval: int = 8
    ema_calls_per_step: int = 1
    guard: bool = False

    def __post_init__(self) -> None:
        check_count(self, "group_size", 2, "for group-relative advantages")
        check_fraction(self, "timestep_fraction")
        if self.kl_divisor not in KL_DIVISORS:
            raise ValueError(f"algo.kl_divisor must be one of {', '.join(KL_DIVISORS)}, got {self.kl_divisor!r}")
        check_count(self, "sde_window_size", 0)
        rng = tuple(int(v) for v in self.sde_window_range)
        if rng and (len(rng) != 2 or not 0 <= rng[0] < rng[1]):
            raise ValueError(f"algo.sde_window_range must be empty or (lo, hi) with 0 <= lo < hi, "
                             f"got {self.sde_window_range!r}")
        object.__setattr__(self, "sde_window_range", rng)
        if self.cfg_grad not in CFG_GRADS:
            raise ValueError(f"algo.cfg_grad must be one of {', '.join(CFG_GRADS)}, got {self.cfg_grad!r}")
        check_ema_settings(self)
        check_ppo_settings(self)


class FlowGRPO(StepCountState):
    name: ClassVar[str] = "flowgrpo"
    Config: ClassVar[type] = FlowGRPOConfig
    FINAL_IMAGE: ClassVar[str] = "sample"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # config/grpo.py::geneval_sd3 / general_ocr_sd3 (SD3.5-M): T = 10, CFG 4.5, a = 0.7, G = 24,
        # fraction 0.99, beta 0.04, global std; an optimizer step every num_batches_per_epoch // 2
        # batches -> 2 optimizer steps per epoch
        "flowgrpo-paper": {**PAPER_SAMPLER,
                           "sampler.sde": "flow_grpo", "algo.group_size": 24, "algo.timestep_fraction": 0.99,
                           "algo.beta": 0.04, "algo.global_std": True, "algo.ema": True, "algo.ema_calls_per_step": 2,
                          "train.optimizer_steps": 2},
        # config/grpo.py::pickscore_sd3: as above with beta 0.01
        "flowgrpo-pickscore": {**PAPER_SAMPLER,
                               "sampler.sde": "flow_grpo", "algo.group_size": 24, "algo.beta": 0.01,
                               "algo.global_std": True, "algo.ema": True, "algo.ema_calls_per_step": 2,
                          "train.optimizer_steps": 2},
        # Flow-GRPO-Fast, config/grpo.py::pickscore_sd3_fast with config/base.py (flow_grpo 54809b5, as at
        # 74db691) and train_sd3_fast.py: T = 10, CFG 4.5, Flow-GRPO SDE at noise level 0.8, G = 24, a 2-step
        # SDE window (base sde_window_size) anywhere in the base range (0, 10), ODE elsewhere, clip 1e-5, no
        # KL, global std, both CFG branches differentiated, 2 optimizer steps per epoch
        "flowgrpo-fast": {"sampler.steps": 10, "sampler.guidance": 4.5, "sampler.noise_level": 0.8,
                          "sampler.sde": "flow_grpo", "algo.group_size": 24, "algo.sde_window_size": 2,
                          "algo.sde_window_range": [0, 10], "algo.clip_range": 1e-5, "algo.beta": 0.0,
                          "algo.global_std": True, "algo.cfg_grad": "both", "algo.ema": True,
                          "algo.ema_calls_per_step": 2,
                          "train.optimizer_steps": 2},
        # config/grpo.py::pickscore_sd3_fast_nocfg (flow_grpo 3d02fd9): the CPS sampler at noise level 0.8,
        # a 3-step SDE window in the first half, no CFG (train.cfg False), clip 1e-5, G = 18, global std,
        # an optimizer step every num_batches_per_epoch // 2 batches -> 2 per epoch
        "flowgrpo-fast-cps": {"sampler.steps": 10, "sampler.guidance": 1.0, "sampler.noise_level": 0.8,
                              "sampler.sde": "cps", "algo.group_size": 18, "algo.sde_window_size": 3,
                              "algo.sde_window_range": [0, 5], "algo.clip_range": 1e-5, "algo.beta": 0.0,
                              "algo.global_std": True, "algo.ema": True, "algo.ema_calls_per_step": 2,
                          "train.optimizer_steps": 2},
        # GRPO-Guard, config/grpo_guard.py::general_ocr_sd3_rationorm (flow_grpo 2e2f712): T = 10, CFG 4.5,
        # noise 0.7, G = 24, fraction 0.99, no KL, per-prompt std, clip 2e-6, RatioNorm + reweighting,
        # gradient accumulation num_batches_per_epoch // 2 -> 2 optimizer steps per epoch; 16 GPUs x 9 images
        # of G = 24 -> 8 batches, GA 4 (EMA calls per step); its compute_log_prob keeps both CFG branches
        "flowgrpo-guard": {**PAPER_SAMPLER,
                           "sampler.sde": "flow_grpo", "algo.group_size": 24, "algo.timestep_fraction": 0.99,
                           "algo.beta": 0.0, "algo.global_std": False, "algo.clip_range": 2e-6,
                           "algo.guard": True, "algo.cfg_grad": "both", "algo.ema": True,
                           "algo.ema_calls_per_step": 4, "train.optimizer_steps": 2},
    }

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {
        "flowgrpo/trained_steps": "Flow-GRPO: steps trained per chain (int(T * timestep_fraction), or the "
                                  "SDE window size of Flow-GRPO-Fast)",
        "flowgrpo/window_start": "Flow-GRPO-Fast: first step of this iteration's SDE window (0 = all-SDE "
                                 "Flow-GRPO)",
    }
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        "group_size": {"type": "int", "low": 4, "high": 24, "step": 4},
        "beta": {"type": "float", "low": 0.0, "high": 0.1, "help": "KL-to-reference weight"},
        "sde_window_size": {"type": "int", "low": 0, "high": 4, "help": "0 = Flow-GRPO, > 0 = Fast"},
    }
    search_default: ClassVar[tuple[str, ...]] = ("beta",)

    def __init__(self, config: FlowGRPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        if sampler.prediction != "flow":
            raise ValueError("algo: Flow-GRPO's SDE is defined for flow (velocity) models, got "
                             f"sampler prediction {sampler.prediction!r}")
        if config.guard:
            check_guard(sampler)
        T, w = sampler.steps, config.sde_window_size
        if w > 0:
            lo, hi = self._window_range()
            if hi > T or hi - w < lo:
                raise ValueError(f"algo.sde_window_size={w} does not fit algo.sde_window_range=({lo}, {hi}) "
                                 f"with sampler.steps={T}")
        elif self._n_train() < 1:
            raise ValueError(f"algo.timestep_fraction={config.timestep_fraction} trains no step with "
                             f"sampler.steps={T} (int(T * fraction) must be >= 1)")
        #: weight snapshots (bench.model.snapshots): the EMA, when on; evaluation samples with it
        self.snapshots: tuple[str, ...] = (EMA_SNAPSHOT,) if config.ema else ()
        self.eval_weights = EMA_SNAPSHOT if config.ema else "current"
        self.optimizer_steps_total = 0

    def _window_range(self) -> tuple[int, int]:
        rng = self.config.sde_window_range
        return (rng[0], rng[1]) if rng else (0, self.sampler.steps // 2)

    def _n_train(self) -> int:
        if self.config.sde_window_size > 0:
            return self.config.sde_window_size
        return int(self.sampler.steps * float(self.config.timestep_fraction))

    def window_start(self, iteration: int) -> int:
        """First SDE step of the iteration's window (0 without a window); pure in the iteration."""
        if self.config.sde_window_size == 0:
            return 0
        lo, hi = self._window_range()
        g = generator(self.seed, iteration, "flowgrpo_window")
        return int(torch.randint(lo, hi - self.config.sde_window_size + 1, (1,), generator=g))

    def plan(self, iteration: int) -> RolloutPlan:
        T, w = self.sampler.steps, self.config.sde_window_size
        s0 = self.window_start(iteration)
        modes = ("sde",) * T if w == 0 else tuple("sde" if s0 <= i < s0 + w else "ode" for i in range(T))
        return RolloutPlan(num_steps=T, modes=modes, branch=(1,) * T, trees_per_prompt=self.config.group_size,
                           shared_noise=self.config.shared_noise, noise_level=self.sampler.noise_level,
                           sde_type=self.sampler.sde_type, guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE, keep_means=self.config.guard,
                           cfg_uncond_grad=self.config.cfg_grad == "both",
                           info={"flowgrpo/trained_steps": float(self._n_train()),
                                 "flowgrpo/window_start": float(s0)})

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        leaf = flow_grpo_advantages(rewards.scores, rollout.leaf_prompts(), self.config.global_std,
                                    self.config.std_eps)
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf)

    def _trained_edges(self, rollout: Rollout) -> Tensor:
        steps = chain_step_edges(rollout)  # [C, T]
        s0 = int(rollout.plan.info.get("flowgrpo/window_start", 0))
        chosen = steps[:, s0:s0 + self._n_train()]
        gen = generator(self.seed, rollout.iteration, "update")
        return shuffled_chain_edges(chosen, rollout, gen)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = self._trained_edges(rollout)
        c = self.config
        before = self.optimizer_steps_total
        schedule: list[tuple[int, float]] = []

        def ema_step(k: int, n: int) -> None:  # the EMA updates due after k of the update's n steps
            if k == 0:
                schedule[:] = ema_schedule(before, n, c.ema_calls_per_step, c.ema_interval, c.ema_decay)
            for kk, d in schedule:
                if kk == k:
                    engine.snapshots.blend(EMA_SNAPSHOT, d)

        stats = config_ppo_update(c, self.train, policy, engine, optimizer, rollout, edges, adv.edge,
                                  kl_divisor=c.kl_divisor, on_step=ema_step if c.ema else None)
        self.optimizer_steps_total += stats.optimizer_steps
        return stats

