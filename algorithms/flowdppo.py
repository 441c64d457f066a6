"""Flow-DPPO: divergence proximal policy optimisation for flow models (a KL trust-region mask in place of
PPO's ratio clipping), on the Flow-GRPO sampler.

Ping et al., "Flow-DPPO: Divergence Proximal Policy Optimization for Flow Matching Models", arXiv 2606.11025;
reference code Tencent-Hunyuan/UniRL at commit 1a7b501e8fe8517b432a130220d2ff462f9b5afa:
``unirl/algorithms/flowdppo.py`` (``_gaussian_kl_div``, ``_flowdppo_kl_adv_loss``, ``FlowDPPO.prepare_segment``,
``FlowDPPO._compute_sigma_t``), the recipe ``examples/diffusion/sd3_flowdppo.yaml`` (extract and notes in
``FlowDPPO/config.yaml`` and ``FlowDPPO/README.md``), the SDE step ``unirl/sde/kernels.py::FlowSDEStrategy``
(Flow-GRPO's), the SDE step selection ``unirl/utils/scheduler_utils.py::AllSDEScheduler`` and the advantages
``unirl/types/rollout_resp.py::RolloutTrack.compute_advantages``.

Implementation details:
- Sampling (``plan``): ``group_size`` i.i.d. chains per prompt (``init_same_noise: false``). Only
  ``num_sde_steps`` steps are stochastic, drawn without replacement from the steps
  [int(T lo), int(T hi)) with (lo, hi) = ``sde_range`` ((0, 0.5) in the recipe); every other step is a
  deterministic ODE step. The draw is the reference's own: ``numpy.random.default_rng(iteration)
  .choice(pool, num_sde_steps, replace=False)`` (``AllSDEScheduler.get_sde_indices(rollout_id)``), so,
  as there, it depends on the iteration only, not on the run seed. The SDE is ``sampler.sde`` (Flow-GRPO's
  by default, the reference's ``FlowSDEStrategy``); the image is the last sampled latent.
- Advantages (``flowdppo_advantages``): ``compute_advantages(normalize=True, use_global_std=True)``:
  (r - mean_prompt) / (std_all + 1e-8) with torch's unbiased std over the whole batch (the recipe's
  ``adv_use_global_std: true``); ``global_std=False`` divides by sqrt(var_prompt + eps) with the
  population variance (eps inside the root, as there). No advantage clamp (``adv_clip_max`` None).
- Trained edges: every SDE edge of every chain (``_resolve_target_steps`` = all recorded SDE steps), the
  chains shuffled.
- The anchor (``prepare_segment``): before any optimizer step the policy's step means mu_old are
  recomputed at the pre-update weights without gradients (``anchor="replay"``: one more denoiser
  evaluation per trained parent, through ``engine.logp``, so it is counted as update NFE and traced);
  the old log-probs are the rollout's (``old_logp_source: rollout``). ``anchor="rollout"`` takes mu_old
  from the rollout instead (the same numbers up to float rounding, no extra evaluation; not the
  reference's cost).
- Loss (``flowdppo_loss``, paper eq. 14 and 18): r = exp(logp_new - logp_old); per edge the mean over
  latent dims of the equal-variance Gaussian KL (mu_theta - mu_old)^2 / (2 sigma_t^2); an edge is masked
  (zero loss and gradient) iff KL >= ``kl_threshold`` and it moves further in the advantage's direction
  (r > 1 and A > 0, or r < 1 and A < 0); otherwise its loss is -A r (no clip). sigma_t
  (``kl_sigma``): "code" = ``_compute_sigma_t``: a sqrt(s / (1 - min(s, 0.99))) sqrt(s - s_next) (the
  0.99 clamp differs from the step's own sigma_max at s = 1); "step_std" = the step's std (the exact
  Gaussian KL of any SDE); "none" = 1 (``add_kl_coefficient: false``). The loss of a mini-batch is the
  mean over its edge terms (``loss_per_elem.mean()`` per micro-batch, ``loss_scale = 1 / micro-batches``).
- Optimizer steps: ``stack.num_updates_per_batch: 2`` mini-batches per rollout, both against the same
  frozen anchor (the preset sets ``train.optimizer_steps = 2``); gradient norm clip 1.0 (``train.*``).
- Not reproduced: FSDP/bf16 (the rollout's ``trajectory_precision: bf16`` round trip of the latents);
  the recipe's LoRA rank 32 / lr 3e-4 are harness ``model.*`` / ``train.*`` settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from algorithms.common import (
    ConfigState,
    PPOTerms,
    chain_edge_advantages,
    chain_step_edges,
    check_count,
    ppo_update,
    shuffled_chain_edges,
)
from bench.engine.rollout import RolloutEngine
from bench.engine.seeding import generator
from bench.errors import NonFiniteGrad
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

KL_SIGMAS = ("code", "step_std", "none")
ANCHORS = ("replay", "rollout")


@dataclass(frozen=True)
class FlowDPPOConfig:
    """Flow-DPPO settings (``algo.<field>``).

    group_size:    chains (images) per prompt [count]; default 16 (recipe ``samples_per_prompt``)
    num_sde_steps: stochastic (and trained) steps per chain [steps], drawn each iteration from the
                   ``sde_range`` pool; default 3 (recipe ``num_sde_steps``); null = every step of the pool
    sde_range:     (lo, hi) fractions of T: the pool is the steps [int(T lo), int(T hi)); default (0.0, 0.5)
                   (recipe ``timestep_fraction: [0.0, 0.5]``)
    kl_threshold:  the divergence threshold eps_D [nats, mean over latent dims]: an edge whose KL to the
                   anchor reaches it and still moves along its advantage is masked; default 1e-5
                   (``kl_mask_threshold``)
    kl_sigma:      the sigma_t the KL divides by: "code" (``_compute_sigma_t``, default), "step_std" (the
                   step's own std) or "none" (1; ``add_kl_coefficient: false``)
    anchor:        where the anchor means mu_old come from: "replay" (a no-gradient evaluation at the
                   pre-update weights before the update, the reference's ``prepare_segment``; default) or
                   "rollout" (the sampling-time means, no extra evaluation)
    global_std:    divide by one batch-wide unbiased std (True, the recipe's ``adv_use_global_std``) or by
                   each prompt's own population std (False)
    std_eps:       added to the std (global) or to the variance (per prompt); default 1e-8
    adv_clip_max:  advantage clamp [std units]; default null (the reference does not clamp)
    shared_noise:  a prompt's chains start from one initial noise; default False (``init_same_noise``)
    """

    group_size: int = 16
    num_sde_steps: int | None = 3
    sde_range: tuple[float, ...] = (0.0, 0.5)
    kl_threshold: float = 1e-5
    kl_sigma: str = "code"
    anchor: str = "replay"
    global_std: bool = True
    std_eps: float = 1e-8
    adv_clip_max: float | None = None
    shared_noise: bool = False

    def __post_init__(self) -> None:
        check_count(self, "group_size", 2, "for group-relative advantages")
        if self.num_sde_steps is not None and (not isinstance(self.num_sde_steps, int) or self.num_sde_steps < 1):
            raise ValueError(f"algo.num_sde_steps must be an integer >= 1 (or null = the whole pool), "
                             f"got {self.num_sde_steps!r}")
        rng = tuple(float(v) for v in self.sde_range)
        if len(rng) != 2 or not 0.0 <= rng[0] <= rng[1] <= 1.0:
            raise ValueError(f"algo.sde_range must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.sde_range!r}")
        object.__setattr__(self, "sde_range", rng)
        if not float(self.kl_threshold) > 0:
            raise ValueError(f"algo.kl_threshold must be > 0, got {self.kl_threshold!r}")
        if self.kl_sigma not in KL_SIGMAS:
            raise ValueError(f"algo.kl_sigma must be one of {', '.join(KL_SIGMAS)}, got {self.kl_sigma!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"algo.anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        if not float(self.std_eps) >= 0:
            raise ValueError(f"algo.std_eps must be >= 0, got {self.std_eps!r}")
        if self.adv_clip_max is not None and not float(self.adv_clip_max) > 0:
            raise ValueError(f"algo.adv_clip_max must be > 0 or null, got {self.adv_clip_max!r}")


def flowdppo_advantages(scores: Tensor, groups: Tensor, global_std: bool, eps: float = 1e-8) -> Tensor:
    """UniRL ``RolloutTrack.compute_advantages(normalize=True, use_global_std=...)``: [L] float32
    (r - mean_group) / (std_all + eps) with the unbiased std of all L rewards (``global_std``), else
    (r - mean_group) / sqrt(var_group + eps) with the population variance (float32 math, as there).
    ``scores`` [L], ``groups`` [L] long (the prompt of each image)."""
    r = scores.float()
    out = torch.zeros_like(r)
    std_all = r.std() + eps
    for g in torch.unique(groups):
        m = groups == g
        mean = r[m].mean()
        std = std_all if global_std else torch.sqrt(r[m].var(unbiased=False) + eps)
        out[m] = (r[m] - mean) / std
    return out


def code_sigma_t(sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """UniRL ``FlowDPPO._compute_sigma_t``: a sqrt(s / (1 - min(s, 0.99))) sqrt(s - s_next), the
    Flow-SDE transition scale with the 1 - s denominator clamped at 0.01 (the sampler itself substitutes
    sigma_1 at s = 1)."""
    s, sn = sigma.float(), sigma_next.float()
    return torch.sqrt(s / (1.0 - torch.clamp(s, max=0.99))) * noise_level * torch.sqrt(s - sn)


@dataclass(frozen=True)
class DPPOTerms:
    """Per-edge Flow-DPPO quantities [M]: loss (with gradients), ratio, kl (detached), kl_high (KL >=
    threshold), masked (dropped from the loss)."""

    loss: Tensor
    ratio: Tensor
    kl: Tensor
    kl_high: Tensor
    masked: Tensor


def flowdppo_loss(logp_new: Tensor, logp_old: Tensor, mean_new: Tensor, mean_old: Tensor, adv: Tensor,
                  sigma_t: Tensor, kl_threshold: float) -> DPPOTerms:
    """The KL-ADV masked surrogate (paper eq. 14 and 18; UniRL ``_flowdppo_kl_adv_loss``):

        r    = exp(logp_new - logp_old)
        KL   = mean_dims((mu_theta - mu_old)^2 / (2 sigma_t^2))
        drop = (KL >= eps_D) and ((r > 1 and A > 0) or (r < 1 and A < 0))
        loss = -A r where not drop, else 0 (a hard, detached gate: no gradient through the mask)

    logp_* [M], mean_* [M, C, h, w], adv [M], sigma_t [M]."""
    ratio = torch.exp(logp_new - logp_old)
    a = adv.detach()
    sig = sigma_t.reshape(-1, *([1] * (mean_new.dim() - 1)))
    kl = ((mean_new.detach() - mean_old) ** 2 / (2 * sig**2)).mean(dim=tuple(range(1, mean_new.dim())))
    high = kl >= kl_threshold
    r = ratio.detach()
    masked = high & (((r > 1.0) & (a > 0)) | ((r < 1.0) & (a < 0)))
    loss = torch.where(~masked, -a * ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device))
    return DPPOTerms(loss=loss, ratio=r, kl=kl, kl_high=high, masked=masked)


class FlowDPPO(ConfigState):
    name: ClassVar[str] = "flowdppo"
    Config: ClassVar[type] = FlowDPPOConfig
    FINAL_IMAGE: ClassVar[str] = "sample"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # examples/diffusion/sd3_flowdppo.yaml (SD3.5-M, PickScore): T = 10, no CFG (guidance_scale 1.0),
        # eta 0.7 on the Flow-SDE, 16 samples per prompt, 3 SDE steps drawn from the first half, KL
        # threshold 1e-5 with the sigma_t coefficient, batch-wide std, 2 optimizer mini-batches per rollout
        "flowdppo-paper": {"sampler.steps": 10, "sampler.guidance": 1.0, "sampler.noise_level": 0.7,
                           "sampler.sde": "flow_grpo", "algo.group_size": 16, "algo.num_sde_steps": 3,
                           "algo.sde_range": [0.0, 0.5], "algo.kl_threshold": 1e-5, "algo.kl_sigma": "code",
                           "algo.anchor": "replay", "algo.global_std": True, "train.optimizer_steps": 2},
    }

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {
        "flowdppo/sde_steps": "Flow-DPPO: stochastic (trained) steps per chain this iteration",
        "flowdppo/sde_step_mask": "Flow-DPPO: this iteration's SDE steps as a bit mask (sum of 2^i)",
        "flowdppo/masked_frac": "Flow-DPPO: fraction of trained edges the KL-ADV mask dropped",
        "flowdppo/kl_high_frac": "Flow-DPPO: fraction of trained edges whose KL to the anchor reached the threshold",
        "flowdppo/kl_mean": "Flow-DPPO: mean per-edge KL(anchor || current) over the trained edges [nats per dim]",
        "flowdppo/kl_max": "Flow-DPPO: largest per-edge KL(anchor || current) [nats per dim]",
    }
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        "kl_threshold": {"type": "float", "low": 1e-7, "high": 1e-3, "log": True, "help": "divergence threshold"},
        "num_sde_steps": {"type": "int", "low": 1, "high": 5, "help": "stochastic steps per chain"},
        "group_size": {"type": "int", "low": 4, "high": 24, "step": 4},
    }
    search_default: ClassVar[tuple[str, ...]] = ("kl_threshold",)

    def __init__(self, config: FlowDPPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        if sampler.prediction != "flow":
            raise ValueError("algo: Flow-DPPO's sampler and KL are defined for flow (velocity) models, got "
                             f"sampler prediction {sampler.prediction!r}")
        pool = self._pool()
        if not pool:
            raise ValueError(f"algo.sde_range={config.sde_range} holds no step of sampler.steps={sampler.steps}")
        if config.num_sde_steps is not None and config.num_sde_steps > len(pool):
            raise ValueError(f"algo.num_sde_steps={config.num_sde_steps} exceeds the {len(pool)} steps of "
                             f"algo.sde_range={config.sde_range} with sampler.steps={sampler.steps}")

    def _pool(self) -> list[int]:
        T = self.sampler.steps
        lo, hi = self.config.sde_range
        return list(range(int(T * lo), int(T * hi)))

    def sde_steps(self, iteration: int) -> list[int]:
        """The iteration's stochastic steps, sorted (``AllSDEScheduler.get_sde_indices(iteration)``)."""
        pool, n = self._pool(), self.config.num_sde_steps
        if n is None or n >= len(pool):
            return pool
        chosen = np.random.default_rng(int(iteration)).choice(pool, size=n, replace=False)
        return sorted(int(i) for i in chosen)

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        steps = self.sde_steps(iteration)
        modes = tuple("sde" if i in steps else "ode" for i in range(T))
        return RolloutPlan(num_steps=T, modes=modes, branch=(1,) * T, trees_per_prompt=self.config.group_size,
                           shared_noise=self.config.shared_noise, noise_level=self.sampler.noise_level,
                           sde_type=self.sampler.sde_type, guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE,
                           keep_means=self.config.anchor == "rollout",
                           info={"flowdppo/sde_steps": float(len(steps)),
                                 "flowdppo/sde_step_mask": float(sum(2**i for i in steps))})

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        leaf = flowdppo_advantages(rewards.scores, rollout.leaf_prompts(), self.config.global_std,
                                   self.config.std_eps)
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf)

    def _trained_edges(self, rollout: Rollout) -> Tensor:
        sde = [i for i, m in enumerate(rollout.plan.modes) if m == "sde"]
        chosen = chain_step_edges(rollout)[:, sde]  # [C, S]
        gen = generator(self.seed, rollout.iteration, "update")
        return shuffled_chain_edges(chosen, rollout, gen)

    def _anchor(self, engine: RolloutEngine, rollout: Rollout, edges: Tensor) -> tuple[Tensor, int]:
        """mu_old [N, C, h, w] (rows of the trained edges filled) and the NFE spent on it."""
        if self.config.anchor == "rollout":
            return rollout.means, 0
        cfg = rollout.plan.cfg_factor()
        per = max(1, self.train.micro_batch // cfg)  # parents per no-gradient call, as the update's micro-batches
        parents = rollout.parent[edges]
        uniq = list(dict.fromkeys(parents.tolist()))
        means, nfe = None, 0
        with torch.no_grad():
            for c in range(0, len(uniq), per):
                chunk = torch.tensor(uniq[c:c + per])
                e = edges[torch.isin(parents, chunk)]
                ev = engine.logp(rollout, e)
                nfe += ev.nfe
                if means is None:
                    means = torch.full((rollout.num_nodes, *ev.mean.shape[1:]), float("nan"), device=ev.mean.device)
                means[e.to(ev.mean.device)] = ev.mean.float()
        return means, nfe

    def _sigma_t(self, rollout: Rollout, edges: Tensor, step_std: Tensor) -> Tensor:
        how = self.config.kl_sigma
        if how == "step_std":
            return step_std.detach()
        if how == "none":
            return torch.ones_like(step_std)
        lvl = (rollout.level[edges.cpu()] - 1).cpu()
        s = code_sigma_t(rollout.sigmas[lvl], rollout.sigmas[lvl + 1], rollout.plan.noise_level)
        return s.to(step_std.device)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = self._trained_edges(rollout)
        mean_old, anchor_nfe = self._anchor(engine, rollout, edges) if edges.numel() else (None, 0)
        thr, clip = float(self.config.kl_threshold), self.config.adv_clip_max
        sums = {"masked": 0.0, "high": 0.0, "kl": 0.0, "kl_max": 0.0, "n": 0}

        def surrogate(ev: Any, e: Tensor, logp_old: Tensor, a: Tensor) -> PPOTerms:
            dev = ev.log_prob.device
            a = a.clamp(-float(clip), float(clip)) if clip is not None else a
            t = flowdppo_loss(ev.log_prob, logp_old, ev.mean, mean_old[e.to(mean_old.device)].to(dev), a,
                              self._sigma_t(rollout, e, ev.std.to(dev)), thr)
            sums["masked"] += float(t.masked.float().sum())
            sums["high"] += float(t.kl_high.float().sum())
            sums["kl"] += float(t.kl.sum())
            sums["kl_max"] = max(sums["kl_max"], float(t.kl.max()))
            sums["n"] += int(e.numel())
            return PPOTerms(loss=t.loss, ratio=t.ratio, clipped=t.masked)

        try:
            stats = ppo_update(policy, engine, optimizer, rollout, edges, adv.edge[edges], train=self.train,
                               surrogate=surrogate)
        except NonFiniteGrad as e:
            e.nfe = int(getattr(e, "nfe", 0) or 0) + anchor_nfe
            raise
        n = max(1, sums["n"])
        metrics = {"flowdppo/masked_frac": sums["masked"] / n, "flowdppo/kl_high_frac": sums["high"] / n,
                   "flowdppo/kl_mean": sums["kl"] / n, "flowdppo/kl_max": sums["kl_max"]}
        return replace(stats, nfe=stats.nfe + anchor_nfe, metrics={**stats.metrics, **metrics})

