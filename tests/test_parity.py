"""Parity with the reference trainers' numerics.

Every expected number below was computed once by ``tests/parity_reference.py``, an independent numpy
transcription of the reference code (Flow-GRPO / diffusers' SD3 scheduler, DanceGRPO, MixGRPO,
TreeGRPO, ddpo-pytorch; file and function named in each function's docstring), and pasted here as a
literal. treebench produces its numbers through its own engine and algorithms: a toy denoiser
(output = A x + B t / 1000, the same on both sides) and the same fixed noises (the engine's draws are
replaced, in order, by ``parity_reference.noise``). Tolerances are float32's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from parity_reference import LATENT, MIX_MULTI_REWARDS, MODEL_A, MODEL_B, TREE_REWARDS

from algorithms.dancegrpo import DanceGRPO, DanceGRPOConfig
from algorithms.ddpo import DDPO, DDPOConfig
from algorithms.mixgrpo import MixGRPO, MixGRPOConfig
from algorithms.treegrpo import TreeGRPO, TreeGRPOConfig
from bench.engine import sde
from bench.engine.rollout import RolloutEngine
from bench.model.policy import Conditioning, ModelOptions, Policy
from bench.types import PromptBatch, RewardOutput, SamplerSpec, TrainSpec

TOL = {"rtol": 1e-5, "atol": 2e-6}
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # stabilityai/stable-diffusion-3.5-medium
BATCH = PromptBatch(("a prompt",))


class ToyPolicy:
    """The smallest object the engine drives: toy denoiser output = A x + B (t / 1000); decode = identity."""

    device = torch.device("cpu")
    latent_shape = LATENT
    family = "treebench"
    vae = None                  # pixel space: decode is the identity
    options = ModelOptions()    # no gradient checkpointing (the call trace reads it)

    def __init__(self, prediction: str = "flow"):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        self.prediction = prediction
        self.scheduler = (FlowMatchEulerDiscreteScheduler.from_config(SD35_SCHEDULER) if prediction == "flow" else
                          DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1))

    def encode_prompts(self, prompts):
        return Conditioning({"e": torch.zeros(len(prompts), 1)})

    def empty_conditioning(self):
        return self.encode_prompts([""])

    def predict(self, x, t, cond):
        return MODEL_A * x.float() + MODEL_B * (t.float().reshape(-1, 1, 1, 1) / 1000.0)

    def decode(self, latents):
        return latents.float()

    def named_trainable_parameters(self):
        return {}  # nothing to train: weight snapshots (DiffusionNFT's "old" policy) are empty

    def ddim_alpha_bars(self, num_steps):
        return Policy.ddim_alpha_bars(self, num_steps)


def close(got, expected):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64).ravel(), np.asarray(expected, dtype=np.float64),
                               **TOL)


# ---- schedules ----------------------------------------------------------------------------------
SD3_T10 = [1.00000000, 0.96012931, 0.91334895, 0.85769231, 0.79036827, 0.70727848, 0.60215054, 0.46487603,
           0.27804878, 0.00892857, 0.00000000]
SD3_T28 = [1.00000000, 0.98738063, 0.97410777, 0.96012931, 0.94538745, 0.92981791, 0.91334895, 0.89590032,
           0.87738194, 0.85769231, 0.83671668, 0.81432482, 0.79036827, 0.76467710, 0.73705584, 0.70727848,
           0.67508233, 0.64016018, 0.60215054, 0.56062500, 0.51507208, 0.46487603, 0.40928882, 0.34739264,
           0.27804878, 0.19982699, 0.11090573, 0.00892857, 0.00000000]
FLUX_T16 = [1.00000000, 0.97826087, 0.95454544, 0.92857140, 0.89999998, 0.86842108, 0.83333331, 0.79411763,
            0.75000000, 0.69999999, 0.64285713, 0.57692307, 0.50000000, 0.40909091, 0.30000001, 0.16666667,
            0.00000000]
FLUX_T16_TIMESTEPS = [1000, 978, 954, 928, 900, 868, 833, 794, 750, 700, 642, 576, 500, 409, 300, 166]


@pytest.mark.parametrize("T,expected", [(10, SD3_T10), (28, SD3_T28)])
def test_sd3_schedule_is_the_pipeline_schedulers(T, expected):
    fs = sde.flow_schedule("scheduler", T, 3.0, SD35_SCHEDULER)
    close(fs.sigmas, expected)
    close(fs.timesteps, np.asarray(expected[:-1]) * 1000)  # the SD3 pipeline feeds sigma * 1000, unquantised
    eng = RolloutEngine(ToyPolicy(), schedule="scheduler")  # the engine takes it from the model's scheduler
    close(eng.schedule(_chain_plan(T)).levels, expected)


def test_flux_schedule_and_quantised_timesteps():
    fs = sde.flow_schedule("linspace", 16, 3.0)
    close(fs.sigmas, FLUX_T16)
    assert fs.timesteps.tolist() == [float(t) for t in FLUX_T16_TIMESTEPS]  # exactly int(1000 sigma)


def _chain_plan(T):
    from bench.types import RolloutPlan

    return RolloutPlan(num_steps=T, modes=("ode",) * T, branch=(1,) * T)


# ---- DanceGRPO: decoded latent = x0-prediction of the last evaluation ----------------------------------
DANCE_DECODED = [-1.36221386, 0.46810577, -2.58711177, -0.20774228, -1.94995813, 0.42941133, -2.53735601,
                 -0.31676098]
DANCE_LAST_SAMPLE = [-1.49873972, 0.57914614, -2.81784461, -0.20573324, -1.60392441, 0.28693800, -2.30274177,
                     -0.56636688]
DANCE_LOGP = [0.84632668, 0.64859431, 0.60818142, 0.26160785, 0.91132667, 0.94359433, 0.45318141, 0.08160785]


def test_dancegrpo_trajectory_decodes_the_last_x0_prediction(fixed_noise):
    sp = SamplerSpec(steps=4, guidance=1.0, noise_level=0.3, sde_type="dance", shift=3.0, schedule="linspace")
    algo = DanceGRPO(DanceGRPOConfig(group_size=2, timestep_fraction=1.0), sp, TrainSpec())
    plan = algo.plan(0)
    assert plan.final_image == "x0"
    roll = RolloutEngine(ToyPolicy(), schedule="linspace", shift=3.0).run(plan, BATCH, 0)
    close(roll.images, DANCE_DECODED)
    close(roll.latents[roll.leaves], DANCE_LAST_SAMPLE)  # the sampled last latent is kept for training
    logp = torch.stack([roll.logp_old[roll.level == i + 1] for i in range(4)], dim=1)
    close(logp, DANCE_LOGP)


# ---- MixGRPO-Flash: the post-window DPM-Solver++(2M) solve ----------------------------------------------
FLASH_SCHEDULE = [1.00000000, 0.95454544, 0.90000000, 0.64285714, 0.00000000]
FLASH_FINAL = [1.36225628, -1.94962350, -0.39168988, 1.41955647, -1.25106871, 0.56017751, -3.00501478,
               1.08752616]


def test_mixgrpo_flash_post_window_solve(fixed_noise):
    sp = SamplerSpec(steps=8, guidance=1.0, noise_level=0.7, shift=3.0, schedule="linspace")
    cfg = MixGRPOConfig(group_size=2, window=2, flash=True, compress_ratio=0.5)
    plan = MixGRPO(cfg, sp, TrainSpec()).plan(0)
    assert plan.modes == ("sde", "sde", "dpm2", "dpm2") and plan.final_image == "sample"
    close(plan.sigmas, FLASH_SCHEDULE)
    roll = RolloutEngine(ToyPolicy(), schedule="linspace", shift=3.0).run(plan, BATCH, 0)
    close(roll.images, FLASH_FINAL)


# ---- MixGRPO multi-reward: per-model group advantages, merged with the normalised weights ----------------
MIX_ADV_AGGR = {(1.0, 1.0, 1.0): [-0.22044899, -0.21271057, -0.40511880, 0.83827836, -0.61921489, 0.35279822,
                                  0.85317345, -0.58675679],
                (2.0, 1.0, 1.0): [-0.30627031, -0.07497279, -0.55751952, 0.93876262, -0.53941113, 0.28959866,
                                  0.96487996, -0.71506748]}


@pytest.mark.parametrize("weights", sorted(MIX_ADV_AGGR))
def test_mixgrpo_advantage_aggr_is_the_released_merge(weights):
    sp = SamplerSpec(steps=3, guidance=1.0, noise_level=0.7)
    algo = MixGRPO(MixGRPOConfig(group_size=4, window=1, multi_reward="advantage_aggr"), sp, TrainSpec())
    roll = RolloutEngine(ToyPolicy()).run(algo.plan(0), PromptBatch(("p0", "p1")), 0)
    assert roll.leaf_prompts().tolist() == [0] * 4 + [1] * 4  # the trainer's contiguous groups
    comps = {k: torch.tensor(v) for k, v in MIX_MULTI_REWARDS.items()}
    w = dict(zip(("hpsv2", "image_reward", "pickscore"), weights))
    total = sum(c * w[k] for k, c in comps.items())
    adv = algo.advantages(PromptBatch(("p0", "p1")), roll, RewardOutput(total, comps, w))
    close(adv.leaf, MIX_ADV_AGGR[weights])
    # the preset that runs the released multi-reward setting uses it
    preset = MixGRPO.PRESETS["mixgrpo-multireward"]
    assert preset["algo.multi_reward"] == "advantage_aggr"
    assert preset["reward.name"] == "hpsv2=1.0,image_reward=1.0,pickscore=1.0"


# ---- TreeGRPO: backup over a k = 3, d = 2 tree; the step-std clamp --------------------------------------
TREE_MID = [0.12909944, -0.90369608, 0.77459664]
TREE_LEAF = [-1.16189496, 0.00000000, 1.54919328, -1.54919328, -0.38729832, -0.77459664, 1.16189496, 0.38729832,
             0.77459664]


def test_treegrpo_backup_k3_d2():
    sp = SamplerSpec(steps=3, guidance=1.0, noise_level=0.7)
    algo = TreeGRPO(TreeGRPOConfig(k=3, d=2), sp, TrainSpec())  # default weighting: the code's uniform mean
    plan = algo.plan(0)
    assert plan.branch == (3, 3, 1)
    roll = RolloutEngine(ToyPolicy(), seed=0).run(plan, BATCH, 0)
    adv = algo.advantages(BATCH, roll, RewardOutput(torch.tensor(TREE_REWARDS)))
    close(adv.leaf, TREE_LEAF)
    close(adv.edge[roll.level == 1], TREE_MID)
    # a leaf's incoming edge (through the final ODE link) carries the leaf's own advantage
    close(adv.edge[roll.leaves], TREE_LEAF)


TREE_CLAMPED_LOGP, TREE_FREE_LOGP = [3.93775153, 3.88202731], [3.98667780, 3.92249125]


def test_treegrpo_step_std_clamp_at_the_last_sd3_sigma():
    from parity_reference import treegrpo_clamped_step

    _, _, x, v, prev = treegrpo_clamped_step()  # inputs only; the expected numbers are the literals above
    sig = sde.flow_schedule("scheduler", 10, 3.0, SD35_SCHEDULER).sigmas
    args = (torch.tensor(v, dtype=torch.float32), torch.tensor(x, dtype=torch.float32), sig[9], sig[10], 0.7)
    prev_t = torch.tensor(prev, dtype=torch.float32)
    clamped = sde.flow_sde_step(*args, prev_sample=prev_t, log_std_range=(-5.0, 2.0))
    free = sde.flow_sde_step(*args, prev_sample=prev_t)
    close(clamped.log_prob, TREE_CLAMPED_LOGP)
    close(free.log_prob, TREE_FREE_LOGP)
    assert math.isclose(float(clamped.std[0]), math.exp(-5), rel_tol=1e-6)
    assert TreeGRPO(TreeGRPOConfig(), SamplerSpec(steps=10, guidance=1.0, noise_level=0.7),
                    TrainSpec()).plan(0).log_std_range == (-5.0, 2.0)


# ---- DDPO: DDIM eta = 1 log-probs on the SD 1.x scheduler ------------------------------------------------
DDPO_LOGP = [-1.31066188, -1.07880684, -0.45330313, 1.90105466, 2.37618278, -1.24566190, -0.78380681,
             -0.60830312, 1.72105465, 2.42618281]
DDPO_FINAL = [-9.33985424, 1.62121364, -22.84296670, -6.40493785, 17.57709895, -19.97825441, 6.14565275,
              -18.31852682]


def test_ddpo_ddim_logprobs(fixed_noise):
    sp = SamplerSpec(steps=5, guidance=1.0, noise_level=1.0, prediction="epsilon")
    algo = DDPO(DDPOConfig(group_size=2), sp, TrainSpec())
    plan = algo.plan(0)
    eng = RolloutEngine(ToyPolicy("epsilon"))
    roll = eng.run(plan, BATCH, 0)
    logp = torch.stack([roll.logp_old[roll.level == i + 1] for i in range(5)], dim=1)
    close(logp, DDPO_LOGP)
    close(roll.images, DDPO_FINAL)  # DDPO decodes the sampled last latent
    # recomputing through the engine's update path gives the stored numbers back
    nodes = torch.nonzero(roll.parent >= 0).flatten()
    close(eng.logp(roll, nodes).log_prob.detach(), roll.logp_old[nodes])


# ---- the run's manifest records the schedule the model's own scheduler gives -----------------------------
def test_sd35_run_manifest_sigmas_equal_the_diffusers_scheduler(tmp_path):
    """`bench run --model sd3.5-medium-random-reduced --preset treegrpo-paper --budget 1it` (one prompt,
    no evaluation, to keep it small) writes the sigmas of the SD3.5 config's own scheduler."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from bench import config
    from bench.model.random_models import random_preset_spec
    from bench.run import runner

    cfg = config.resolve({"train.prompts_per_iteration": 1, "eval.every": 0, "eval.at_start": False,
                          "eval.num_prompts": 1, "run.progress": False},
                         preset="treegrpo-paper",
                         flags={"algo.name": "treegrpo", "model.name": "sd3.5-medium-random-reduced",
                                "budget": "1it", "out": str(tmp_path / "run")})
    runner.run(cfg)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    sch = FlowMatchEulerDiscreteScheduler.from_config(
        random_preset_spec("sd3.5-medium-random")["components"]["scheduler"]["config"])
    sch.set_timesteps(10)
    assert man["schedule"]["kind"] == "scheduler"
    assert man["schedule"]["sigmas"] == [float(s) for s in sch.sigmas]
    close(man["schedule"]["timesteps"], sch.timesteps.numpy())
    close(man["schedule"]["sigmas"], SD3_T10)


def test_schedule_choice_per_family_and_usage_errors():
    from bench import config
    from bench.errors import UsageError
    from bench.model.models import model_prediction
    from bench.spec import resolve_schedule

    def resolve(model, **sets):
        cfg = config.resolve(sets, flags={"algo.name": "grpo", "model.name": model})
        return resolve_schedule(cfg, model_prediction(model, None))

    kind, sig, ts = resolve("flux.1-dev-random-reduced", **{"sampler.steps": 16})
    assert kind == "linspace" and ts[:3] == (1000.0, 978.0, 954.0)  # FLUX: DanceGRPO/MixGRPO's schedule
    close(sig, FLUX_T16)
    assert resolve("sd3.5-medium-random-reduced")[0] == "scheduler"
    assert resolve("shapes")[0] == "scheduler"  # the shapes world samples like SD3 (see docs)
    assert resolve("shapes", **{"sampler.schedule": "linspace", "sampler.shift": 3.0})[0] == "linspace"
    assert resolve("sd1.5-random-reduced")[0] == "ddim"
    with pytest.raises(UsageError, match="shift"):
        resolve("shapes", **{"sampler.shift": 3.0})  # the scheduler schedule takes the model's shift
    with pytest.raises(UsageError, match="sampler.schedule"):
        config.resolve({"sampler.schedule": "karras"}, flags={"algo.name": "grpo"})
    with pytest.raises(UsageError, match="sampler.final_image"):
        config.resolve({"sampler.final_image": "noisy"}, flags={"algo.name": "grpo"})
