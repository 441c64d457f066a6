"""MixGRPO: mixed ODE-SDE sampling with a sliding SDE window (and MixGRPO-Flash).

Li et al., "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE", arXiv 2507.21802;
reference code Tencent-Hunyuan/MixGRPO (read for the behaviour only: ``fastvideo/train_grpo_flux.py``,
``fastvideo/utils/sampling_utils.py::run_sample_step``, ``fastvideo/utils/grpo_states.py``).

Implementation details:
- Sampling (``plan``): SDE steps only inside the current window of ``window`` consecutive steps,
  deterministic Euler (ODE) before and after it (``training_strategy="part"``). The SDE is
  ``sampler.sde`` (Flow-GRPO's by default, which is also what the released scripts use,
  ``--flow_grpo_sampling``). The ``group_size`` chains of a prompt share one initial noise
  (``--init_same_noise``).
- Final image (``sampler.final_image``, default "sample"): the released scripts leave
  ``--drop_last_sample`` off ("True for DanceGRPO but False for MixGRPO"), so ``run_sample_step`` returns
  the last sampled latent; its last step is an ODE (or DPM-Solver++) step to sigma = 0, whose result is
  the last evaluation's x0-prediction anyway.
- Window schedule (``_window``; ``algorithms.common.progressive_window_start``): "progressive" starts
  at step 0 (noisiest first) and moves by ``window_stride`` every ``shift_interval`` iterations, and
  rolls back to 0 past the end (``--roll_back``); "random" draws a start per iteration. As in the
  reference, the window is clipped to end before step T - 2 (``max_timesteps = T - 2``, so the
  last windows shrink) and the last step is never trained. Positions whose clipped window would be
  empty are skipped (the reference only reaches them for T smaller than its 25 steps). The schedule
  is a pure function of the iteration; its position is reported in ``state_dict`` and logged as
  ``mixgrpo/window_start``.
- MixGRPO-Flash (``flash = True``, preset ``mixgrpo-flash``; ``_flash_sigmas``): up to the end of the
  window the schedule is unchanged; after it the remaining schedule is replaced by a compressed one
  of ``num_post = int((T - last) * compress_ratio)`` sigmas (``linspace(u, 0, num_post)`` time-shifted,
  u = the unshifted time of sigma[last + 1]: ``linspace(1, 0, T + 1)[last + 1]`` in the reference's
  FLUX schedule, the inverse time shift of the base sigma for any other base schedule; at least 2
  sigmas so it ends at sigma = 0) integrated with deterministic 2nd-order
  multistep DPM-Solver++ (plan mode "dpm2", ``bench.engine.sde.flow_dpm2_step``). Sampling only: trained
  steps are window steps, whose sigmas equal the uncompressed schedule's.
- Advantages (``advantages``): per-prompt group normalisation with torch's unbiased std + 1e-8;
  ``multi_reward = "advantage_aggr"`` normalises every part of a weighted reward (``--reward
  hpsv2=1,image_reward=1,pickscore=1``) separately and sums them with the user's weights normalised to
  sum 1 (``train_grpo_flux.py``: ``reward_weights`` divided by their total, ``merged_advantages +=
  model_advs * reward_weights[model_name]``; ``algorithms.common.weighted_advantage_sum``); the default
  "reward_aggr" normalises the combined (weighted-sum) reward.
- Loss (``update`` -> ``algorithms.common.ppo_update``): every window step of every chain, steps in
  order, chains in random order (``timestep_fraction`` is unused in "part" mode, as in the code);
  PPO clipped surrogate with stored log-probs, advantages clamped to +-5, clip range 1e-4, mean over
  the terms (the reference divides by gradient accumulation x window length). No KL (``beta`` = 0).
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
    check_ppo_settings,
    config_ppo_update,
    group_normalize,
    progressive_window_start,
    weighted_advantage_sum,
)
from bench.engine import sde
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

SAMPLE_STRATEGIES = ("progressive", "random")
MULTI_REWARD = ("reward_aggr", "advantage_aggr")


@dataclass(frozen=True)
class MixGRPOConfig:
    """MixGRPO settings (``algo.<field>``).

    group_size:      chains (images) per prompt [count]; default 12 (``--num_generations 12``)
    window:          SDE window size w [steps]; default 4 (``--group_size 4`` in the MixGRPO scripts)
    window_stride:   steps the window moves at each shift [steps]; default 1 (``--prog_overlap_step 1``;
                     0 freezes the window, the "Flash*" setting)
    shift_interval:  iterations between window shifts [iterations]; default 25 (``--iters_per_group 25``;
                     20 for Flash)
    sample_strategy: "progressive" (sliding window) or "random" (uniform start each iteration);
                     default "progressive" (``--sample_strategy progressive``)
    roll_back:       restart the progressive window at step 0 after the last position; default True
                     (``--roll_back``)
    flash:           MixGRPO-Flash: 2nd-order DPM-Solver++ on a compressed post-window schedule;
                     default False (``--dpm_algorithm_type null``)
    compress_ratio:  Flash: fraction of the post-window steps kept [0, 1]; default 0.4
                     (``--dpm_post_compress_ratio 0.4``; 0.2 in the Flash* script)
    shared_noise:    the group's chains start from one initial noise; default True (``--init_same_noise``)
    multi_reward:    "reward_aggr" (normalise the combined reward) or "advantage_aggr" (normalise each
                     part of a weighted reward, sum with the parts' weights normalised to 1); default
                     "reward_aggr" (the MixGRPO scripts use advantage_aggr over HPS/ImageReward/PickScore,
                     weights 1 each: preset "mixgrpo-multireward")
    clip_range:      PPO epsilon [ratio]; default 1e-4 (``--clip_range``)
    adv_clip_max:    advantage clamp [std units]; default 5 (``--adv_clip_max``)
    std_eps:         added to the group std; default 1e-8
    beta:            weight of treebench's KL to the frozen reference model (Flow-GRPO's form); default 0.
                     Not MixGRPO's ``--kl_coeff``: that weighs 0.5 mean((logp_new - logp_old)^2), a
                     penalty on the drift from the rollout policy (0.0 in the released scripts, so both
                     are off by default)
    """

    group_size: int = 12
    window: int = 4
    window_stride: int = 1
    shift_interval: int = 25
    sample_strategy: str = "progressive"
    roll_back: bool = True
    flash: bool = False
    compress_ratio: float = 0.4
    shared_noise: bool = True
    multi_reward: str = "reward_aggr"
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    std_eps: float = 1e-8
    beta: float = 0.0

    def __post_init__(self) -> None:
        check_count(self, "group_size", 2, "for group-relative advantages")
        check_count(self, "window", 1)
        check_count(self, "window_stride", 0)
        check_count(self, "shift_interval", 1)
        if self.sample_strategy not in SAMPLE_STRATEGIES:
            raise ValueError(f"algo.sample_strategy must be one of {', '.join(SAMPLE_STRATEGIES)}, "
                             f"got {self.sample_strategy!r}")
        check_fraction(self, "compress_ratio")
        if self.multi_reward not in MULTI_REWARD:
            raise ValueError(f"algo.multi_reward must be one of {', '.join(MULTI_REWARD)}, "
                             f"got {self.multi_reward!r}")
        check_ppo_settings(self)


# the window is a pure function of the iteration (``plan`` keeps no state): nothing to restore on resume
class MixGRPO(ConfigState):
    name: ClassVar[str] = "mixgrpo"
    Config: ClassVar[type] = MixGRPOConfig
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # finetune_flux_grpo_MixGRPO.sh (FLUX.1-dev): T = 25, Flow-GRPO SDE 0.7, shift 3 on FLUX's shifted
        # linspace schedule, G = 12, w = 4, stride 1 every 25 iterations, roll back.
        # Optimizer steps: per rank train_batch_size 1 prompt x num_generations 12 = 12 samples per
        # iteration, a step every gradient_accumulation_steps = 3 samples -> 12 / 3 = 4 (all MixGRPO scripts)
        "mixgrpo-paper": {"sampler.steps": 25, "sampler.noise_level": 0.7, "sampler.sde": "flow_grpo",
                          "sampler.shift": 3.0, "sampler.schedule": "linspace", "algo.group_size": 12,
                          "algo.window": 4, "algo.window_stride": 1, "algo.shift_interval": 25,
                          "algo.flash": False, "train.optimizer_steps": 4},
        # finetune_flux_grpo_MixGRPO.sh's reward: --reward_model multi_reward (HPS, ImageReward, PickScore;
        # UnifiedReward only with a server URL, None in the script), weights 1 each, --multi_reward_mix
        # advantage_aggr: each model's rewards normalised per group, the advantages merged with the weights
        # normalised to sum 1
        "mixgrpo-multireward": {"sampler.steps": 25, "sampler.noise_level": 0.7, "sampler.sde": "flow_grpo",
                                "sampler.shift": 3.0, "sampler.schedule": "linspace", "algo.group_size": 12,
                                "algo.window": 4, "algo.window_stride": 1, "algo.shift_interval": 25,
                                "algo.flash": False, "train.optimizer_steps": 4,
                                "reward.name": "hpsv2=1.0,image_reward=1.0,pickscore=1.0",
                                "algo.multi_reward": "advantage_aggr"},
        # MixGRPO-Flash: DPM-Solver++(2M) on the post-window schedule compressed to 0.4, shift every 20
        "mixgrpo-flash": {"sampler.steps": 25, "sampler.noise_level": 0.7, "sampler.sde": "flow_grpo",
                          "sampler.shift": 3.0, "sampler.schedule": "linspace", "algo.group_size": 12,
                          "algo.window": 4, "algo.window_stride": 1, "algo.shift_interval": 20,
                          "algo.flash": True, "algo.compress_ratio": 0.4, "train.optimizer_steps": 4},
        # MixGRPO-Flash*: frozen window [0, 4), compression 0.2
        "mixgrpo-flash-frozen": {"sampler.steps": 25, "sampler.noise_level": 0.7, "sampler.sde": "flow_grpo",
                                 "sampler.shift": 3.0, "sampler.schedule": "linspace", "algo.group_size": 12,
                                 "algo.window": 4, "algo.window_stride": 0, "algo.flash": True,
                                 "algo.compress_ratio": 0.2, "train.optimizer_steps": 4},
        # the TreeGRPO paper's comparison setting (SD3.5-M re-run): T = 10, CFG 4.5, Flow-GRPO SDE 0.7;
        # MixGRPO's trainer takes 4 optimizer steps per iteration (12 samples, GA 3, as above)
        "treegrpo-paper": {**PAPER_SAMPLER,
                           "sampler.sde": "flow_grpo", "train.optimizer_steps": 4},
    }
    #: the released scripts decode the last sampled latent (``--drop_last_sample`` off)
    FINAL_IMAGE: ClassVar[str] = "sample"

    #: keys this algorithm adds to iterations.jsonl, with their meaning (the run log's glossary)
    log_keys: ClassVar[dict[str, str]] = {
        "mixgrpo/window_start": "MixGRPO: first step of the SDE window",
        "mixgrpo/window_size": "MixGRPO: SDE steps in the window this iteration (shrinks near the end)",
        "mixgrpo/sampling_steps": "MixGRPO: denoising steps actually sampled (fewer with Flash's compressed schedule)",
    }
    #: sweep search space over its own settings (the space-file format of docs/SWEEPS.md) and the
    #: parameters ``bench sweep`` varies when ``--space`` is not given
    search_space: ClassVar[dict[str, Any]] = {
        # the window ends before step T - 2 (MixGRPO's max_timesteps), so longer windows are clipped
        "window": {"type": "int", "low": 1, "high": "sampler.steps - 2", "help": "SDE window size"},
        "window_stride": {"type": "int", "low": 0, "high": 2, "help": "steps per window shift"},
        "shift_interval": {"type": "int", "low": 5, "high": 50, "step": 5, "help": "iterations between shifts"},
        "sample_strategy": ["progressive", "random"],
        "group_size": {"type": "int", "low": 4, "high": 16, "step": 4},
        "flash": [False, True],
    }
    search_default: ClassVar[tuple[str, ...]] = ("window", "window_stride", "shift_interval")

    def __init__(self, config: MixGRPOConfig, sampler: SamplerSpec, train: TrainSpec, seed: int = 0):
        self.config, self.sampler, self.train, self.seed = config, sampler, train, int(seed)
        T = sampler.steps
        if T < 3:
            raise ValueError(f"MixGRPO needs sampler.steps >= 3 (its window ends before step T - 2), got {T}")
        if config.window > T:
            raise ValueError(f"algo.window={config.window} > sampler.steps={T}")
        if config.flash and sampler.prediction != "flow":
            raise ValueError("algo.flash (DPM-Solver++ post-window steps) needs a flow-matching model; "
                             f"this model predicts {sampler.prediction!r}")

    # ---- window ----
    def _max_end(self) -> int:
        return self.sampler.steps - 2  # MixGRPO's max_timesteps: the window ends before step T - 2

    def _window(self, iteration: int) -> tuple[int, int]:
        """(start, end) of the SDE window at ``iteration``, end exclusive."""
        c = self.config
        max_end = self._max_end()
        if c.sample_strategy == "progressive":
            start = progressive_window_start(iteration, c.shift_interval, c.window_stride, max_end - 1,
                                             c.roll_back)
        else:  # a full window at a uniformly random position
            hi = max(0, max_end - c.window)
            start = int(torch.randint(0, hi + 1, (1,), generator=generator(self.seed, iteration, "plan")))
        return start, min(start + c.window, max_end)

    def _base_sigmas(self) -> torch.Tensor:
        """The run's base schedule [T+1] (resolved by the runner; rebuilt from schedule/shift otherwise)."""
        sp = self.sampler
        if sp.sigmas is not None:
            return torch.tensor(sp.sigmas, dtype=torch.float32)
        return sde.flow_schedule(sp.schedule, sp.steps, sp.shift, {"shift": sp.shift}).sigmas

    def _flash_sigmas(self, last: int) -> tuple[float, ...]:
        """MixGRPO-Flash schedule (``run_sample_step`` with ``dpm_apply_strategy="post"``): the base
        schedule up to sigma index ``last`` (the window's last step), then ``num_post`` sigmas
        time_shift(linspace(u, 0, num_post)) with u the unshifted time of base sigma ``last`` + 1."""
        T, shift = self.sampler.steps, self.sampler.shift
        full = self._base_sigmas()
        if self.sampler.schedule == "linspace":  # the reference's own linspace(1, 0, T + 1)[last + 1]
            u = float(torch.linspace(1.0, 0.0, T + 1, dtype=torch.float32)[last + 1])
        else:
            u = float(sde.inverse_time_shift(full[last + 1].double(), shift))
        num_post = max(int((T - last) * float(self.config.compress_ratio)), 2)
        post = sde.time_shift(torch.linspace(u, 0.0, num_post, dtype=torch.float32), shift)
        return tuple(float(s) for s in torch.cat([full[:last + 1], post]))

    def plan(self, iteration: int) -> RolloutPlan:
        c, T = self.config, self.sampler.steps
        start, end = self._window(iteration)
        sigmas = None
        if c.flash:
            sigmas = self._flash_sigmas(end - 1)
            n = len(sigmas) - 1
            modes = tuple("ode" if i < start else "sde" if i < end else "dpm2" for i in range(n))
        else:
            n = T
            modes = tuple("sde" if start <= i < end else "ode" for i in range(n))
        return RolloutPlan(num_steps=n, modes=modes, branch=(1,) * n, trees_per_prompt=c.group_size,
                           shared_noise=c.shared_noise, noise_level=self.sampler.noise_level,
                           sde_type=self.sampler.sde_type, guidance=self.sampler.guidance, sigmas=sigmas,
                           final_image=self.sampler.final_image or self.FINAL_IMAGE,
                           info={"mixgrpo/window_start": float(start),
                                 "mixgrpo/window_size": float(end - start),
                                 "mixgrpo/sampling_steps": float(n)})

    # ---- advantages and update ----
    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        groups = rollout.leaf_prompts()

        def norm(r: torch.Tensor) -> torch.Tensor:
            return group_normalize(r, groups, unbiased=True, eps=self.config.std_eps)

        if self.config.multi_reward == "advantage_aggr":
            if not rewards.weights:
                raise ValueError("algo.multi_reward=advantage_aggr needs a weighted reward whose parts carry "
                                 "weights (e.g. --reward hpsv2=1.0,pickscore=1.0)")
            # one advantage per reward model (the weighted reward's parts; "<part>/<sub>" diagnostics carry
            # no weight and get no vote), summed with the user's weights normalised to sum 1
            per = {k: norm(rewards.components[k]) for k in rewards.weights}
            leaf = weighted_advantage_sum(per, dict(rewards.weights))
        else:
            leaf = norm(rewards.scores)
        return Advantages(edge=chain_edge_advantages(rollout, leaf), leaf=leaf)

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        # the window steps are the plan's only SDE (trainable) steps: train all of them, in step order,
        # chains in random order
        step_edges = chain_step_edges(rollout)  # [C, T]
        gen = generator(self.seed, rollout.iteration, "update")
        edges = step_edges[torch.randperm(step_edges.shape[0], generator=gen)].flatten()
        edges = edges[(edges >= 0) & rollout.trainable[edges.clamp_min(0)]]
        return config_ppo_update(self.config, self.train, policy, engine, optimizer, rollout, edges, adv.edge)

