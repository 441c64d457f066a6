"""An algorithm outside treebench: best-of-group chains.

G independent all-SDE chains per prompt; only the best chain of each group (advantage +1) and the worst
(advantage -1) are trained, the others get advantage 0 and are skipped. It exists to show the plug-in
contract, not as a method to benchmark.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch.optim import Optimizer

from algorithms.common import chain_edge_advantages, ppo_update
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


@dataclass(frozen=True)
class BestOfGroupConfig:
    """group_size: chains per prompt (G, >= 2); clip_range: PPO epsilon; adv_clip_max: advantage clamp."""

    group_size: int = 4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 (a best and a worst chain), "
                             f"got {self.group_size}")


class BestOfGroup:
    name: ClassVar[str] = "example_bestofgroup"
    Config: ClassVar[type] = BestOfGroupConfig
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    log_keys: ClassVar[dict[str, str]] = {
        "example_bestofgroup/trained_chains": "BestOfGroup: chains trained this iteration (2 per prompt)",
    }
    search_space: ClassVar[dict[str, Any]] = {"group_size": {"type": "int", "low": 2, "high": 6}}
    search_default: ClassVar[tuple[str, ...]] = ("group_size",)

    def __init__(self, config: BestOfGroupConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=("sde",) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size,
                           noise_level=self.sampler.noise_level, sde_type=self.sampler.sde_type,
                           guidance=self.sampler.guidance)

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        groups = rollout.leaf_prompts()
        leaf = torch.zeros_like(rewards.scores)
        for g in torch.unique(groups):
            idx = torch.nonzero(groups == g).flatten()
            s = rewards.scores[idx]
            leaf[idx[int(s.argmax())]] += 1.0
            leaf[idx[int(s.argmin())]] -= 1.0
        trained = float((leaf != 0).sum())
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf,
                          metrics={"example_bestofgroup/trained_chains": trained})

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = torch.nonzero(rollout.trainable & (adv.edge.nan_to_num(0.0) != 0)).flatten()
        order = torch.randperm(edges.numel(), generator=generator(self.seed, rollout.iteration, "update"))
        edges = edges[order]
        return ppo_update(policy, engine, optimizer, rollout, edges, adv.edge[edges], train=self.train,
                          clip_range=self.config.clip_range, adv_clip_max=self.config.adv_clip_max)

    def state_dict(self) -> dict:
        return {"config": asdict(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
