"""A throw-away algorithm, to prove that adding one takes this file and one registry line
(tests/test_add_algorithm.py): all-SDE chains, advantage = reward minus the group's best, PPO-clip."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch.optim import Optimizer

from algorithms.common import chain_edge_advantages, ppo_update
from bench.engine.rollout import RolloutEngine
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
class ThrowawayConfig:
    """group_size: chains per prompt; clip_range: PPO epsilon."""

    group_size: int = 2
    clip_range: float = 1e-4


class Throwaway:
    name: ClassVar[str] = "throwaway"
    Config: ClassVar[type] = ThrowawayConfig
    log_keys: ClassVar[dict[str, str]] = {"throwaway/gap": "Throwaway: mean gap to the group's best reward"}
    search_space: ClassVar[dict[str, Any]] = {"group_size": {"type": "int", "low": 2, "high": 3}}
    search_default: ClassVar[tuple[str, ...]] = ("group_size",)

    def __init__(self, config: ThrowawayConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train = config, sampler, train

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=("sde",) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size,
                           noise_level=self.sampler.noise_level, guidance=self.sampler.guidance)

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        groups = rollout.leaf_prompts()
        best = torch.stack([rewards.scores[groups == g].max() for g in groups])
        leaf = rewards.scores - best
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf,
                          metrics={"throwaway/gap": float(-leaf.mean())})

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = torch.nonzero(rollout.trainable).flatten()
        return ppo_update(policy, engine, optimizer, rollout, edges, adv.edge[edges], train=self.train,
                          clip_range=self.config.clip_range, adv_clip_max=5.0)

    def state_dict(self) -> dict:
        return {"config": asdict(self.config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
