"""The run spec: a resolved config turned, once, into frozen typed records.

``bench.config.resolve`` merges defaults, presets, the config file and ``--set`` into a nested dict and
validates it; ``RunSpec.from_config`` then reads that dict once (every cast happens here) and the
runner, sweeps and perf use the typed fields. ``spec.config`` keeps the resolved dict itself, which is
what manifests and checkpoints store (it is the user-facing format, see docs/RUNDIR.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bench import config as config_mod
from bench.budget import Budget, Cadence
from bench.errors import UsageError
from bench.model.policy import ModelOptions
from bench.types import SamplerSpec, TrainSpec


@dataclass(frozen=True)
class ModelSpec:
    """name: preset (bench list); path: local pipeline dir or hub id (None = the preset's source);
    device: "auto" | "cpu" | "cuda[:N]"; mixed_precision: "no" | "bf16" | "fp16"; options: how it is
    loaded and trained (LoRA, resolution, ...); prediction: "flow" | "epsilon", read from the model index
    before any weights load; distributed: "auto" | "fsdp" | "off" (bench.run.distributed)."""

    name: str
    path: str | None
    device: str
    mixed_precision: str
    options: ModelOptions
    prediction: str
    distributed: str = "auto"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelSpec":
        from bench.model.models import model_options, model_prediction

        m = cfg["model"]
        return cls(name=m["name"], path=m.get("path"), device=m["device"], mixed_precision=m["mixed_precision"],
                   options=model_options(m), prediction=model_prediction(m["name"], m.get("path")),
                   distributed=str(m.get("distributed", "auto")))


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW settings (``train.*``)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    frozen: bool = False         # train.frozen: the optimizer steps change no weight (bench.run.build.FrozenAdamW)


@dataclass(frozen=True)
class RewardSpec:
    """name: a registry name, ``module:Class`` or a weighted spec "a=1.0,b=0.5"; options: per-reward
    constructor options; normalize: "none" | "zscore" (weighted specs)."""

    name: str
    normalize: str
    options: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: rewards evaluated, when (``every``: a ``Cadence`` in iterations or a budget
    currency; amount 0 = start and end only), at start or not, first N prompts of the eval set, images per
    prompt, the noise seed (independent of the run seed, so every run of a comparison evaluates on the
    same noise), images per saved grid, and the directory caching the iteration-0 evaluation (None: off)."""

    rewards: tuple[str, ...]
    every: Cadence
    at_start: bool
    num_prompts: int
    grid: int
    images_per_prompt: int = 1
    seed: int = 0
    cache: Path | None = None    # eval.cache: the iteration-0 evaluation's cache directory (bench.run.evalcache)


@dataclass(frozen=True)
class RunOptions:
    """Run-directory and reliability settings (``run.*``)."""

    out: Path
    overwrite: bool
    progress: bool
    tensorboard: bool
    checkpoint_every: int
    keep_checkpoints: int
    on_nonfinite: str
    trace: bool                  # write every expensive call to trace.jsonl (bench.engine.trace)
    log_with: tuple[str, ...] = ()  # experiment trackers (bench.run.trackers)
    force: bool = False          # --overwrite may empty a directory that is not a treebench run
    flops: bool = True           # count FLOPs per call kind on the meta device (flops / mfu in the records)
    peak_flops: float | None = None  # peak FLOP/s per device for MFU (None: the device table, bench.engine.flops)


@dataclass(frozen=True)
class RunSpec:
    """Everything a run needs, typed. ``algo_config`` is the algorithm's own frozen ``Config``."""

    config: dict[str, Any]
    algo_name: str
    algo_config: Any
    model: ModelSpec
    sampler: SamplerSpec
    train: TrainSpec
    optimizer: OptimizerSpec
    prompts_per_iteration: int
    reward: RewardSpec
    eval: EvalSpec
    train_prompts: str
    eval_prompts: str
    run: RunOptions
    budget: Budget
    seed: int
    cost_profile: Any = None     # a bench.engine.pricing.CostProfile pricing the run's calls (run.cost_profile / run.clock)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], cost_profile: bool = True) -> "RunSpec":
        """Read a resolved config (``bench.config.resolve``). Raises ``AlgorithmSettingsError`` when the
        algorithm's Config refuses its settings and ``UsageError``/``MissingWeightsError`` when the model
        cannot be found; loads no weights. ``cost_profile=False`` leaves the run's cost profile unloaded
        (``bench plan`` prices with its own)."""
        from bench.engine import pricing as cost

        cfg = copy.deepcopy(dict(cfg))
        t, r, e, ru = cfg["train"], cfg["reward"], cfg["eval"], cfg["run"]
        model = ModelSpec.from_config(cfg)
        return cls(
            config=cfg, algo_name=cfg["algo"]["name"], algo_config=config_mod.algorithm_config(cfg), model=model,
            sampler=sampler_spec(cfg, model.prediction),
            train=TrainSpec(micro_batch=int(t["micro_batch"]), optimizer_steps=int(t["optimizer_steps"]),
                            max_grad_norm=float(t["max_grad_norm"])),
            optimizer=OptimizerSpec(lr=float(t["lr"]), beta1=float(t["beta1"]), beta2=float(t["beta2"]),
                                    eps=float(t["adam_eps"]), weight_decay=float(t["weight_decay"]),
                                    frozen=bool(t.get("frozen", False))),
            prompts_per_iteration=int(t["prompts_per_iteration"]),
            reward=RewardSpec(name=r["name"], normalize=r["normalize"], options=dict(r["options"])),
            eval=EvalSpec(rewards=tuple(e["rewards"]), every=Cadence.parse(e["every"], clock=cost.budget_clock(cfg)),
                          at_start=bool(e["at_start"]),
                          num_prompts=int(e["num_prompts"]), grid=int(e["grid"]),
                          images_per_prompt=int(e["images_per_prompt"]), seed=int(e["seed"]),
                          cache=Path(e["cache"]) if e.get("cache") is not None else None),
            train_prompts=cfg["data"]["train_prompts"], eval_prompts=cfg["data"]["eval_prompts"],
            run=RunOptions(out=out_path(cfg), overwrite=bool(ru["overwrite"]), progress=bool(ru["progress"]),
                           tensorboard=bool(ru["tensorboard"]), checkpoint_every=int(ru["checkpoint_every"]),
                           keep_checkpoints=int(ru["keep_checkpoints"]), on_nonfinite=ru["on_nonfinite"],
                           trace=bool(ru["trace"]), log_with=tuple(ru.get("log_with") or ()),
                           force=bool(ru.get("force", False)), flops=bool(ru.get("flops", True)),
                           peak_flops=float(ru["peak_flops"]) if ru.get("peak_flops") else None),
            budget=Budget.parse(str(cfg["budget"]), clock=cost.budget_clock(cfg)), seed=int(cfg["seed"]),
            cost_profile=cost.run_profile(cfg) if cost_profile else None)


def sampler_spec(cfg: Mapping[str, Any], prediction: str) -> SamplerSpec:
    """The ``sampler.*`` section as the ``SamplerSpec`` algorithms are constructed with, with the run's
    base flow schedule resolved (``resolve_schedule``)."""
    s = cfg["sampler"]
    kind, sigmas, _ = resolve_schedule(cfg, prediction)
    return SamplerSpec(steps=int(s["steps"]), guidance=float(s["guidance"]), noise_level=float(s["noise_level"]),
                       sde_type=s["sde"], shift=float(s["shift"]), prediction=prediction,
                       schedule=kind if prediction == "flow" else "scheduler", final_image=s["final_image"],
                       sigmas=sigmas or None)


def resolve_schedule(cfg: Mapping[str, Any], prediction: str
                     ) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """(kind, sigmas [T+1], timesteps [T]) of the run's base flow schedule; ("ddim", (), ()) for epsilon
    models.
    ``sampler.schedule = auto`` picks each family's reference: FLUX = "linspace" (DanceGRPO / MixGRPO),
    SD3/SD3.5 and the treebench models (SD3 transformers with a FlowMatchEuler scheduler, the TreeGRPO
    paper's setting) = "scheduler" (Flow-GRPO / TreeGRPO). Reads the model's scheduler config, no weights."""
    from bench.engine import sde
    from bench.model.models import model_scheduler

    if prediction != "flow":
        return "ddim", (), ()
    s, m = cfg["sampler"], cfg["model"]
    family, sch_cfg = model_scheduler(m["name"], m.get("path"))
    kind = s["schedule"] if s["schedule"] != "auto" else ("linspace" if family == "flux" else "scheduler")
    shift = float(s["shift"])
    if kind == "scheduler":
        model_shift = float(sch_cfg.get("shift", 1.0))
        if abs(model_shift - shift) > 1e-9:
            raise UsageError(f"sampler.shift={shift:g} but the model's scheduler config has shift {model_shift:g}; "
                             f"sampler.schedule=scheduler takes the schedule from the model (use "
                             f"sampler.schedule=linspace to choose another shift)")
    try:
        fs = sde.flow_schedule(kind, int(s["steps"]), shift, sch_cfg, int(sch_cfg.get("num_train_timesteps", 1000)))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return kind, tuple(float(v) for v in fs.sigmas), tuple(float(v) for v in fs.timesteps)


def out_path(cfg: Mapping[str, Any]) -> Path:
    """``out``, or ``runs/<algo>_<timestamp>`` when none is given."""
    out = cfg.get("out") or f"runs/{cfg['algo']['name']}_{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(out).expanduser()
