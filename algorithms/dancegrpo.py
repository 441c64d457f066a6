"""DanceGRPO: GRPO on all steps of a stochastic flow sampler, with group-shared initial noise.

Xue et al., "DanceGRPO: Unleashing GRPO on Visual Generation", arXiv 2505.07818; reference code
XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py`` (``sample_reference_model``, ``run_sample_step``,
``train_one_step``, ``grpo_one_step``).

Implementation details:
- Sampling (``plan``): all T steps are SDE steps (``grpo=True`` at every step). The SDE is
  ``sampler.sde``: treebench's default is Flow-GRPO's for every algorithm, so a comparison isolates the
  algorithms; ``sampler.sde=dance`` selects DanceGRPO's own step (``flux_step`` with ``sde_solver``,
  eta 0.3 in the paper preset). ``group_size`` chains per prompt start from ONE shared initial noise
  (``--init_same_noise``); treebench shares it within a prompt's group only (``sample_reference_model``
  also shares it across the prompts of a rank when ``train_batch_size`` > 1).
- Final image (``sampler.final_image``, default "x0"): ``run_sample_step`` returns ``pred_original``
  of its last step, the data prediction x - sigma v of the last denoiser evaluation, and that is what
  the VAE decodes and the reward scores; the last SDE step's sample (never trained, see below) never
  reaches the reward. "sample" decodes the sampled last latent instead.
- Advantages (``advantages``): group normalisation over the prompt's ``group_size`` rewards,
  (r - mean) / (std + 1e-8) with torch's *unbiased* std (``train_one_step``); every step of a chain
  carries its leaf's advantage.
- Trained steps (``_trained_edges``): the last denoising step is never trained (the reference slices
  ``[:, :-1]``); of the first T - 1 steps each chain trains an independent random subset of
  ``int((T - 1) * timestep_fraction)`` steps (``torch.randperm`` per sample), fraction 0.6.
- Loss (``update`` -> ``algorithms.common.ppo_update``): PPO clipped surrogate per (chain, step) with
  the rollout's stored log-probs, advantages clamped to +-5, clip range 1e-4; the reference divides
  every term by (gradient accumulation x trained steps), i.e. a mean over the accumulated terms,
  which ``ppo_update``'s "mean" reduction reproduces. No KL term (``beta`` = 0).
- Options: ``sampler.sde=cps`` (coefficients-preserving sampling, ``bench.engine.sde.cps_sde_step``) and
  ``guard`` (GRPO-Guard's RatioNorm and gradient reweighting, flow_grpo's released form, on
  ``sampler.sde=flow_grpo``; ``algorithms.common.guard_surrogate``).
- Not reproduced: FLUX's distilled guidance embedding (treebench models use CFG when
  ``sampler.guidance`` > 1), EMA, FSDP; optimizer settings are harness ``train.*`` settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from algorithms.common import (
    PAPER_SAMPLER,
    ConfigState,
    chain_edge_advantages,
    chain_step_edges,
    check_count,
    check_fraction,
    check_guard,
    check_ppo_settings,
    config_ppo_update,
    group_normalize,
    random_step_subset,
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


@dataclass(frozen=True)
class DanceGRPOConfig:
    """DanceGRPO settings (``algo.<field>``).

    group_size:        chains (images) per prompt [count]; default 12 (``--num_generations 12``)
    timestep_fraction: fraction of the first T - 1 steps trained per chain [0, 1]; default 0.6
                       (``--timestep_fraction 0.6``)
    shared_noise:      the group's chains start from one initial noise; default True
                       (``--init_same_noise``)
    clip_range:        PPO epsilon [ratio]; default 1e-4 (``--clip_range``)
    adv_clip_max:      advantage clamp [std units]; default 5 (``--adv_clip_max``)
    std_eps:           added to the group std; default 1e-8 (``train_one_step``)
    beta:              weight of the KL to the reference; default 0 (DanceGRPO has no KL term)
    guard:             GRPO-Guard (arXiv 2510.22319): RatioNorm + gradient reweighting in place of the plain
                       PPO ratio (``algorithms.common.guard_surrogate``, flow_grpo's released form); default
                       False; needs ``sampler.sde=flow_grpo``
    """

    group_size: int = 12
    timestep_fraction: float = 0.6
    shared_noise: bool = True
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    std_eps: float = 1e-8
    beta: float = 0.0
    guard: bool = False

    def __post_init__(self) -> None:
        check_count(self, "group_size", 2, "for group-relative advantages")
        check_fraction(self, "timestep_fraction")
        check_ppo_settings(self)


class DanceGRPO(ConfigState):
    name: ClassVar[str] = "dancegrpo"
    Config: ClassVar[type] = DanceGRPOConfig
    #: the reference decodes the last evaluation's x0-prediction (``run_sample_step``: latents = pred_original)
    FINAL_IMAGE: ClassVar[str] = "x0"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # scripts/finetune/finetune_flux_grpo.sh (FLUX.1-dev): 16 steps, DanceGRPO SDE eta 0.3, shift 3,
        # G = 12, fraction 0.6 (FLUX's distilled guidance has no treebench equivalent: guidance unchanged)
        # and FLUX's schedule: shifted linspace, quantised timesteps.
        # Optimizer steps: per rank train_batch_size 1 prompt x num_generations 12 = 12 samples per
        # iteration, an optimizer step every gradient_accumulation_steps = 4 samples -> 12 / 4 = 3
        "dancegrpo-paper": {"sampler.steps": 16, "sampler.noise_level": 0.3, "sampler.sde": "dance",
                            "sampler.shift": 3.0, "sampler.schedule": "linspace", "algo.group_size": 12,
                            "algo.timestep_fraction": 0.6, "algo.clip_range": 1e-4, "train.optimizer_steps": 3},
        # the TreeGRPO paper's comparison setting (SD3.5-M re-run): T = 10, CFG 4.5, Flow-GRPO SDE 0.7;
        # DanceGRPO's trainer takes 3 optimizer steps per iteration (12 samples, GA 4, as above)
        "treegrpo-paper": {**PAPER_SAMPLER,
                           "sampler.sde": "flow_grpo", "train.optimizer_steps": 3},
    }

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {
        "dancegrpo/trained_steps": "DanceGRPO: steps trained per chain (int((T - 1) * timestep_fraction))",
    }
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        "timestep_fraction": {"type": "float", "low": 0.1, "high": 1.0, "help": "trained fraction of steps"},
        "group_size": {"type": "int", "low": 4, "high": 16, "step": 4},
    }
    search_default: ClassVar[tuple[str, ...]] = ("timestep_fraction",)

    def __init__(self, config: DanceGRPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        if config.guard:
            check_guard(sampler)
        if self._n_train() < 1:
            raise ValueError(f"algo.timestep_fraction={config.timestep_fraction} trains no step with "
                             f"sampler.steps={sampler.steps} (int((T - 1) * fraction) must be >= 1)")

    def _n_train(self) -> int:
        return int((self.sampler.steps - 1) * float(self.config.timestep_fraction))

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=("sde",) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size, shared_noise=self.config.shared_noise,
                           noise_level=self.sampler.noise_level, sde_type=self.sampler.sde_type,
                           guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE, keep_means=self.config.guard,
                           info={"dancegrpo/trained_steps": float(self._n_train())})

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        leaf = group_normalize(rewards.scores, rollout.leaf_prompts(), unbiased=True, eps=self.config.std_eps)
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf)

    def _trained_edges(self, rollout: Rollout) -> torch.Tensor:
        gen = generator(self.seed, rollout.iteration, "update")
        step_edges = chain_step_edges(rollout)[:, :-1]  # [C, T-1]: the last step is never trained
        C, Tm1 = step_edges.shape
        chosen = torch.gather(step_edges, 1, random_step_subset(C, Tm1, self._n_train(), gen))
        return shuffled_chain_edges(chosen, rollout, gen)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = self._trained_edges(rollout)
        c = self.config
        return config_ppo_update(c, self.train, policy, engine, optimizer, rollout, edges, adv.edge)

