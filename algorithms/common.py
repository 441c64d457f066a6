"""What the algorithms share, each piece with known-answer tests:

* pure functions: group normalisation, tree backup, PPO-clip terms, GRPO-Guard's RatioNorm, KL, window
  schedules, edge selection;
* ``PerPromptStatTracker``: DDPO's per-prompt reward statistics (stateful; its algorithm checkpoints it);
* ``ppo_update``: the PPO-clip update loop (micro-batches, gradient accumulation, optimizer steps) that
  every algorithm's ``update`` ends in; it returns ``UpdateStats`` including the update's NFE.

Nothing here knows which algorithm calls it; algorithms never import each other.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from bench.errors import NonFiniteGrad

#: The sampler of the SD3.5-medium papers' comparisons (TreeGRPO, Flow-GRPO, and the re-runs of DanceGRPO,
#: MixGRPO and DDPO in the TreeGRPO paper): T = 10 steps, CFG 4.5, Flow-GRPO SDE noise level 0.7. Presets
#: spread it (``{**PAPER_SAMPLER, ...}``); the model preset ``sd3.5-medium`` (bench.registry) repeats it
#: because bench never imports algorithms.
PAPER_SAMPLER = {"sampler.steps": 10, "sampler.guidance": 4.5, "sampler.noise_level": 0.7}
from bench.model.fsdp import full, scalar
from bench.types import Rollout, TrainSpec, UpdateStats


def group_normalize(values: Tensor, group_ids: Tensor, unbiased: bool, eps: float) -> Tensor:
    """(v - mean_g) / (std_g + eps) within each group (GRPO advantage: DanceGRPO/MixGRPO
    ``train_one_step``, TreeGRPO ``RLTrainer.sample``).

    values [L] float, group_ids [L] long. ``unbiased`` selects torch's ddof=1 std (DanceGRPO,
    MixGRPO) or the population std (TreeGRPO, Flow-GRPO). A group of one element gets advantage 0
    (its unbiased std is undefined)."""
    values = values.float()
    out = torch.zeros_like(values)
    for g in torch.unique(group_ids):
        m = group_ids == g
        v = values[m]
        if v.numel() < 2:
            continue
        out[m] = (v - v.mean()) / (v.std(unbiased=unbiased) + eps)
    return out


def flow_grpo_advantages(scores: Tensor, groups: Tensor, global_std: bool, eps: float = 1e-4) -> Tensor:
    """Flow-GRPO's ``PerPromptStatTracker.update`` (type "grpo", cleared every epoch; DiffusionNFT's
    ``flow_grpo/stat_tracking.py`` is the same tracker): [L] float32
    (r - mean_group) / (std + eps), population std over the group, or over all L rewards when
    ``global_std``. ``scores`` [L], ``groups`` [L] long (the prompt of each image)."""
    r = scores.double()
    out = torch.zeros_like(r)
    all_std = r.std(unbiased=False)
    for g in torch.unique(groups):
        m = groups == g
        std = all_std if global_std else r[m].std(unbiased=False)
        out[m] = (r[m] - r[m].mean()) / (std + eps)
    return out.float()


class PerPromptStatTracker:
    """DDPO's per-prompt reward statistics (Black et al. 2023; ddpo-pytorch
    ``ddpo_pytorch/stat_tracking.py::PerPromptStatTracker``).

    For every prompt of the batch the batch's rewards of that prompt are appended to a per-prompt
    FIFO buffer of at most ``buffer_size`` values (kept across iterations) *before* the statistics
    are read. If the buffer then holds fewer than ``min_count`` values, the mean and population std
    of the *whole current batch* (all prompts) are used instead. A = (r - mean) / (std + eps), with
    numpy's population std (ddof = 0) and eps = 1e-6 as in the reference code.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.eps = float(eps)
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """prompts [L] (one per reward), rewards [L] -> advantages [L] float32."""
        r = rewards.detach().double().cpu()
        if len(prompts) != r.numel():
            raise ValueError(f"{len(prompts)} prompts for {r.numel()} rewards")
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        by_prompt: dict[str, list[int]] = {}
        for j, p in enumerate(prompts):
            by_prompt.setdefault(p, []).append(j)
        for p, idx in by_prompt.items():
            buf = self.buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(float(r[j]) for j in idx)
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = hist.mean(), hist.std(unbiased=False)
            ii = torch.tensor(idx)
            out[ii] = (r[ii] - mean) / (std + self.eps)
        return out.float()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: settings and every buffer (oldest value first)."""
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "eps": self.eps,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer_size = int(state.get("buffer_size", self.buffer_size))
        self.min_count = int(state.get("min_count", self.min_count))
        self.eps = float(state.get("eps", self.eps))
        self.buffers = {str(p): deque((float(v) for v in vals), maxlen=self.buffer_size)
                        for p, vals in dict(state.get("buffers", {})).items()}


def weighted_advantage_sum(advantages: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """MixGRPO's ``advantage_aggr`` multi-reward rule (``fastvideo/train_grpo_flux.py``): A = sum_m w_m A_m
    with the weights normalised to sum to 1. ``advantages``: name -> [L]; ``weights``: name -> w."""
    if not advantages:
        raise ValueError("no advantages to aggregate")
    missing = sorted(set(advantages) - set(weights))
    if missing:
        raise ValueError(f"no weight for {missing}")
    total = sum(float(weights[m]) for m in advantages)
    if total <= 0:
        raise ValueError("advantage weights must sum to a positive number")
    return sum(advantages[m].float() * (float(weights[m]) / total) for m in advantages)


def node_depth(parent: Tensor) -> Tensor:
    """[N] long: number of edges from each node up to its root (roots: 0). ``parent`` [N], -1 = root."""
    parent = parent.long()
    N = parent.numel()
    depth = torch.zeros(N, dtype=torch.long)
    cur = parent.clone()
    for _ in range(N + 1):
        alive = cur >= 0
        if not bool(alive.any()):
            return depth
        depth[alive] += 1
        cur[alive] = parent[cur[alive]]
    raise ValueError("parent pointers contain a cycle")


WEIGHTINGS = ("uniform", "softmax_logprob")


def tree_backup(parent: Tensor, leaf_values: Tensor, logp: Tensor, weighting: str) -> Tensor:
    """Per-edge advantages of a forest by backing up leaf values (TreeGRPO, Ding & Ye 2025,
    arXiv 2512.08153; released ``train.py::RLTrainer.update_advantages``, which uses uniform weights).

    parent:      [N] long, parent node id, -1 for roots
    leaf_values: [N] float, the normalised leaf advantage at leaves (nodes without children); ignored
                 elsewhere
    logp:        [N] float, log-prob of the edge parent -> n; NaN where that edge was deterministic
    weighting:   "uniform" (released code: mean over children) or "softmax_logprob" (paper reading:
                 weights = softmax of the children's edge log-probs)

    Returns [N] float32: A(parent(n) -> n) = V(n) for every non-root n, NaN at roots, where
    V(leaf) = leaf value and V(u) = sum_{c in children(u)} w_u(c) V(c). A node with a single child
    (an ODE link or a non-branching SDE step) passes its child's value through unchanged; leaves may
    sit at different depths.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    parent = parent.long().cpu()
    N = parent.numel()
    if leaf_values.numel() != N or logp.numel() != N:
        raise ValueError(f"parent, leaf_values and logp must all have N={N} entries")
    leaf_values = leaf_values.detach().double().cpu()
    logp = logp.detach().double().cpu()
    has_parent = parent >= 0
    ones = torch.ones(int(has_parent.sum()), dtype=torch.long)
    n_children = torch.zeros(N, dtype=torch.long).index_add_(0, parent[has_parent], ones)
    value = torch.full((N,), float("nan"), dtype=torch.float64)
    is_leaf = n_children == 0
    value[is_leaf] = leaf_values[is_leaf]
    depth = node_depth(parent)
    # a child is always one level below its parent, so processing levels bottom-up sees every child's
    # value before its parent's
    for dep in range(int(depth.max()) if N else 0, 0, -1):
        ch = torch.nonzero((depth == dep) & has_parent).flatten()
        par = parent[ch]
        if weighting == "uniform":
            w = 1.0 / n_children[par].double()
        else:
            lp = logp[ch].clone()
            single = n_children[par] == 1
            lp[single] = 0.0  # a lone child gets weight 1 whatever its edge (ODE links have no log-prob)
            if bool(torch.isnan(lp).any()):
                bad = int(ch[torch.isnan(lp)][0])
                raise ValueError(f"softmax_logprob weighting needs the log-prob of every sibling edge; the "
                                 f"edge into node {bad} (parent {int(parent[bad])}) has none")
            m = torch.full((N,), -math.inf, dtype=torch.float64).scatter_reduce(0, par, lp, reduce="amax")
            e = torch.exp(lp - m[par])
            z = torch.zeros(N, dtype=torch.float64).index_add_(0, par, e)
            w = e / z[par]
        acc = torch.zeros(N, dtype=torch.float64).index_add_(0, par, w * value[ch])
        u = torch.unique(par)
        value[u] = acc[u]
    out = value.float()
    out[~has_parent] = float("nan")
    return out


class ConfigState:
    """``state_dict`` / ``load_state_dict`` of an algorithm that keeps nothing between iterations but its
    settings: the checkpoint records them (``{"config": ...}``) and resuming restores nothing."""

    config: Any

    def state_dict(self) -> dict:
        return {"config": asdict(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class StepCountState(ConfigState):
    """As :class:`ConfigState`, plus the optimizer steps taken so far (``optimizer_steps_total``), which the
    algorithm's schedules (EMA decay, old-policy decay) depend on and a resumed run must continue from."""

    optimizer_steps_total: int

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "optimizer_steps_total": self.optimizer_steps_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer_steps_total = int(state.get("optimizer_steps_total", 0))


def check_count(config: Any, key: str, low: int, why: str = "") -> None:
    """``algo.<key>`` must be an integer (not a bool) >= ``low``; ``why`` completes the message."""
    v = getattr(config, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"algo.{key} must be an integer >= {low}{' ' + why if why else ''}, got {v!r}")


def check_fraction(config: Any, key: str) -> None:
    """``algo.<key>`` must be a number in (0, 1]."""
    v = getattr(config, key)
    if not 0.0 < float(v) <= 1.0:
        raise ValueError(f"algo.{key} must be in (0, 1], got {v!r}")


def check_ppo_settings(config: Any) -> None:
    """The checks every algorithm's Config shares (each raises ValueError naming the ``algo.<key>``):
    clip_range > 0, adv_clip_max > 0, std_eps >= 0 (when the config has it), beta >= 0."""
    if not float(config.clip_range) > 0:
        raise ValueError(f"algo.clip_range must be > 0, got {config.clip_range!r}")
    if not float(config.adv_clip_max) > 0:
        raise ValueError(f"algo.adv_clip_max must be > 0, got {config.adv_clip_max!r}")
    if hasattr(config, "std_eps") and not float(config.std_eps) >= 0:
        raise ValueError(f"algo.std_eps must be >= 0, got {config.std_eps!r}")
    if float(config.beta) < 0:
        raise ValueError(f"algo.beta must be >= 0, got {config.beta!r}")


def check_ema_settings(config: Any) -> None:
    """The EMA settings' checks (``ema_decay`` in [0, 1], ``ema_interval`` and ``ema_calls_per_step`` >= 1),
    each a ValueError naming the ``algo.<key>``."""
    if not 0.0 <= float(config.ema_decay) <= 1.0:
        raise ValueError(f"algo.ema_decay must be in [0, 1], got {config.ema_decay!r}")
    for key in ("ema_interval", "ema_calls_per_step"):
        v = getattr(config, key, 1)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"algo.{key} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class PPOTerms:
    """Per-edge PPO quantities: loss [M] (with gradients), ratio [M], clipped [M] bool."""

    loss: Tensor
    ratio: Tensor
    clipped: Tensor


def ppo_clip_terms(ratio: Tensor, adv: Tensor, clip_range: float, adv_clip_max: float) -> PPOTerms:
    """PPO clipped surrogate per edge for a given importance ratio [M] (with gradients):
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) with A clamped to [-adv_clip_max, adv_clip_max]."""
    a = adv.clamp(-adv_clip_max, adv_clip_max)
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return PPOTerms(loss=torch.maximum(unclipped, clipped), ratio=ratio.detach(),
                    clipped=((ratio.detach() - 1.0).abs() > clip_range))


def ppo_clip_loss(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip_range: float,
                  adv_clip_max: float) -> PPOTerms:
    """PPO clipped surrogate per edge (Schulman et al. 2017, eq. 7, as a loss to minimise):
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = exp(logp_new - logp_old) and A clamped to
    [-adv_clip_max, adv_clip_max] (every reference repo clamps at 5)."""
    return ppo_clip_terms(torch.exp(logp_new - logp_old), adv, clip_range, adv_clip_max)


def step_dsigma(rollout: Rollout, edges: Tensor) -> Tensor:
    """[M] float32 sigma_i - sigma_{i+1} (= -dt > 0) of the step that produced each edge parent(n) -> n
    (flow rollouts, whose ``sigmas`` are sigmas)."""
    lvl = (rollout.level[torch.as_tensor(edges).cpu()] - 1).cpu()
    return (rollout.sigmas[lvl] - rollout.sigmas[lvl + 1]).float()


#: the step rules GRPO-Guard's RatioNorm is defined for (its released code uses Flow-GRPO's SDE)
GUARD_SDE_TYPES = ("flow_grpo",)


def check_guard(sampler: Any) -> None:
    """``algo.guard`` needs a flow model (else ValueError) sampled with Flow-GRPO's SDE (else
    NotImplementedError), both naming ``algo.guard``: the released RatioNorm and gradient reweighting
    (flow_grpo ``scripts/train_sd3_GRPO_Guard.py``) are written for that step's Gaussian log-density; CPS
    drops the density's scale and DanceGRPO's SDE has no released GRPO-Guard form."""
    if sampler.prediction != "flow":
        raise ValueError(f"algo.guard: GRPO-Guard is defined for flow (velocity) models, got sampler prediction "
                         f"{sampler.prediction!r}")
    if sampler.sde_type not in GUARD_SDE_TYPES:
        raise NotImplementedError(f"algo.guard with sampler.sde={sampler.sde_type}: the released GRPO-Guard "
                                  f"(flow_grpo scripts/train_sd3_GRPO_Guard.py) normalises the ratio of "
                                  f"Flow-GRPO's SDE only; use sampler.sde=flow_grpo")


def guard_ratio(logp_new: Tensor, logp_old: Tensor, mean_new: Tensor, mean_old: Tensor, step_std: Tensor) -> Tensor:
    """GRPO-Guard's RatioNorm (Wang et al. 2025, arXiv 2510.22319; yifan123/flow_grpo
    ``scripts/train_sd3_GRPO_Guard.py``, ``config.rationorm``, commit 2e2f712e9feb19246fa0db9527878e2766b5353f):

        bias  = mean_dims((mu_theta - mu_old)^2) / (2 s^2)
        ratio = exp((logp_new - logp_old + bias) * s)

    with s = the step std (the code's ``sqrt_dt.mean() * std_dev_t.mean()`` = std_dev_t sqrt(-dt)),
    mu_old the sampling-time step mean and logp the per-dim mean Gaussian log-density. For a Gaussian
    step, logp_new - logp_old + bias = mean_dims(z (mu_theta - mu_old)) / s with z the sampled noise, so
    the normalised log-ratio mean_dims(z (mu_theta - mu_old)) is centred at 0 and has the same scale at
    every step. Gradients flow through logp_new and mu_theta (the bias included), as in the code.
    All [M] except the means [M, C, h, w]."""
    bias = ((mean_new - mean_old) ** 2).mean(dim=tuple(range(1, mean_new.dim()))) / (2 * step_std**2)
    return torch.exp((logp_new - logp_old + bias) * step_std)


def guard_surrogate(rollout: Rollout, clip_range: float, adv_clip_max: float):
    """The GRPO-Guard loss for ``ppo_update(surrogate=...)``: PPO clip on the RatioNorm ratio
    (``guard_ratio``), each term divided by sqrt(-dt)^2 = sigma_i - sigma_{i+1} (the code's gradient
    reweighting, ``policy_loss / sqrt_dt.mean() ** 2``). Needs the rollout's step means (plan
    ``keep_means``)."""
    if rollout.means is None:
        raise ValueError("GRPO-Guard needs the sampling-time step means: the rollout plan must set keep_means")

    def terms(ev: Any, edges: Tensor, logp_old: Tensor, adv: Tensor) -> PPOTerms:
        dev = ev.log_prob.device
        mean_old = rollout.means[edges.to(rollout.means.device)].to(dev)
        ratio = guard_ratio(ev.log_prob, logp_old, ev.mean, mean_old, ev.std.to(dev))
        t = ppo_clip_terms(ratio, adv, clip_range, adv_clip_max)
        return PPOTerms(loss=t.loss / step_dsigma(rollout, edges).to(dev), ratio=t.ratio, clipped=t.clipped)

    return terms


def gaussian_mean_kl(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) averaged over latent dims: ||mu - mu_ref||^2 / (2 std^2)
    per edge [M] (Flow-GRPO's KL term; its code divides by the noise scale without the sqrt(-dt)
    factor, treebench uses the step std of the transition, which is the paper's Gaussian KL)."""
    d = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.dim())))
    return d / (2 * std**2)


KL_DIVISORS = ("step_std", "noise_scale")


def kl_std(rollout: Rollout, edges: Tensor, std: Tensor, divisor: str) -> Tensor:
    """The std [M] that divides the mean-KL of the edges parent(n) -> n: "step_std" = the transition's
    std (the Gaussian KL); "noise_scale" = Flow-GRPO's code (``scripts/train_sd3.py``, ``kl_loss``
    divides by ``std_dev_t ** 2``, the noise scale a sqrt(sigma / (1 - sigma)) without the sqrt(-dt)
    factor): step std / sqrt(sigma_i - sigma_{i+1}) (flow rollouts, whose ``sigmas`` are sigmas); under
    the CPS sampler the code's ``std_dev_t`` is the step std itself."""
    if divisor not in KL_DIVISORS:
        raise ValueError(f"unknown KL divisor {divisor!r}; valid: {', '.join(KL_DIVISORS)}")
    if divisor == "step_std" or rollout.plan.sde_type == "cps":
        # CPS: the released step returns its step std as ``std_dev_t`` (no sqrt(-dt) factor to remove)
        return std
    dsig = step_dsigma(rollout, edges).to(std.device, std.dtype)
    return std / torch.sqrt(dsig)


def chain_edge_advantages(rollout: Rollout, leaf_adv: Tensor) -> Tensor:
    """Broadcast each leaf's advantage along its chain: [N] (NaN at roots and on nodes that lead to
    several leaves, which chain rollouts never have)."""
    owner = rollout.leaf_of_node()
    out = torch.full((rollout.num_nodes,), float("nan"))
    ok = (owner >= 0) & (rollout.parent >= 0)
    out[ok] = leaf_adv.float()[owner[ok]]
    return out


def progressive_window_start(iteration: int, shift_interval: int, stride: int, max_start: int,
                             roll_back: bool) -> int:
    """Start of a progressively sliding window (MixGRPO ``GRPOTrainingStates`` "progressive";
    TreeGRPO's released code, ``RLTrainer`` shifting ``tree_steps`` by ``tree.s`` every ``tree.tou``
    epochs): the window starts at step 0 and moves by
    ``stride`` steps every ``shift_interval`` iterations. Past ``max_start`` it restarts at 0
    (``roll_back``) or stays at the last position ``<= max_start``. A pure function of the
    iteration, so resuming from a checkpoint continues the same schedule."""
    if shift_interval < 1:
        raise ValueError(f"shift_interval must be >= 1, got {shift_interval}")
    if max_start < 0:
        raise ValueError(f"max_start must be >= 0, got {max_start}")
    if stride <= 0:
        return 0
    moves = iteration // shift_interval
    positions = max_start // stride + 1  # starts 0, stride, 2 stride, ... <= max_start
    if roll_back:
        return (moves % positions) * stride
    return min(moves, positions - 1) * stride


def random_step_subset(num_chains: int, num_steps: int, num_train: int, gen: torch.Generator) -> Tensor:
    """[num_chains, num_train] long: for every chain an independent random permutation of steps
    0..num_steps-1, truncated to its first ``num_train`` entries (DDPO ``perms``; DanceGRPO trains
    ``int((T - 1) * timestep_fraction)`` of the first T - 1 steps, ``train_one_step``)."""
    if not 0 <= num_train <= num_steps:
        raise ValueError(f"num_train must be in [0, {num_steps}], got {num_train}")
    keys = torch.rand((num_chains, num_steps), generator=gen)
    return torch.argsort(keys, dim=1)[:, :num_train]


def shuffled_chain_edges(chosen: Tensor, rollout: Rollout, gen: torch.Generator) -> Tensor:
    """[C, n] child node ids of each chain's chosen steps (-1: none) -> the trained edges, flat: chains in a
    random order drawn from ``gen`` (one ``randperm``), each chain's steps in the given order, padding and
    non-trainable edges dropped."""
    chosen = chosen[torch.randperm(chosen.shape[0], generator=gen)].flatten()
    return chosen[(chosen >= 0) & rollout.trainable[chosen.clamp_min(0)]]


def chain_step_edges(rollout: Rollout) -> Tensor:
    """[C, T] long: node id of the edge produced by step i of chain c (chains in root order), for an
    unbranched rollout; -1 where a chain has no node at that level."""
    if rollout.plan.leaves_per_tree != 1:
        raise ValueError("chain_step_edges needs an unbranched rollout (branch factor 1 at every step)")
    T = rollout.plan.num_steps
    C = int((rollout.parent < 0).sum())
    out = torch.full((C, T), -1, dtype=torch.long)
    has_parent = rollout.parent >= 0
    ids = torch.nonzero(has_parent).flatten()
    out[rollout.tree[ids], rollout.level[ids] - 1] = ids
    return out


#: the weight snapshot (``bench.model.snapshots``) holding an algorithm's EMA of the trained weights for
#: evaluation and export (``algo.ema``; not AWM's "ema" policy, a KL anchor of its loss)
EMA_SNAPSHOT = "eval_ema"


def ema_decay(step: int, max_decay: float) -> float:
    """``EMAModuleWrapper.get_current_decay`` (yifan123/flow_grpo and NVlabs/DiffusionNFT ``flow_grpo/ema.py``):
    min((1 + step) / (10 + step), max_decay) for the optimizer step count ``step``."""
    return min((1.0 + step) / (10.0 + step), float(max_decay))


def ema_model_decay(calls: int, max_decay: float) -> float:
    """``diffusers.training_utils.EMAModel.get_decay`` at its defaults (no warm-up, ``update_after_step`` 0,
    ``min_decay`` 0) for the ``calls``-th ``step`` call (1-based: ``optimization_step`` is incremented first):
    0 on the first call (the EMA becomes a copy of the weights), then min((1 + n) / (10 + n), max_decay) with
    n = calls - 1."""
    n = max(0, int(calls) - 1)
    return 0.0 if n <= 0 else min((1.0 + n) / (10.0 + n), float(max_decay))


def ema_schedule(steps_before: int, steps: int, calls_per_step: int, interval: int,
                 max_decay: float) -> list[tuple[int, float]]:
    """The EMA updates the reference trainers apply while an update takes ``steps`` optimizer steps after
    ``steps_before`` earlier ones, in order, as (k, d): the update s <- d s + (1 - d) theta with the weights
    theta after k of this update's steps (k = 0: before its first), d = ``ema_decay(global_step)``
    (``EMAModuleWrapper.step(params, global_step)`` updates when (global_step + 1) % ``interval`` == 0).

    The trainers call ``step`` ``calls_per_step`` times per optimizer step: flow_grpo ``train_sd3.py`` after
    every training batch (GA batches per optimizer step: calls_per_step = GA; global_step counts the steps
    taken, so a qualifying count can update the EMA several times with the same weights); DiffusionNFT after
    every optimizer step (calls_per_step = 1). Call b of the update (0-based) comes after k = (b + 1) //
    calls_per_step steps, with global_step = steps_before + k."""
    if calls_per_step < 1 or interval < 1:
        raise ValueError(f"calls_per_step and interval must be >= 1, got {calls_per_step}, {interval}")
    out = []
    for b in range(steps * calls_per_step):
        k = (b + 1) // calls_per_step
        g = steps_before + k
        if (g + 1) % interval == 0:
            out.append((k, ema_decay(g, max_decay)))
    return out


def optimizer_step(optimizer: Any, params: Sequence[Tensor], max_grad_norm: float, nfe: int) -> float:
    """Clip the gradients to ``max_grad_norm`` (<= 0: no clipping) and step; returns the norm before
    clipping. A step the optimizer refuses (non-finite gradients) re-raises carrying ``nfe``, the forward
    passes the update had spent, so the runner still counts them."""
    if max_grad_norm > 0:
        grad_norm = scalar(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        norms = [full(p.grad).norm() for p in params if p.grad is not None]
        grad_norm = float(torch.norm(torch.stack(norms))) if norms else 0.0
    try:
        optimizer.step()
    except NonFiniteGrad as e:
        e.nfe = nfe
        raise
    return grad_norm


def config_ppo_update(c: Any, train: Any, policy: Any, engine: Any, optimizer: Any, rollout: Rollout, edges: Tensor,
                      adv: Tensor, **kw: Any) -> UpdateStats:
    """:func:`ppo_update` of ``edges`` with the PPO settings a Config carries (``clip_range``, ``adv_clip_max``,
    ``beta``) and, when it has ``guard`` set, GRPO-Guard's surrogate; ``adv``: every edge's advantage
    (``Advantages.edge``); ``kw``: the rest of ``ppo_update``'s options."""
    if getattr(c, "guard", False):
        kw.setdefault("surrogate", guard_surrogate(rollout, c.clip_range, c.adv_clip_max))
    return ppo_update(policy, engine, optimizer, rollout, edges, adv[edges], train=train, clip_range=c.clip_range,
                      adv_clip_max=c.adv_clip_max, beta=c.beta, **kw)


def ppo_update(policy: Any, engine: Any, optimizer: Any, rollout: Rollout, edges: Tensor, adv: Tensor, *,
               train: TrainSpec, clip_range: float | None = None, adv_clip_max: float | None = None,
               beta: float = 0.0, reduction: str = "mean", kl_divisor: str = "step_std",
               surrogate: Callable[[Any, Tensor, Tensor, Tensor], PPOTerms] | None = None,
               share_parents: bool = True, edges_per_step: int = 0,
               loss_denom: float | None = None,
               on_step: Callable[[int, int], None] | None = None) -> UpdateStats:
    """Run the PPO-clip update on the given edges.

    edges [M]: child node ids of the trained edges, in training order (the caller shuffles). Edges
    sharing a parent are evaluated together: one denoiser evaluation serves all of a parent's
    children. The parents are split into ``train.optimizer_steps`` mini-batches (one optimizer step
    each); a mini-batch is processed in micro-batches of at most ``train.micro_batch`` denoiser rows
    (a guided parent takes 2) whose gradients accumulate.

    reduction: "mean" -> the mini-batch loss is the mean over its edge terms (DDPO/DanceGRPO/MixGRPO);
    "sum_children" -> sum over each parent's children, mean over parents (TreeGRPO's loss_agg "sum").
    kl_divisor: the std the KL term divides by (``kl_std``: "step_std" or Flow-GRPO's "noise_scale").
    surrogate: the per-edge loss, ``surrogate(ev, edges, logp_old, adv) -> PPOTerms`` with ``ev`` the
    engine's ``EdgeEval`` (log-probs and step means with gradients); None = PPO clip with ``clip_range``
    and ``adv_clip_max`` (``ppo_clip_loss``). GRPO-Guard (``guard_surrogate``) and Flow-DPPO's masked
    loss plug in here; ``clip_frac`` then counts the terms the surrogate reports as clipped (or masked).
    share_parents: False -> every edge is its own denoiser evaluation (one forward per trained edge, siblings
    too; rows still batched in micro-batches), as trainers that loop over transitions spend (BranchGRPO's
    ``train_one_step_tree``). edges_per_step > 0 -> an optimizer step after every that many parents'
    groups (edges, with ``share_parents`` False) and one more for a partial remainder, in place of
    ``train.optimizer_steps``. loss_denom -> every edge term is divided by this fixed number instead of
    the mini-batch's ``reduction`` denominator. on_step(k, n): called with k = 0 before the first of the n
    optimizer steps and with k after the k-th (an EMA of the weights hooks in here).

    Longer than 60 lines on purpose: one loop over mini-batches and micro-batches with its running sums,
    read top to bottom like the reference trainers' inner loops; split, it would pass eight accumulators.
    """
    edges = torch.as_tensor(edges, dtype=torch.long)
    adv = adv.float()
    if edges.numel() == 0:
        return UpdateStats(loss=0.0, approx_kl=0.0, clip_frac=0.0, grad_norm=0.0, first_ratio=1.0, edges=0,
                           optimizer_steps=0, micro_batches=0)
    if reduction not in ("mean", "sum_children"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if kl_divisor not in KL_DIVISORS:
        raise ValueError(f"unknown KL divisor {kl_divisor!r}; valid: {', '.join(KL_DIVISORS)}")
    if surrogate is None:
        if clip_range is None or adv_clip_max is None:
            raise ValueError("ppo_update needs clip_range and adv_clip_max, or a surrogate")
        cr, am = float(clip_range), float(adv_clip_max)

        def surrogate(ev: Any, e: Tensor, old: Tensor, a: Tensor) -> PPOTerms:
            return ppo_clip_loss(ev.log_prob, old, a, cr, am)
    params = policy.trainable_parameters()
    parents = rollout.parent[edges]
    # unique parents in first-appearance order, so the caller's shuffle decides the order
    order: dict[int, list[int]] = {}
    for j, p in enumerate(parents.tolist()):
        order.setdefault(p if share_parents else j, []).append(j)
    groups = list(order.values())
    cfg = rollout.plan.cfg_factor()
    per_micro = max(1, train.micro_batch // cfg)
    if edges_per_step > 0:
        n_steps = -(-len(groups) // int(edges_per_step))
        bounds = [min(s * int(edges_per_step), len(groups)) for s in range(n_steps + 1)]
    else:
        n_steps = max(1, min(train.optimizer_steps, len(groups)))
        bounds = torch.linspace(0, len(groups), n_steps + 1).round().long().tolist()

    tot_loss = tot_kl = tot_akl = tot_clip = 0.0
    n_terms = nfe = 0
    first_ratio: float | None = None
    grad_norm = 0.0
    micro_batches = 0
    if on_step is not None:
        on_step(0, n_steps)
    for s in range(n_steps):
        mb = groups[bounds[s]:bounds[s + 1]]
        if not mb:
            continue
        m_edges = sum(len(g) for g in mb)
        denom = float(loss_denom) if loss_denom else float(m_edges if reduction == "mean" else len(mb))
        optimizer.zero_grad(set_to_none=True)
        for c in range(0, len(mb), per_micro):
            idx = torch.tensor([j for g in mb[c:c + per_micro] for j in g], dtype=torch.long)
            e = edges[idx]
            ev = engine.logp(rollout, e) if share_parents else engine.logp(rollout, e, share_parents=False)
            nfe += ev.nfe
            old = rollout.logp_old[e].to(ev.log_prob.device)
            terms = surrogate(ev, e, old, adv[idx].to(ev.log_prob.device))
            loss = terms.loss.sum() / denom
            if beta > 0:
                ref = engine.logp(rollout, e, reference=True, **({} if share_parents else {"share_parents": False}))
                nfe += ref.nfe
                kl = gaussian_mean_kl(ev.mean, ref.mean.detach(), kl_std(rollout, e, ev.std.detach(), kl_divisor))
                loss = loss + beta * kl.sum() / denom
                tot_kl += float(kl.detach().sum())
            loss.backward()
            micro_batches += 1
            if first_ratio is None:
                first_ratio = float(terms.ratio.mean())
            tot_loss += float(terms.loss.detach().sum())
            tot_akl += float((0.5 * (ev.log_prob.detach() - old) ** 2).sum())
            tot_clip += float(terms.clipped.float().sum())
            n_terms += int(e.numel())
        grad_norm = optimizer_step(optimizer, params, train.max_grad_norm, nfe)
        if on_step is not None:
            on_step(s + 1, n_steps)
    return UpdateStats(loss=tot_loss / n_terms, approx_kl=tot_akl / n_terms, clip_frac=tot_clip / n_terms,
                       grad_norm=grad_norm, first_ratio=first_ratio if first_ratio is not None else 1.0,
                       edges=n_terms, optimizer_steps=n_steps, micro_batches=micro_batches,
                       kl=tot_kl / n_terms, nfe=nfe)


def per_term_noise(seed: int, iteration: int, stage: str, term_ids: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Gaussian noise [B, *shape] for the update terms ``term_ids`` [B]: one generator seed per term
    (derived from (seed, iteration, stage) + the term id), so micro-batching changes nothing."""
    from bench.engine.seeding import derive_seed

    base = derive_seed(seed, iteration, stage)
    g = torch.Generator()
    out = []
    for j in term_ids.tolist():
        g.manual_seed((base + int(j)) % (1 << 63))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)
