"""DDPO: Denoising Diffusion Policy Optimization.

Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement Learning",
arXiv 2305.13301 (ICLR 2024); reference code kvablack/ddpo-pytorch (``scripts/train.py``,
``ddpo_pytorch/stat_tracking.py``, ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``,
``pipeline_with_logprob.py``).

Implementation details:
- Sampling (``plan``): every one of the T steps is stochastic. On epsilon-prediction models the engine
  uses DDIM with eta = ``sampler.noise_level`` (DDPO's setting is eta = 1, i.e. DDPM-like variance,
  ``ddim_step_with_logprob``); on flow models the same algorithm runs on the flow SDE
  (``sampler.sde``), as the GRPO papers re-ran it. Initial noises are i.i.d. (no shared noise): DDPO
  has no groups, it draws prompts i.i.d. from a small set; treebench samples ``group_size`` i.i.d.
  chains per drawn prompt, so prompts repeat within and across iterations.
- Final image (``sampler.final_image``, default "sample"): ``pipeline_with_logprob`` decodes the latent
  its last DDIM step sampled (with eta = 1 that step still adds noise of std
  sqrt((1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev)), small at the last step). "x0" decodes the last
  evaluation's data prediction instead.
- Advantages (``advantages``): per-prompt statistics tracking (``PerPromptStatTracker`` in
  ``algorithms.common``): a FIFO buffer of the last ``buffer_size`` rewards of every prompt string,
  persisted across iterations (and in ``state_dict``); batch mean / population std while a buffer
  holds fewer than ``min_count`` rewards; eps 1e-6. With ``per_prompt_stat_tracking = False`` the
  whole batch is normalised with the population std + 1e-8 (``scripts/train.py``: ``rewards`` is a
  numpy array there, and numpy's ``std`` has ddof = 0).
- Trained steps (``_trained_edges``): for every chain an independent random permutation of its T steps;
  the first ``int(T * timestep_fraction)`` are trained (fraction 1.0 = all steps, in random order).
- Loss (``update`` -> ``algorithms.common.ppo_update``): PPO clipped surrogate per (chain, step) with
  the old log-probs stored at sampling time, advantages clamped to +-``adv_clip_max``, clip range
  1e-4, mean over the trained terms, gradients accumulated over the whole batch (one optimizer step
  per ``train.optimizer_steps`` mini-batch); CFG recomputed in the update with the sampling guidance.
  No KL term by default (``beta`` enables treebench's optional KL to the reference).
- Not reproduced: LoRA vs full fine-tuning and the optimizer are harness settings (``model.*``,
  ``train.*``); DDPO's ``num_inner_epochs`` is 1, as here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch.optim import Optimizer

from algorithms.common import (
    PAPER_SAMPLER,
    PerPromptStatTracker,
    chain_edge_advantages,
    chain_step_edges,
    check_count,
    check_fraction,
    check_ppo_settings,
    config_ppo_update,
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
class DDPOConfig:
    """DDPO settings (``algo.<field>``).

    group_size:        i.i.d. chains (images) per drawn prompt per iteration [count]; default 4
                       (ddpo-pytorch draws each image's prompt i.i.d. from 45 animals: 256 images per
                       epoch is ~5.7 per prompt; treebench draws prompts per iteration)
    timestep_fraction: fraction of each chain's T steps trained, a fresh random subset per chain
                       [0, 1]; default 1.0 (ddpo-pytorch ``train.timestep_fraction``)
    per_prompt_stat_tracking: normalise rewards with per-prompt buffers (True) or over the whole
                       batch (False); default True (ddpo-pytorch ``per_prompt_stat_tracking``)
    buffer_size:       rewards kept per prompt [count]; default 16 (ddpo-pytorch ``config/base.py``;
                       its aesthetic configs use 32)
    min_count:         rewards a prompt needs before its own statistics are used [count]; default 16
                       (``config/base.py``)
    clip_range:        PPO epsilon on the per-step ratio [ratio]; default 1e-4 (``train.clip_range``)
    adv_clip_max:      advantages are clamped to +-this [std units]; default 5 (``train.adv_clip_max``)
    beta:              weight of the KL to the reference model; default 0 (DDPO has no KL term)
    """

    group_size: int = 4
    timestep_fraction: float = 1.0
    per_prompt_stat_tracking: bool = True
    buffer_size: int = 16
    min_count: int = 16
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        check_count(self, "group_size", 1)
        check_fraction(self, "timestep_fraction")
        check_count(self, "buffer_size", 1)
        check_count(self, "min_count", 1)
        if self.per_prompt_stat_tracking and self.min_count > self.buffer_size:
            raise ValueError(f"algo.min_count ({self.min_count}) > algo.buffer_size ({self.buffer_size}): "
                             f"per-prompt statistics would never be used")
        check_ppo_settings(self)


class DDPO:
    name: ClassVar[str] = "ddpo"
    Config: ClassVar[type] = DDPOConfig
    #: the reference decodes the last sampled latent (``pipeline_with_logprob``)
    FINAL_IMAGE: ClassVar[str] = "sample"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # ddpo-pytorch config/base.py + dgx.py on SD 1.x: 50 DDIM steps, eta 1, CFG 5, full fraction
        # (its LoRA learning rate 3e-4 is left to train.lr: it depends on LoRA vs full fine-tuning).
        # Optimizer steps per epoch (num_inner_epochs = 1): samples per GPU / (train.batch_size x GA);
        # base.py: sample.batch_size 1 x num_batches_per_epoch 2 = 2 samples, train.batch_size 1, GA 1
        # -> 2; dgx.py aesthetic: 8 x 4 = 32 samples, batch 4, GA 4 -> 2 (compressibility: GA 2 -> 4)
        "ddpo-paper": {"sampler.steps": 50, "sampler.guidance": 5.0, "sampler.noise_level": 1.0,
                       "algo.timestep_fraction": 1.0, "algo.buffer_size": 16, "algo.min_count": 16,
                       "algo.clip_range": 1e-4, "train.optimizer_steps": 2},
        # the TreeGRPO paper's comparison setting (SD3.5-M re-run, as dancegrpo's and mixgrpo's
        # "treegrpo-paper"): T = 10, CFG 4.5, Flow-GRPO SDE 0.7; DDPO's trainer takes 2 optimizer steps per
        # epoch (as above); its own settings (full fraction, stat tracking) stay at ddpo-pytorch's
        "treegrpo-paper": {**PAPER_SAMPLER,
                           "sampler.sde": "flow_grpo", "algo.timestep_fraction": 1.0,
                           "train.optimizer_steps": 2},
    }

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {
        "ddpo/trained_steps": "DDPO: denoising steps trained per chain (int(T * timestep_fraction))",
        "ddpo/tracked_prompt_frac": "DDPO: fraction of this batch's prompts normalised with their own history",
        "ddpo/tracked_prompts_total": "DDPO: prompts with a statistics buffer so far",
    }
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        "timestep_fraction": {"type": "float", "low": 0.1, "high": 1.0},
        "group_size": {"type": "int", "low": 2, "high": 8},
        "per_prompt_stat_tracking": [True, False],
        "clip_range": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    }
    search_default: ClassVar[tuple[str, ...]] = ("timestep_fraction",)

    def __init__(self, config: DDPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        if int(sampler.steps * config.timestep_fraction) < 1:
            raise ValueError(f"algo.timestep_fraction={config.timestep_fraction} trains no step with "
                             f"sampler.steps={sampler.steps}")
        self.tracker = PerPromptStatTracker(config.buffer_size, config.min_count, eps=1e-6)

    def plan(self, iteration: int) -> RolloutPlan:
        T = self.sampler.steps
        return RolloutPlan(num_steps=T, modes=("sde",) * T, branch=(1,) * T,
                           trees_per_prompt=self.config.group_size, shared_noise=False,
                           noise_level=self.sampler.noise_level, sde_type=self.sampler.sde_type,
                           guidance=self.sampler.guidance,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE,
                           info={"ddpo/trained_steps": float(self._n_train())})

    def _n_train(self) -> int:
        return int(self.sampler.steps * self.config.timestep_fraction)

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        scores = rewards.scores.float()
        if self.config.per_prompt_stat_tracking:
            texts = [batch.prompts[int(p)] for p in rollout.leaf_prompts()]
            leaf = self.tracker.update(texts, scores)
            tracked = sum(1 for t in set(texts) if len(self.tracker.buffers[t]) >= self.config.min_count)
            metrics = {"ddpo/tracked_prompt_frac": tracked / max(1, len(set(texts))),
                       "ddpo/tracked_prompts_total": float(len(self.tracker.buffers))}
        else:
            std = scores.std(unbiased=False)  # numpy's population std, as scripts/train.py
            leaf = (scores - scores.mean()) / (std + 1e-8)
            metrics = {}
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf, metrics=metrics)

    def _trained_edges(self, rollout: Rollout) -> torch.Tensor:
        """Child node ids of the trained edges: chains in random order, each chain's random subset of
        steps in its random order (ddpo-pytorch ``perms``)."""
        gen = generator(self.seed, rollout.iteration, "update")
        step_edges = chain_step_edges(rollout)  # [C, T]
        C, T = step_edges.shape
        steps = random_step_subset(C, T, self._n_train(), gen)  # [C, n]
        chosen = torch.gather(step_edges, 1, steps)
        return shuffled_chain_edges(chosen, rollout, gen)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        edges = self._trained_edges(rollout)
        return config_ppo_update(self.config, self.train, policy, engine, optimizer, rollout, edges, adv.edge)

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
