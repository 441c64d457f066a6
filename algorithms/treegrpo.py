"""TreeGRPO: tree-structured rollouts with shared prefixes and per-edge advantages.

Ding & Ye, "TreeGRPO: Tree-Advantage GRPO for Online RL Post-Training of Diffusion Models", arXiv
2512.08153 (ICLR 2026); the authors' released code (``train.py``: ``RLTrainer.sample``,
``update_advantages``, ``train``, ``treegrpo_update``; ``pipelines_with_logprob/stablediffusion3.py``;
``schedulers_with_logprob/flow_match_euler_discrete.py::flow_match_euler_discrete_step_with_logprob``).

Implementation details:
- Sampling (``plan``): every tree starts from one root noise (shared by all its leaves by
  construction); ``trees_per_prompt`` trees per prompt with independent root noises. Inside an SDE
  window of ``window`` consecutive steps (default = ``d``) the ``d`` branching steps (the first d of
  the window by default, ``branch_at``) are SDE steps with ``k`` children each, all drawn around the
  mean of ONE denoiser evaluation (the engine expands a node's output k times before the step);
  remaining window steps are single-child SDE steps; every step outside the window is a
  deterministic ODE (Euler) step. A tree has k^d leaves. The SDE step std is clamped to
  [e^log_std_min, e^log_std_max] = [e^-5, e^2] (the released step function's ``log_std_min=-5,
  log_std_max=2``, applied to std_dev_t sqrt(-dt) for sampling and log-probs); the lower bound acts
  only near sigma = 0, e.g. the SD3 schedule's last sigma 0.0089 at T = 10.
- Final image (``sampler.final_image``, default "sample"): the released pipeline decodes the leaves'
  latents after the last (ODE) step, which equal the last evaluation's x0-prediction.
- Window (``_window_start``): "random" (paper: a random consecutive window per iteration, drawn from
  ``bench.engine.seeding.generator(seed, iteration, "plan")``) by default; "progressive" (released code:
  starts at step 0 and moves by ``window_stride`` every ``shift_interval`` = 50 iterations) as an
  option. Either way the window avoids the last step when the schedule leaves room (the code asserts
  the window ends before step T - 1).
- Advantages (``advantages``): leaf rewards normalised per prompt over all leaves of all its trees,
  (r - mean) / (std + 1e-8) with the *population* std (``update_advantages``); edge advantages by
  ``algorithms.common.tree_backup``: A(u -> c) = V(c), V(leaf) = leaf advantage, V(u) = weighted mean
  of its children's edge advantages, single-child (ODE or non-branching) links pass values through.
  Weights: ``uniform`` (default: the released ``update_advantages`` returns the plain mean of the
  children's advantages) or ``softmax_logprob`` (softmax of the children's sampling-time edge
  log-probs, one reading of the paper's "weighted by the branch's generation probability"; the paper's
  exact formula is not given in the text available to us, so this is an interpretation, used by the
  ``treegrpo-paper`` preset). The log-probs are per-dimension means, so on SD3.5-size latents the two
  agree to about 3 decimals; on small latents they do not (``treegrpo/softmax_weight_max`` logs the
  mean largest sibling weight, 1/k = uniform).
- Loss (``update`` -> ``algorithms.common.ppo_update``): PPO clipped surrogate on every SDE edge of
  the window, parents in random order; all k children of a parent get their new log-probs from ONE
  denoiser evaluation (``engine.logp`` evaluates each distinct parent once), so an update costs
  (k^d - 1)/(k - 1) evaluations per tree (x2 with CFG) for k(k^d - 1)/(k - 1) edge terms when
  window = d. Advantages clamped to +-5, clip range 1e-4. ``loss_agg = "sum"`` (code default) sums
  the children's terms of a parent and averages over parents; "mean" averages over edges. No KL by
  default (``beta``).
- Optimizer steps: ``train()`` sets gradient accumulation to max(1, total_samples // 2) over its
  (k^d - 1)/(k - 1) parent nodes, i.e. about 2 optimizer steps per iteration (leftover micro-batches
  spill into the next iteration there); both presets set ``train.optimizer_steps = 2``.
- Options: ``sampler.sde=cps`` (coefficients-preserving sampling; the step-std clamp is not applied to
  it) and ``guard`` (GRPO-Guard's RatioNorm and gradient reweighting per edge, flow_grpo's released form,
  on ``sampler.sde=flow_grpo``; ``algorithms.common.guard_surrogate``).
- Not reproduced: the batch-size-1 loops (treebench batches whole tree levels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from algorithms.common import (
    PAPER_SAMPLER,
    WEIGHTINGS,
    ConfigState,
    check_count,
    check_guard,
    check_ppo_settings,
    config_ppo_update,
    group_normalize,
    progressive_window_start,
    tree_backup,
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

WINDOW_MODES = ("random", "progressive")
BRANCH_AT = ("first", "last")
LOSS_AGG = ("sum", "mean")


@dataclass(frozen=True)
class TreeGRPOConfig:
    """TreeGRPO settings (``algo.<field>``).

    k:                branching factor: children per node at a branching step [count]; default 3 (paper's
                      best trade-off; released code 2)
    d:                branching depth: branching steps per tree [steps]; default 3 (paper; code 4)
    window:           SDE window length W >= d [steps]; default None = d (released code: every window
                      step branches)
    window_mode:      "random" (paper: random consecutive window each iteration) or "progressive"
                      (released code: sliding window); default "random"
    window_stride:    progressive: steps the window moves per shift [steps]; default 1 (code ``tree.s``)
    shift_interval:   progressive: iterations between shifts [iterations]; default 50 (code ``tree.tou``)
    roll_back:        progressive: restart at step 0 after the last position (True) or stay there
                      (False); default False (the code stops at its assertion)
    branch_at:        which d steps of the window branch: "first" or "last"; default "first"
    trees_per_prompt: independent root noises (trees) per prompt [count]; default 1 (code
                      ``sample.num_trees``)
    weighting:        edge-advantage weights in the backup: "uniform" (released code) or
                      "softmax_logprob" (a reading of the paper); default "uniform"
    log_std_min, log_std_max: the SDE step std is clamped to [e^min, e^max]; default -5, 2 (released
                      step function); null disables the clamp
    loss_agg:         "sum" over a parent's children, mean over parents (code ``tree.loss_agg``), or
                      "mean" over all edges; default "sum"
    clip_range:       PPO epsilon [ratio]; default 1e-4 (code ``clip_range``)
    adv_clip_max:     advantage clamp [std units]; default 5 (code ``adv_clip_max``)
    std_eps:          added to the per-prompt population std of leaf rewards; default 1e-8
    beta:             weight of the KL to the reference; default 0 (no KL in the code)
    guard:            GRPO-Guard (arXiv 2510.22319): RatioNorm + gradient reweighting in place of the plain
                      PPO ratio on every edge (``algorithms.common.guard_surrogate``, flow_grpo's released
                      form; the RatioNorm scale is the edge's step std, clamp included); default False;
                      needs ``sampler.sde=flow_grpo``
    """

    k: int = 3
    d: int = 3
    window: int | None = None
    window_mode: str = "random"
    window_stride: int = 1
    shift_interval: int = 50
    roll_back: bool = False
    branch_at: str = "first"
    trees_per_prompt: int = 1
    weighting: str = "uniform"
    log_std_min: float | None = -5.0
    log_std_max: float | None = 2.0
    loss_agg: str = "sum"
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    std_eps: float = 1e-8
    beta: float = 0.0
    guard: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"algo.k (branching factor) must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.d, int) or self.d < 1:
            raise ValueError(f"algo.d (branching depth) must be an integer >= 1, got {self.d!r}")
        if self.window is not None:
            if not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"algo.window must be an integer >= 1 (or null = algo.d), "
                                 f"got {self.window!r}")
            if self.d > self.window:
                raise ValueError(f"algo.d={self.d} > algo.window={self.window}: the branching steps must lie "
                                 f"inside the SDE window")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"algo.window_mode must be one of {', '.join(WINDOW_MODES)}, "
                             f"got {self.window_mode!r}")
        check_count(self, "window_stride", 0)
        check_count(self, "shift_interval", 1)
        if self.branch_at not in BRANCH_AT:
            raise ValueError(f"algo.branch_at must be one of {', '.join(BRANCH_AT)}, got {self.branch_at!r}")
        check_count(self, "trees_per_prompt", 1)
        if self.k ** self.d * self.trees_per_prompt < 2:
            raise ValueError("a prompt needs at least 2 leaves for group-relative advantages: raise algo.k "
                             "or algo.trees_per_prompt")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"algo.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if (self.log_std_min is None) != (self.log_std_max is None):
            raise ValueError("algo.log_std_min and algo.log_std_max must both be numbers or both null")
        if self.log_std_min is not None and not float(self.log_std_min) <= float(self.log_std_max):
            raise ValueError(f"algo.log_std_min={self.log_std_min} > algo.log_std_max={self.log_std_max}")
        if self.loss_agg not in LOSS_AGG:
            raise ValueError(f"algo.loss_agg must be one of {', '.join(LOSS_AGG)}, got {self.loss_agg!r}")
        check_ppo_settings(self)


class TreeGRPO(ConfigState):
    name: ClassVar[str] = "treegrpo"
    Config: ClassVar[type] = TreeGRPOConfig
    #: the released pipeline decodes the leaves' latents (the last step is an ODE step)
    FINAL_IMAGE: ClassVar[str] = "sample"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the paper's setting (SD3.5-medium, 512^2): T = 10, CFG 4.5, noise 0.7, best shape k = 3, d = 3,
        # probability-weighted backup (softmax of the branch log-probs: our reading of the paper's text,
        # the exact formula is not available; the released code averages uniformly).
        # Optimizer steps: train() sets GA = total_samples // 2 = 13 // 2 = 6 over the 13 parent nodes
        # of a k = 3, d = 3 tree -> 2 steps per iteration (the 13th node's gradient spills over)
        "treegrpo-paper": {**PAPER_SAMPLER,
                           "sampler.sde": "flow_grpo", "algo.k": 3, "algo.d": 3, "algo.window_mode": "random",
                           "algo.weighting": "softmax_logprob", "train.optimizer_steps": 2},
        # the released code's configs/base.yaml: k = 2, window = d = 4 from step 0, sliding by 1 every 50
        # iterations, uniform weights, summed children loss; GA = 15 // 2 = 7 over 15 parents -> 2 steps
        "treegrpo-code": {**PAPER_SAMPLER,
                          "sampler.sde": "flow_grpo", "algo.k": 2, "algo.d": 4, "algo.window": 4,
                          "algo.window_mode": "progressive", "algo.window_stride": 1,
                          "algo.shift_interval": 50, "algo.weighting": "uniform", "algo.loss_agg": "sum",
                          "train.optimizer_steps": 2},
    }

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {
        "treegrpo/window_start": "TreeGRPO: first step of the SDE window",
        "treegrpo/window": "TreeGRPO: SDE window length",
        "treegrpo/branch_start": "TreeGRPO: first branching step",
        "treegrpo/leaves": "TreeGRPO: leaves (images) per tree, k^d",
        "treegrpo/edge_adv_abs_mean": "TreeGRPO: mean |edge advantage| over trained edges",
        "treegrpo/softmax_weight_max": "TreeGRPO: largest softmax_logprob sibling weight (1/k = uniform)",
    }
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        "k": {"type": "int", "low": 2, "high": 4, "help": "branching factor"},
        "d": {"type": "int", "low": 1, "high": 3, "help": "branching depth"},
        # the window holds the d branching steps, so it is constrained to [d, T] (not pruned)
        "window": {"type": "int", "low": "d", "high": "sampler.steps", "help": "SDE window length"},
        "weighting": ["softmax_logprob", "uniform"],
        "window_mode": ["random", "progressive"],
        "branch_at": ["first", "last"],
        "trees_per_prompt": {"type": "int", "low": 1, "high": 3},
    }
    search_default: ClassVar[tuple[str, ...]] = ("k", "d", "window")

    def __init__(self, config: TreeGRPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        if config.guard:
            check_guard(sampler)
        T, W = sampler.steps, self.window
        if W > T:
            what = f"algo.window={W}" if config.window is not None else f"algo.d={W} (algo.window = algo.d)"
            raise ValueError(f"{what} > sampler.steps={T}: the SDE window must fit in the schedule")
        if config.d > W:
            raise ValueError(f"algo.d={config.d} > algo.window={W}")

    @property
    def window(self) -> int:
        return self.config.window if self.config.window is not None else self.config.d

    def _max_start(self) -> int:
        """Last window start: the window ends before the last step when the schedule leaves room."""
        T, W = self.sampler.steps, self.window
        return max(0, T - W - 1)

    def _window_start(self, iteration: int) -> int:
        c = self.config
        if c.window_mode == "progressive":
            return progressive_window_start(iteration, c.shift_interval, c.window_stride, self._max_start(),
                                            c.roll_back)
        gen = generator(self.seed, iteration, "plan")
        return int(torch.randint(0, self._max_start() + 1, (1,), generator=gen))

    def plan(self, iteration: int) -> RolloutPlan:
        c, T, W = self.config, self.sampler.steps, self.window
        s0 = self._window_start(iteration)
        b0 = s0 if c.branch_at == "first" else s0 + W - c.d
        modes = tuple("sde" if s0 <= i < s0 + W else "ode" for i in range(T))
        branch = tuple(c.k if b0 <= i < b0 + c.d else 1 for i in range(T))
        return RolloutPlan(num_steps=T, modes=modes, branch=branch, trees_per_prompt=c.trees_per_prompt,
                           shared_noise=False, noise_level=self.sampler.noise_level,
                           sde_type=self.sampler.sde_type, guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE, keep_means=c.guard,
                           log_std_range=(None if c.log_std_min is None
                                          else (float(c.log_std_min), float(c.log_std_max))),
                           info={"treegrpo/window_start": float(s0), "treegrpo/window": float(W),
                                 "treegrpo/branch_start": float(b0), "treegrpo/leaves": float(c.k ** c.d)})

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        leaf = group_normalize(rewards.scores, rollout.leaf_prompts(), unbiased=False,
                               eps=self.config.std_eps)
        values = torch.full((rollout.num_nodes,), float("nan"))
        values[rollout.leaves] = leaf
        edge = tree_backup(rollout.parent, values, rollout.logp_old, self.config.weighting)
        tr = rollout.trainable
        metrics = {"treegrpo/edge_adv_abs_mean": float(edge[tr].abs().mean()) if bool(tr.any()) else 0.0,
                   "treegrpo/softmax_weight_max": _mean_max_sibling_weight(rollout)}
        return Advantages(edge=edge, leaf=leaf, metrics=metrics)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = torch.nonzero(rollout.trainable).flatten()
        # random edge order = random parent order (ppo_update keeps a parent's children together and
        # scores them from one evaluation)
        gen = generator(self.seed, rollout.iteration, "update")
        edges = edges[torch.randperm(edges.numel(), generator=gen)]
        c = self.config
        return config_ppo_update(c, self.train, policy, engine, optimizer, rollout, edges, adv.edge,
                                 reduction="sum_children" if c.loss_agg == "sum" else "mean")



def _mean_max_sibling_weight(rollout: Rollout) -> float:
    """Diagnostic: mean over branching parents of the largest softmax(edge log-prob) weight among its
    children (1/k = uniform; 1 = one child takes all the weight). Shows how far the paper's
    probability weighting is from the code's uniform mean on per-dimension mean log-probs."""
    par = rollout.parent
    has = par >= 0
    n_children = torch.bincount(par[has], minlength=rollout.num_nodes)
    ch = torch.nonzero(has & (n_children[par.clamp_min(0)] > 1)).flatten()
    if ch.numel() == 0:
        return 1.0
    p, lp = par[ch], rollout.logp_old[ch].double()
    N = rollout.num_nodes
    m = torch.full((N,), -float("inf"), dtype=torch.float64).scatter_reduce(0, p, lp, reduce="amax")
    e = torch.exp(lp - m[p])
    z = torch.zeros(rollout.num_nodes, dtype=torch.float64).index_add_(0, p, e)
    w = e / z[p]
    wmax = torch.zeros(rollout.num_nodes, dtype=torch.float64).scatter_reduce(0, p, w, reduce="amax")
    return float(wmax[torch.unique(p)].mean())
