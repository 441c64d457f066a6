"""Minimal chain GRPO: the smallest algorithm that exercises the whole harness.

Not one of the benchmarked papers: a plain Flow-GRPO-style baseline (Liu et al. 2025, arXiv
2505.05470) used by the harness smoke tests and as a sanity reference.

Implementation details:
- G independent chains per prompt (i.i.d. initial noise), every step SDE (``plan``); the final image
  is the last sampled latent (``sampler.final_image`` default "sample", as Flow-GRPO's
  ``sd3_pipeline_with_logprob`` decodes it).
- Leaf advantage = (r - mean_prompt) / (std_prompt + eps), population std (``advantages``).
- Every SDE edge of every chain carries its leaf's advantage; PPO-clip on all of them, in a random
  order, mean over edges (``update`` -> ``algorithms.common.ppo_update``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from algorithms.common import ConfigState, chain_edge_advantages, config_ppo_update, group_normalize
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
class GRPOConfig:
    """group_size: chains per prompt (G); clip_range: PPO epsilon; adv_clip_max: advantage clamp;
    std_eps: added to the group std; beta: KL-to-reference weight (0 = off)."""

    group_size: int = 4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    std_eps: float = 1e-4
    beta: float = 0.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.clip_range <= 0:
            raise ValueError("algo.clip_range must be > 0")


class GRPO(ConfigState):
    name: ClassVar[str] = "grpo"
    Config: ClassVar[type] = GRPOConfig
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    FINAL_IMAGE: ClassVar[str] = "sample"

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {}
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        "group_size": {"type": "int", "low": 2, "high": 8},
        "clip_range": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    }
    search_default: ClassVar[tuple[str, ...]] = ("group_size",)

    def __init__(self, config: GRPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, seed

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=("sde",) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size, shared_noise=False,
                           noise_level=self.sampler.noise_level, sde_type=self.sampler.sde_type,
                           guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE)

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        leaf = group_normalize(rewards.scores, rollout.leaf_prompts(), unbiased=False, eps=self.config.std_eps)
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = torch.nonzero(rollout.trainable).flatten()
        perm = torch.randperm(edges.numel(), generator=generator(self.seed, rollout.iteration, "update"))
        edges = edges[perm]
        return config_ppo_update(self.config, self.train, policy, engine, optimizer, rollout, edges, adv.edge)

