"""One table of lazy import strings for every plug-in (lm-eval style).

``bench`` never imports ``algorithms``, ``rewards``, ``sweeps`` or ``reports`` directly: it names them
here and imports them on first use, so ``bench --help`` and ``bench list`` stay fast and the layering
test can check the import graph. Unknown names raise ``UsageError`` with a did-you-mean.

Outside packages add algorithms and rewards without editing treebench (docs/PLUGINS.md): a
``module:Class`` spec wherever a name is accepted (``--algo mypkg.algo:MyAlgo``), or an entry point in
the groups ``treebench.algorithms`` / ``treebench.rewards`` of an installed package, which adds the
name to ``bench list``. A built-in name wins over an entry point of the same name.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from bench.errors import UsageError


def suggestions(name: str, valid: list[str] | tuple[str, ...] | Any) -> str:
    """"Did you mean 'x'? Valid: a, b, c." (the did-you-mean part only when something is close)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}Valid: {', '.join(valid)}."


def did_you_mean(name: str, valid: list[str] | tuple[str, ...] | Any, what: str) -> str:
    return f"unknown {what} {name!r}. {suggestions(name, valid)}"


@dataclass(frozen=True)
class Entry:
    target: str  # "module:attribute"
    description: str
    #: Python modules the plug-in needs beyond the core install, checked before it is imported (a reward
    #: whose package is missing is refused with the install command; ``bench rewards check`` lists them)
    requires: tuple[str, ...] = ()
    #: An algorithm's fixed colour on every report page (reports.plots; a plug-in without one gets a stable
    #: colour from its name). The order of ``ALGORITHMS`` is the order of reports' tables and legends.
    color: str | None = None


ALGORITHMS: dict[str, Entry] = {  # in report order (reports.load.order_labels)
    "ddpo": Entry("algorithms.ddpo:DDPO",
                  "DDPO (Black et al. 2023): i.i.d. chains, per-prompt reward statistics, PPO-clip",
                  color="#1f77b4"),
    "dancegrpo": Entry("algorithms.dancegrpo:DanceGRPO",
                       "DanceGRPO (arXiv 2505.07818): all-SDE groups with shared noise, random trained steps",
                       color="#ff7f0e"),
    "mixgrpo": Entry("algorithms.mixgrpo:MixGRPO",
                     "MixGRPO (arXiv 2507.21802): SDE sliding window, ODE elsewhere; Flash variant option",
                     color="#2ca02c"),
    "treegrpo": Entry("algorithms.treegrpo:TreeGRPO",
                      "TreeGRPO (arXiv 2512.08153): shared-prefix trees, k-ary SDE branching, per-edge advantages",
                      color="#d62728"),
    "flowgrpo": Entry("algorithms.flowgrpo:FlowGRPO",
                      "Flow-GRPO (arXiv 2505.05470): all-SDE groups, KL to the reference; Fast variant: SDE window",
                      color="#8c564b"),
    "branchgrpo": Entry("algorithms.branchgrpo:BranchGRPO",
                        "BranchGRPO (arXiv 2509.06040): binary-split trees, depth-wise advantages, pruning",
                        color="#e377c2"),
    "diffusionnft": Entry("algorithms.diffusionnft:DiffusionNFT",
                          "DiffusionNFT (arXiv 2509.16117): likelihood-free; flow-matching loss on forward-noised "
                          "samples, implicit positive/negative policies, EMA old policy",
                          color="#17becf"),
    "awm": Entry("algorithms.awm:AWM",
                 "AWM (arXiv 2509.25050): likelihood-free; advantage-weighted flow-matching loss on the clean "
                 "samples, KL to the reference and to an EMA policy",
                 color="#bcbd22"),
    "refl": Entry("algorithms.refl:ReFL",
                  "ReFL (arXiv 2304.05977) / DRaFT-K (arXiv 2309.17400): direct gradient of a differentiable reward "
                  "through the last K denoising steps",
                  color="#393b79"),
    "flowdppo": Entry("algorithms.flowdppo:FlowDPPO",
                      "Flow-DPPO (arXiv 2606.11025): Flow-GRPO sampler, a KL trust-region mask in place of "
                      "ratio clipping",
                      color="#637939"),
    "grpo": Entry("algorithms.grpo:GRPO",
                  "Minimal chain GRPO (all steps SDE, group-normalised leaf advantage); harness smoke tests",
                  color="#9467bd"),
}

REWARDS: dict[str, Entry] = {
    "shapes_pref": Entry("rewards.shapes_pref:ShapesPref",
                         "Learned CLIP-style scorer of the shapes world (stand-in for HPS/CLIPScore)"),
    "shapes_attr": Entry("rewards.shapes_attr:ShapesAttr",
                         "Exact procedural checker of the shapes world: colour, shape, size, position in [0, 1]"),
    "brightness": Entry("rewards.toy:Brightness", "Toy: mean pixel brightness in [0, 1]"),
    "jpeg_compressibility": Entry("rewards.toy:JpegCompressibility",
                                  "Toy (DDPO): negative JPEG size in kB at quality 95"),
    "hpsv2": Entry("rewards.hpsv2:HPSv2", "HPSv2 / HPSv2.1 human preference score (open_clip ViT-H-14)",
                   requires=("hpsv2", "clint", "torchvision", "ftfy", "regex")),
    "image_reward": Entry("rewards.image_reward:ImageRewardScorer", "ImageReward 1.5 (BLIP + MLP head)",
                          requires=("ImageReward", "timm", "fairscale", "torchvision")),
    "clip_score": Entry("rewards.clip_score:ClipScore", "CLIPScore: cosine image-text similarity (open_clip)",
                        requires=("open_clip", "timm", "torchvision", "ftfy", "regex")),
    "pickscore": Entry("rewards.pickscore:PickScore", "PickScore (CLIP-H fine-tuned on Pick-a-Pic)",
                       requires=("transformers",)),
    "aesthetic": Entry("rewards.aesthetic:Aesthetic", "LAION aesthetic predictor (MLP on CLIP ViT-L/14)",
                       requires=("transformers",)),
}

#: Reward that combines several ("a=1.0,b=0.5" specs); named by string to keep the layering.
WEIGHTED_REWARD = "rewards.combine:WeightedSum"


@dataclass(frozen=True)
class ModelPreset:
    """A named model: where its weights come from and the sampling defaults of its papers.

    source:  "package:<dir under bench/>" for shipped weights, "tiny-random" for an in-process random
             model, "random:<spec>" for a real architecture with random weights built from
             bench/presets/<spec>.json, or "path" for a local diffusers directory given by --model-path /
             model.path
    """

    source: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


# Sampling/training defaults of the real models, from the papers' experimental settings (TreeGRPO arXiv
# 2512.08153 and Flow-GRPO arXiv 2505.05470; MixGRPO arXiv 2507.21802; DDPO arXiv 2305.13301):
# SD3.5: TreeGRPO / Flow-GRPO (512 px, T=10, CFG 4.5, noise 0.7, scheduler shift 3, LoRA r32/alpha 64, lr 3e-4);
# FLUX.1-dev: MixGRPO (720 px, T=25, shift 3, distilled guidance 3.5 -> no CFG); SD1.5: DDPO (DDIM eta 1,
# T=50, CFG 5, LoRA r4, lr 3e-4). All bf16 autocast.
_SD35 = {"sampler.steps": 10, "sampler.guidance": 4.5, "sampler.noise_level": 0.7, "sampler.shift": 3.0,
         "model.resolution": 512, "model.lora_rank": 32, "model.lora_alpha": 64, "model.mixed_precision": "bf16",
         "train.lr": 3e-4}
_FLUX = {"sampler.steps": 25, "sampler.guidance": 1.0, "sampler.noise_level": 0.7, "sampler.shift": 3.0,
         "model.resolution": 720, "model.guidance_embedding": 3.5, "model.lora_rank": 32, "model.lora_alpha": 64,
         "model.mixed_precision": "bf16", "train.lr": 3e-4}
_SD15 = {"sampler.steps": 50, "sampler.guidance": 5.0, "sampler.noise_level": 1.0, "sampler.shift": 1.0,
         "model.resolution": 512, "model.lora_rank": 4, "model.lora_alpha": 4, "model.mixed_precision": "bf16",
         "train.lr": 3e-4}
_REAL_REWARDS = {"reward.name": "hpsv2", "eval.rewards": ["hpsv2", "image_reward", "aesthetic", "clip_score"],
                 "data.train_prompts": "t2i-compbench-train", "data.eval_prompts": "partiprompts"}
_RANDOM_REWARDS = {"reward.name": "brightness", "eval.rewards": ["brightness"],
                   "data.train_prompts": "t2i-compbench-train", "data.eval_prompts": "partiprompts"}

MODELS: dict[str, ModelPreset] = {
    "shapes": ModelPreset("package:shapes/model",
                          "Embedded tiny text-to-image flow model of the shapes world (32x32 pixels, CPU)",
                          {"sampler.steps": 10, "sampler.guidance": 3.0, "sampler.noise_level": 0.7,
                           "sampler.shift": 1.0}),
    "tiny-random": ModelPreset("tiny-random",
                               "Random tiny SD3-style flow model built in-process (tests, smoke runs)",
                               {"sampler.steps": 6, "sampler.guidance": 1.0, "sampler.noise_level": 0.7,
                                "sampler.shift": 1.0, "reward.name": "brightness", "eval.rewards": ["brightness"],
                                "train.prompts_per_iteration": 2, "eval.num_prompts": 4, "train.lr": 1e-4}),
    "tiny-random-ddim": ModelPreset("tiny-random-ddim",
                                    "Random tiny epsilon-prediction UNet + DDIM built in-process (DDPO tests)",
                                    {"sampler.steps": 6, "sampler.guidance": 1.0, "sampler.noise_level": 1.0,
                                     "sampler.shift": 1.0, "reward.name": "brightness",
                                     "eval.rewards": ["brightness"], "train.prompts_per_iteration": 2,
                                     "eval.num_prompts": 4, "train.lr": 1e-4}),
    # ---- real models (local diffusers directories) and their random-weight twins (docs/SCALE.md) ----
    "sd3.5-medium": ModelPreset("path", "Stable Diffusion 3.5 Medium (StableDiffusion3Pipeline dir via --model-path); "
                                "TreeGRPO/Flow-GRPO setting: 512 px, T=10, CFG 4.5, shift 3, LoRA r32",
                                {**_SD35, **_REAL_REWARDS}),
    "sd3.5-large": ModelPreset("path", "Stable Diffusion 3.5 Large (--model-path); same sampling setting as Medium",
                               {**_SD35, **_REAL_REWARDS}),
    "flux.1-dev": ModelPreset("path", "FLUX.1-dev (FluxPipeline dir via --model-path); MixGRPO/DanceGRPO setting: "
                              "720 px, T=25, shift 3, guidance embedding 3.5 (1 NFE/step, no CFG), LoRA r32",
                              {**_FLUX, **_REAL_REWARDS}),
    "sd1.5": ModelPreset("path", "Stable Diffusion 1.5 (StableDiffusionPipeline dir via --model-path); DDPO setting: "
                         "DDIM eta 1, 512 px, T=50, CFG 5, LoRA r4", {**_SD15, **_REAL_REWARDS,
                                                                       "reward.name": "aesthetic"}),
    "sd3.5-medium-random": ModelPreset("random:sd3.5-medium-random", "SD3.5-Medium architecture, random weights "
                                       "(timing/memory without downloads); sampling as sd3.5-medium",
                                       {**_SD35, **_RANDOM_REWARDS}),
    "sd3.5-large-random": ModelPreset("random:sd3.5-large-random", "SD3.5-Large architecture, random weights",
                                      {**_SD35, **_RANDOM_REWARDS}),
    "flux.1-dev-random": ModelPreset("random:flux.1-dev-random", "FLUX.1-dev architecture, random weights",
                                     {**_FLUX, **_RANDOM_REWARDS}),
    "sd1.5-random": ModelPreset("random:sd1.5-random", "SD1.5 architecture (UNet + DDIM), random weights",
                                {**_SD15, **_RANDOM_REWARDS}),
    # the same classes and code paths shrunk to CPU size (bench.model.random_models.REDUCED, 32 px): smoke tests
    "sd3.5-medium-random-reduced": ModelPreset("random:sd3.5-medium-random:reduced",
                                               "SD3.5 pipeline classes at tiny sizes (32 px), random weights: CPU "
                                               "smoke of the real-model path",
                                               {**_SD35, **_RANDOM_REWARDS, "model.resolution": 32}),
    "flux.1-dev-random-reduced": ModelPreset("random:flux.1-dev-random:reduced",
                                             "FLUX pipeline classes at tiny sizes (32 px), random weights",
                                             {**_FLUX, **_RANDOM_REWARDS, "model.resolution": 32}),
    "sd1.5-random-reduced": ModelPreset("random:sd1.5-random:reduced",
                                        "SD1.5 pipeline classes at tiny sizes (32 px), random weights",
                                        {**_SD15, **_RANDOM_REWARDS, "model.resolution": 32}),
}

#: Subcommands implemented outside ``bench`` (``bench NAME ...`` -> ``module.main(argv) -> int``).
COMMANDS: dict[str, Entry] = {
    "compare": Entry("bench.fleet.compare:main", "Run several algorithms under one budget and seeds, then report"),
    "sweep": Entry("sweeps.cli:main", "Optuna sweep over k, d, window and friends"),
    "report": Entry("reports.cli:main", "Build a PDF report from run directories"),
    "rewards": Entry("rewards.cli:main", "Reward backends: `bench rewards check` reports which are loadable here"),
}


def load_object(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise NotImplementedError(f"{target} is registered but its module {module!r} does not exist yet")
        raise
    try:
        return getattr(mod, attr)
    except AttributeError as e:
        raise NotImplementedError(f"{module} has no {attr!r} (registered as {target})") from e


#: entry-point groups through which installed packages add names
ENTRY_POINT_GROUPS = {"algorithm": "treebench.algorithms", "reward": "treebench.rewards"}


#: entry points per (group, import-path state): reading every installed package's metadata costs ~20 ms, and
#: the registry is asked often (each record key checked against the glossary asks every algorithm)
_ENTRY_POINTS: dict[tuple[str, tuple[tuple[str, int | None], ...]], tuple[tuple[str, str, str], ...]] = {}


def _path_state() -> tuple[tuple[str, int | None], ...]:
    """sys.path with each folder's modification time: installing or removing a package (a ``.dist-info`` folder
    added or removed) or changing the import path changes it."""
    state = []
    for p in sys.path:
        try:
            state.append((p, os.stat(p or ".").st_mtime_ns))
        except OSError:
            state.append((p, None))
    return tuple(state)


def _entry_points(group: str) -> tuple[tuple[str, str, str], ...]:
    """(name, target, distribution) of the entry points in ``group``, read again when the import path changes."""
    key = (group, _path_state())
    hit = _ENTRY_POINTS.get(key)
    if hit is None:
        hit = tuple((ep.name, ep.value, getattr(getattr(ep, "dist", None), "name", None) or "an installed package")
                    for ep in metadata.entry_points(group=group))
        if len(_ENTRY_POINTS) > 32:  # import-path states of a long test session: keep the memo small
            _ENTRY_POINTS.clear()
        _ENTRY_POINTS[key] = hit
    return hit


def _plugins(kind: str, builtin: dict[str, Entry]) -> dict[str, Entry]:
    """Names added by installed packages' entry points (read from package metadata: nothing is imported)."""
    out = {}
    for name, value, dist in _entry_points(ENTRY_POINT_GROUPS[kind]):
        if name in builtin or name in out:
            continue
        out[name] = Entry(value, f"plug-in from {dist} ({value})")
    return out


def algorithms() -> dict[str, Entry]:
    """Built-in algorithms, then those of installed plug-in packages."""
    return {**ALGORITHMS, **_plugins("algorithm", ALGORITHMS)}


def rewards() -> dict[str, Entry]:
    """Built-in rewards, then those of installed plug-in packages."""
    return {**REWARDS, **_plugins("reward", REWARDS)}


def is_spec(name: str) -> bool:
    """``module:Class`` names an object directly (an algorithm or reward outside any registry)."""
    return ":" in name and "=" not in name and "," not in name


def load_spec(spec: str, what: str) -> Any:
    """The object named by ``module:attribute``, with usage errors that say what failed."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise UsageError(f"{what} {spec!r}: expected module:Class, e.g. mypkg.algo:MyAlgo")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise UsageError(f"{what} {spec!r}: no module {module!r} (is its package installed, or on "
                             f"PYTHONPATH?)") from None
        raise
    if not hasattr(mod, attr):
        raise UsageError(f"{what} {spec!r}: module {module!r} has no attribute {attr!r}")
    return getattr(mod, attr)


def _lookup(name: str, table: dict[str, Entry], what: str) -> Any:
    if is_spec(name):
        return load_spec(name, what)
    if name not in table:
        raise UsageError(did_you_mean(name, table, what))
    return load_object(table[name].target)


def algorithm_class(name: str) -> Any:
    """A registered name (built-in or entry point) or a ``module:Class`` spec."""
    return _lookup(name, algorithms(), "algorithm")


def reward_class(name: str) -> Any:
    """A registered name (built-in or entry point) or a ``module:Class`` spec."""
    return _lookup(name, rewards(), "reward")


def algorithm_log_keys() -> dict[str, str]:
    """Every registered algorithm's ``log_keys`` (its iteration-record keys and their meaning)."""
    out: dict[str, str] = {}
    for name in algorithms():
        out.update(getattr(algorithm_class(name), "log_keys", {}))
    return out


def model_preset(name: str) -> ModelPreset:
    if name not in MODELS:
        raise UsageError(did_you_mean(name, MODELS, "model"))
    return MODELS[name]
