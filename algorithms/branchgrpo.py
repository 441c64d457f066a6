"""BranchGRPO: tree rollouts with binary splits, depth-wise advantages and pruning.

Li et al., "BranchGRPO: Stable and Efficient GRPO with Structured Branching in Diffusion Models",
arXiv 2509.06040; reference code Fredreic1849/BranchGRPO ``fastvideo/train_branchgrpo_flux.py``
(``parse_split_points``, ``flux_step_with_split``, ``run_tree_sample_step``,
``compute_node_rewards_from_leaves``, ``compute_hierarchical_advantages_by_depth``,
``train_one_step_tree``) and ``scripts/finetune/finetune_flux_branchgrpo_8gpus.sh`` (the training recipe).

Implementation details:
- Sampling (``plan``): one tree per prompt on the shared tree engine; every step is an SDE step (the
  released trainer uses DanceGRPO's ``flux_step`` with ``sde_solver``: ``sampler.sde=dance`` in the
  preset); at each split point every node gets ``k`` children (binary in the reference). Split points
  are ``split_points`` or, when empty, ``i * (T // split_rounds)`` for i < ``split_rounds``
  (``parse_split_points``). The image is the last evaluation's x0-prediction (the reference decodes
  ``pred_original``), ``sampler.final_image`` "x0".
- Split noise (``split_noise_scale``, ``split_logp``): the released code draws the children of a split
  as mean + scale * std * z (``tree_split_noise_scale``, 4.0 in the recipe) but scores them, at sampling
  and in training (``grpo_one_step``), under the *unscaled* std: ``split_logp="step"`` reproduces that;
  ``"sampling"`` scores them under the std they were drawn with (scale * std), the consistent density.
  Both go to the engine as ``RolloutPlan.split_noise_scale`` / ``split_logp_std``.
- Node rewards (``advantages``): each node's reward is the mean of its leaf descendants' raw rewards
  (balanced trees: the mean of its children's), or with ``prob_weighted`` (``--tree_prob_weighted``) the
  softmax of the children's sampling-time edge log-probs weighs the children's rewards, level by level
  (``algorithms.common.tree_backup``).
- Depth-wise advantages: within a tree, the nodes of one depth are normalised together,
  (r - mean) / (std + 1e-8) with torch's unbiased std; a depth with one node, or whose std is below
  1e-6, gets 0. The edge parent -> n carries n's advantage.
- Trained edges (``_trained_edges``): every SDE edge of the tree, shuffled; ``depth_pruning`` drops the
  edges into the listed depths (optionally sliding shallower by one every ``depth_pruning_slide_interval``
  iterations down to ``depth_pruning_stop_depth``, default the last split point); ``width_pruning``
  acts on the edges after the last split: "per_branch" keeps the best ``width_pruning_ratio`` of each
  chain below the last split (at least 1), "global" keeps the best and worst halves of
  max(2, ratio * count) over the batch (the reference's modes 1 and 2).
- Loss (``update`` -> ``algorithms.common.ppo_update``): PPO clip on the stored log-probs, advantages
  clamped to +-5. ``update="reference"`` (default) is ``train_one_step_tree``: one denoiser forward per
  trained edge (the two children of a split are evaluated separately, as the released loop over
  transitions does; treebench batches the rows of a mini-batch in micro-batches, the NFE are the
  same), each edge's loss divided by GA x (trained edges // trees), GA =
  ``grad_accum`` (the recipe's ``--gradient_accumulation_steps 12``), an optimizer step (with the norm
  clip) every GA edges and one for the remainder; ``train.optimizer_steps`` is then unused.
  ``update="shared_parent"``: the children of a split share one evaluation of their parent (cheaper by
  the number of split children less their parents: 203 instead of 218 forwards per recipe tree), the
  loss is the mean over a mini-batch's edges and there are ``train.optimizer_steps`` steps; its
  gradients are (GA x edges per tree) / mini-batch size times the reference's, so the 1.0 norm clip
  bites where the reference's rarely does.
- Not reproduced: ``pruning_step_ratio`` (pruning only in the first fraction of the run: the algorithm
  does not know the run's length): pruning is always on, the argparse default 1.0 (the recipe does not
  set the ratio); the mixed ODE/SDE
  tree (``--mix_ode_sde_tree``, off in the recipe): ``mix_ode_sde`` raises NotImplementedError; EMA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from algorithms.common import (
    ConfigState,
    check_count,
    check_fraction,
    check_ppo_settings,
    config_ppo_update,
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

WIDTH_PRUNING = ("off", "per_branch", "global")
UPDATES = ("reference", "shared_parent")
SPLIT_LOGP = ("step", "sampling")


def depthwise_advantages(values: Tensor, tree: Tensor, level: Tensor, eps: float = 1e-8,
                         min_std: float = 1e-6) -> Tensor:
    """BranchGRPO's ``compute_hierarchical_advantages_by_depth``: [N] float32, the node values of each
    (tree, depth) normalised together with torch's unbiased std; 0 for a lone node or a depth whose std
    is below ``min_std``. ``values``, ``tree``, ``level`` [N]."""
    v = values.double()
    out = torch.zeros_like(v)
    key = tree.long() * (int(level.max()) + 1) + level.long()
    for g in torch.unique(key):
        m = key == g
        x = v[m]
        if x.numel() < 2:
            continue
        std = x.std(unbiased=True)
        if float(std) < min_std:
            continue
        out[m] = (x - x.mean()) / (std + eps)
    return out.float()


@dataclass(frozen=True)
class BranchGRPOConfig:
    """BranchGRPO settings (``algo.<field>``).

    k:                children per node at a split point (2 = the reference's binary splits)
    split_rounds:     number of evenly spaced split points i * (T // rounds) when ``split_points`` is
                      empty; default 4 (``--tree_split_rounds``)
    split_points:     explicit split steps (``--tree_split_points``; the recipe: 0, 3, 6, 9 with T = 20)
    split_noise_scale: children drawn with this multiple of the step noise; default 0.3 (argparse; the
                      recipe uses 4.0)
    split_logp:       "step" (score children with the unscaled std, the released code) or "sampling"
                      (score them with the std they were drawn with)
    prob_weighted:    internal-node rewards weighted by the softmax of child-edge log-probs
                      (``--tree_prob_weighted``); False = mean of the leaf descendants
    depth_pruning:    child depths whose edges are not trained (``--depth_pruning``); empty = none
    depth_pruning_slide: slide the pruned depths one shallower every ``depth_pruning_slide_interval``
                      iterations (``--depth_pruning_slide``)
    depth_pruning_slide_interval: iterations per slide; default 1
    depth_pruning_stop_depth: shallowest first pruned depth of the slide; -1 = the last split point
    width_pruning:    "off", "per_branch" (mode 1) or "global" (mode 2), after the last split
    width_pruning_ratio: fraction of the post-split edges kept; default 0.5
    clip_range:       PPO epsilon [ratio]; default 1e-4 (argparse; the recipe uses 1e-3)
    adv_clip_max:     advantage clamp; default 5
    beta:             KL-to-reference weight; default 0 (BranchGRPO has no KL term)
    mix_ode_sde:      the released code's mixed ODE/SDE tree; True is not implemented
    update:           "reference" (one forward per trained edge, loss / (GA x edges per tree), a step every
                      GA edges: ``train_one_step_tree``) or "shared_parent" (one forward per parent, mean
                      loss, ``train.optimizer_steps`` steps)
    grad_accum:       GA of ``update="reference"``: edges per optimizer step and loss divisor; default
                      12 (the recipe's ``--gradient_accumulation_steps``)
    """

    k: int = 2
    split_rounds: int = 4
    split_points: tuple[int, ...] = ()
    split_noise_scale: float = 0.3
    split_logp: str = "step"
    prob_weighted: bool = False
    depth_pruning: tuple[int, ...] = ()
    depth_pruning_slide: bool = False
    depth_pruning_slide_interval: int = 1
    depth_pruning_stop_depth: int = -1
    width_pruning: str = "off"
    width_pruning_ratio: float = 0.5
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.0
    mix_ode_sde: bool = False
    update: str = "reference"
    grad_accum: int = 12

    def __post_init__(self) -> None:
        object.__setattr__(self, "split_points", tuple(int(p) for p in self.split_points))
        object.__setattr__(self, "depth_pruning", tuple(int(d) for d in self.depth_pruning))
        if not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"algo.k must be an integer >= 2 (children per split), got {self.k!r}")
        check_count(self, "split_rounds", 1)
        if any(p < 0 for p in self.split_points):
            raise ValueError(f"algo.split_points must be >= 0, got {self.split_points!r}")
        if not float(self.split_noise_scale) > 0:
            raise ValueError(f"algo.split_noise_scale must be > 0, got {self.split_noise_scale!r}")
        if self.split_logp not in SPLIT_LOGP:
            raise ValueError(f"algo.split_logp must be one of {', '.join(SPLIT_LOGP)}, got {self.split_logp!r}")
        if self.width_pruning not in WIDTH_PRUNING:
            raise ValueError(f"algo.width_pruning must be one of {', '.join(WIDTH_PRUNING)}, "
                             f"got {self.width_pruning!r}")
        check_fraction(self, "width_pruning_ratio")
        if not isinstance(self.depth_pruning_slide_interval, int) or self.depth_pruning_slide_interval < 1:
            raise ValueError("algo.depth_pruning_slide_interval must be an integer >= 1, "
                             f"got {self.depth_pruning_slide_interval!r}")
        if self.update not in UPDATES:
            raise ValueError(f"algo.update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        check_count(self, "grad_accum", 1)
        if self.mix_ode_sde:
            raise NotImplementedError("algo.mix_ode_sde: the released code's mixed ODE/SDE tree (off in its "
                                      "recipe) is not implemented")
        check_ppo_settings(self)


class BranchGRPO(ConfigState):
    name: ClassVar[str] = "branchgrpo"
    Config: ClassVar[type] = BranchGRPOConfig
    FINAL_IMAGE: ClassVar[str] = "x0"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # scripts/finetune/finetune_flux_branchgrpo_8gpus.sh (FLUX.1-dev): 20 steps, DanceGRPO SDE eta 0.3,
        # shift 3 on the linspace schedule, binary splits at 0, 3, 6, 9 (16 leaves), split noise 4.0,
        # clip 1e-3. Optimizer steps: per rank 2 prompts x 218 edges per tree, a step every GA = 12
        # edges -> ceil(436 / 12) = 37 (update "reference" counts them itself; the setting serves
        # update "shared_parent")
        "branchgrpo-code": {"sampler.steps": 20, "sampler.noise_level": 0.3, "sampler.sde": "dance",
                            "sampler.shift": 3.0, "sampler.schedule": "linspace", "algo.k": 2,
                            "algo.split_points": [0, 3, 6, 9], "algo.split_noise_scale": 4.0,
                            "algo.clip_range": 1e-3, "train.optimizer_steps": 37},
    }

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {
        "branchgrpo/leaves": "BranchGRPO: leaves (images) per tree",
        "branchgrpo/trained_edges": "BranchGRPO: edges trained after depth and width pruning",
        "branchgrpo/pruned_edges": "BranchGRPO: SDE edges left out by depth and width pruning",
    }
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        "split_rounds": {"type": "int", "low": 1, "high": 5, "help": "binary split points (2^rounds leaves)"},
        "split_noise_scale": {"type": "float", "low": 0.3, "high": 4.0, "log": True},
        "width_pruning_ratio": {"type": "float", "low": 0.25, "high": 1.0},
    }
    search_default: ClassVar[tuple[str, ...]] = ("split_rounds", "split_noise_scale")

    def __init__(self, config: BranchGRPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        T = sampler.steps
        if config.split_points and max(config.split_points) >= T:
            raise ValueError(f"algo.split_points {list(config.split_points)} must be < sampler.steps={T}")
        if not config.split_points and config.split_rounds > T:
            raise ValueError(f"algo.split_rounds={config.split_rounds} exceeds sampler.steps={T}")

    def split_points(self) -> tuple[int, ...]:
        """``parse_split_points``: the explicit points, or i * (T // rounds) for i < rounds."""
        if self.config.split_points:
            return tuple(sorted(set(self.config.split_points)))
        T, r = self.sampler.steps, self.config.split_rounds
        return tuple(sorted({min(i * (T // r), T - 1) for i in range(r)}))

    def plan(self, iteration: int) -> RolloutPlan:
        T, pts = self.sampler.steps, set(self.split_points())
        branch = tuple(self.config.k if i in pts else 1 for i in range(T))
        leaves = self.config.k ** len(pts)
        return RolloutPlan(num_steps=T, modes=("sde",) * T, branch=branch, trees_per_prompt=1,
                           noise_level=self.sampler.noise_level, sde_type=self.sampler.sde_type,
                           guidance=self.sampler.guidance, final_image=self.sampler.final_image or self.FINAL_IMAGE,
                           split_noise_scale=float(self.config.split_noise_scale),
                           split_logp_std=self.config.split_logp, info={"branchgrpo/leaves": float(leaves)})

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        N = rollout.num_nodes
        leaf_vals = torch.zeros(N)
        leaf_vals[rollout.leaves] = rewards.scores.float()
        weighting = "softmax_logprob" if self.config.prob_weighted else "uniform"
        node_reward = tree_backup(rollout.parent, leaf_vals, rollout.logp_old, weighting)  # NaN at roots
        node_reward = torch.nan_to_num(node_reward, nan=0.0)  # roots: a lone node per depth -> advantage 0
        adv = depthwise_advantages(node_reward, rollout.tree, rollout.level)
        edge = adv.clone()
        edge[rollout.parent < 0] = float("nan")
        return Advantages(edge=edge, leaf=adv[rollout.leaves])

    def pruned_depths(self, iteration: int) -> set[int]:
        """Child depths whose edges are not trained this iteration (with the optional slide)."""
        base = sorted(self.config.depth_pruning)
        if not base:
            return set()
        if self.config.depth_pruning_slide:
            stop = self.config.depth_pruning_stop_depth
            stop = stop if stop >= 0 else max(self.split_points())
            shift = min(iteration // self.config.depth_pruning_slide_interval, max(0, base[0] - stop))
            base = [d - shift for d in base]
        return set(base)

    def _width_prune(self, rollout: Rollout, edges: Tensor, adv: Tensor) -> Tensor:
        """The reference's width pruning of the edges after the last split (``train_one_step_tree``)."""
        last = max(self.split_points())
        step = rollout.level[edges] - 1
        late = step > last
        keep = ~late
        ratio = float(self.config.width_pruning_ratio)
        idx = torch.nonzero(late).flatten()
        if idx.numel() == 0:
            return edges
        if self.config.width_pruning == "per_branch":
            # the chain below each child of the last split: the ancestor at level last + 1
            anc = edges[idx].clone()
            while bool((rollout.level[anc] > last + 1).any()):
                deep = rollout.level[anc] > last + 1
                anc[deep] = rollout.parent[anc[deep]]
            for a in torch.unique(anc):
                grp = idx[anc == a]
                order = torch.argsort(adv[edges[grp]], descending=True, stable=True)
                keep[grp[order[:max(1, int(grp.numel() * ratio))]]] = True
        else:
            order = idx[torch.argsort(adv[edges[idx]], descending=True, stable=True)]
            n = max(2, int(order.numel() * ratio))
            best = n // 2
            keep[order[:best]] = True
            keep[order[order.numel() - (n - best):]] = True
        return edges[keep]

    def _trained_edges(self, rollout: Rollout, adv: Tensor) -> Tensor:
        edges = torch.nonzero(rollout.trainable).flatten()
        pruned = self.pruned_depths(rollout.iteration)
        if pruned:
            edges = edges[torch.tensor([int(d) not in pruned for d in rollout.level[edges].tolist()],
                                       dtype=torch.bool)]
        if self.config.width_pruning != "off" and edges.numel():
            edges = self._width_prune(rollout, edges, adv)
        perm = torch.randperm(edges.numel(), generator=generator(self.seed, rollout.iteration, "update"))
        return edges[perm]

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = self._trained_edges(rollout, adv.edge)
        kw: dict[str, Any] = {}
        if self.config.update == "reference":
            # train_one_step_tree: loss / (GA x avg_samples_per_tree), avg = len(samples) // num_trees
            trees = max(1, int((rollout.parent < 0).sum()))
            ga = self.config.grad_accum
            kw = {"share_parents": False, "edges_per_step": ga,
                  "loss_denom": float(ga * max(1, int(edges.numel()) // trees))}
        stats = config_ppo_update(self.config, self.train, policy, engine, optimizer, rollout, edges, adv.edge, **kw)
        total = int(rollout.trainable.sum())
        metrics = {**stats.metrics, "branchgrpo/trained_edges": float(edges.numel()),
                   "branchgrpo/pruned_edges": float(total - edges.numel())}
        return replace(stats, metrics=metrics)

