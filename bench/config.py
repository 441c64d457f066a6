"""Run configuration: one nested dict, resolved in a fixed order and validated with teaching errors.

Precedence (later wins): ``DEFAULTS`` < model preset defaults < algorithm preset (``--preset``) <
config file (``--config FILE.yaml``) < ``--set key=value`` < the explicit CLI flags (``--algo``,
``--reward``, ``--model``, ``--budget``, ``--seed``, ``--out``).

Keys are dotted paths (``sampler.steps``, ``train.lr``, ``algo.k``). Every section except ``algo`` is
checked against ``DEFAULTS``; ``algo.*`` keys are checked against the chosen algorithm's ``Config``
dataclass. Unknown keys fail with a did-you-mean (exit 2 from the CLI).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

from bench.budget import Cadence
from bench.errors import UsageError, algorithm_settings
from bench.registry import algorithm_class, did_you_mean, model_preset

DEFAULTS: dict[str, Any] = {
    "algo": {"name": "treegrpo"},
    "model": {
        "name": "shapes",        # preset name (bench list)
        "path": None,            # local pipeline directory; overrides the preset's source
        "device": "auto",        # auto | cpu | cuda | cuda:N
        "mixed_precision": "no",  # no | bf16 | fp16 (autocast; step math and log-probs stay fp32)
        # ---- scale (docs/SCALE.md) ----
        "resolution": None,      # image side in pixels (real/random pipelines); None = the preset's
        "lora_rank": 0,          # LoRA rank (peft); 0 = full fine-tuning of the denoiser
        "lora_alpha": None,      # LoRA alpha; None = the rank (scale 1)
        "lora_targets": None,    # list of module-name suffixes; None = the architecture's default
        "gradient_checkpointing": False,
        "compile": False,        # torch.compile the denoiser
        "guidance_embedding": 3.5,  # guidance input of guidance-distilled transformers (FLUX.1-dev)
        "use_t5": True,          # SD3: load the T5 text encoder when the pipeline has one
        "distributed": "auto",   # auto (DDP when launched with > 1 process) | fsdp (sharded, bench/model/fsdp.py) | off
    },
    "sampler": {
        "steps": None,           # T; None = the model preset's default
        "guidance": None,        # CFG scale; <= 1 disables CFG
        "noise_level": None,     # SDE noise level (Flow-GRPO a / DanceGRPO eta / DDIM eta)
        "sde": "flow_grpo",      # flow_grpo | dance | cps (flow models)
        "shift": None,           # flow time shift
        "schedule": "auto",      # auto | scheduler | linspace (flow models; auto = the model family's reference)
        "final_image": None,     # sample | x0; None = the algorithm's reference behaviour
    },
    "train": {
        "prompts_per_iteration": 8,
        "lr": 1e-5,
        "weight_decay": 1e-4,
        "beta1": 0.9,
        "beta2": 0.999,
        "adam_eps": 1e-8,
        "max_grad_norm": 1.0,
        "micro_batch": 64,       # max rows per denoiser call (rollout and update; CFG takes 2 rows)
        "optimizer_steps": 1,    # optimizer steps per iteration
        "frozen": False,         # true: the update runs (loss, gradients, NFE, optimizer-step calls) but no weight
                                 # changes: the null arm of a comparison (bench compare --controls)
    },
    "reward": {
        "name": None,            # "shapes_pref" or a weighted spec "hpsv2=1.0,clip_score=1.0"; None = preset's
        "normalize": "none",     # none | zscore (per component, weighted specs)
        "options": {},           # {reward_name: {option: value}}
    },
    "eval": {
        "every": 10,             # evaluate every N iterations, or every budget amount (2000nfe, 500samples, 30s on
                                 # the run's clock): at the first iteration boundary past each multiple (0 = only
                                 # at start and end)
        "num_prompts": 32,       # first N prompts of the eval set
        "images_per_prompt": 4,  # images per eval prompt (independent noise each): resolution of the eval means
        "seed": 0,               # eval noise seed, independent of the run seed: every run of a comparison
                                 # evaluates the same prompts on the same noise (docs/REPORTS.md)
        "rewards": None,         # list; None = the preset's
        "grid": 16,              # images in each saved sample grid
        "at_start": True,
        "cache": None,           # a directory caching the iteration-0 evaluation across runs (the same images and
                                 # scores in every run of a comparison; bench compare sets DIR/.eval_cache); null = off
    },
    "data": {"train_prompts": None, "eval_prompts": None},
    "run": {
        "overwrite": False,
        "force": False,           # --force: --overwrite may empty a directory that is not a treebench run
        "progress": True,
        "tensorboard": False,
        "log_with": [],           # experiment trackers: tensorboard, wandb, mlflow (bench/run/trackers.py)
        "checkpoint_every": 20,   # checkpoint every N iterations and at the end (0 = only on SIGINT/SIGTERM)
        "keep_checkpoints": 2,    # newest N checkpoints kept (>= 2 lets resume skip a corrupt newest one)
        "on_nonfinite": "stop",   # NaN/inf reward, log-prob or gradient: stop | skip (drop the batch's update)
        # ---- cost model (docs/COST.md) ----
        "cost_profile": None,     # shipped profile name or JSON file: log modeled seconds per iteration
        "clock": "wall",          # wall | a profile: a seconds budget counts that profile's modeled seconds
        "trace": False,           # write every expensive call of every iteration to trace.jsonl
        "flops": True,            # count each call kind's FLOPs on the meta device: flops / mfu in the records
        "peak_flops": None,       # peak FLOP/s per device for MFU; null = the known-device table (bench.engine.flops)
        "label": None,            # the run's name in reports (default: the algorithm and its varying settings);
                                  # bench compare --controls labels its control arms <baseline>-aa / -frozen
    },
    "budget": "10m",
    "seed": 0,
    "out": None,
}

#: Largest seed: torch, numpy and the seed derivation (bench/engine/seeding.py) all take a signed 64-bit one
SEED_MAX = 2**63 - 1

#: Settings that follow from the model preset when the user does not give them.
PRESET_KEYS = ("sampler.steps", "sampler.guidance", "sampler.noise_level", "sampler.shift", "train.lr",
               "train.prompts_per_iteration", "reward.name", "eval.rewards", "data.train_prompts",
               "data.eval_prompts")

MODEL_FALLBACKS: dict[str, Any] = {"sampler.shift": 1.0, "sampler.noise_level": 0.7, "sampler.guidance": 1.0,
                                   "sampler.steps": 10, "reward.name": "shapes_pref",
                                   "eval.rewards": ["shapes_pref", "shapes_attr"],
                                   "data.train_prompts": "shapes-train", "data.eval_prompts": "shapes-eval"}


def parse_value(text: str) -> Any:
    """--set values: int, float (1e-5 too), bool, null, [a, b] lists, else the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", "~"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t.startswith("[") or t.startswith("{"):
        import yaml

        try:
            return yaml.safe_load(t)
        except yaml.YAMLError as e:
            raise UsageError(f"cannot parse value {text!r}: {e}") from None
    return t


def parse_sets(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set expects key=value (e.g. --set train.lr=1e-5), got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_ranges(items: Any, flag: str = "--range") -> dict[str, tuple[float, float]]:
    """``["lr=1e-5:2e-4"]`` -> {"lr": (1e-5, 2e-4)}: the KEY=LOW:HIGH items of ``flag`` (``bench sweep --range``,
    ``bench compare --tune-range``), checked: two finite numbers, LOW < HIGH, each key once."""
    out: dict[str, tuple[float, float]] = {}
    for item in items:
        key, sep, rng = str(item).partition("=")
        lo, sep2, hi = rng.partition(":")
        key = key.strip()
        try:
            if not (sep and sep2 and key):
                raise ValueError
            low, high = float(lo), float(hi)
        except ValueError:
            raise UsageError(f"{flag} {item!r}: expected KEY=LOW:HIGH with two numbers, e.g. lr=1e-5:2e-4") from None
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise UsageError(f"{flag} {item!r}: needs finite LOW < HIGH")
        if key in out:
            raise UsageError(f"{flag} names {key!r} twice")
        out[key] = (low, high)
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k != "options" and not (prefix == "" and k in ("budget", "seed", "out")):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """Parse a user's YAML file; a missing file or bad YAML is a usage error naming ``what``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{what} {p} is not valid YAML: {e}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    data = read_yaml_file(p, "config file")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"config file {p} must contain a mapping of settings, got {type(data).__name__}")
    return flatten(data)


def _set(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            valid = [k for k, v in node.items() if isinstance(v, dict)] if i == 0 else list(node)
            raise UsageError(did_you_mean(".".join(parts[:i + 1]), [".".join(parts[:i]) + ("." if i else "") + v
                                                                        for v in valid], "config section"))
        node = node[part]
    leaf = parts[-1]
    if isinstance(node.get(leaf), dict) and key not in ("reward.options",):
        # a whole section (``--set train=5``, ``--set 'algo={k: 2}'``): its keys are set one by one
        example = (" ".join(f"--set {key}.{k}={v}" for k, v in value.items()) if isinstance(value, Mapping) and value
                   else f"--set {key}.{next((k for k in node[leaf] if k != 'name'), 'KEY')}=VALUE")
        raise UsageError(f"{key} is a config section, not a setting: set its keys one by one, e.g. {example}")
    if parts[0] != "algo" and leaf not in node:
        prefix = ".".join(parts[:-1])
        valid = [f"{prefix}.{k}" if prefix else k for k in node]
        raise UsageError(did_you_mean(key, valid, "config key"))
    if parts[0] == "reward" and leaf == "options" and not isinstance(value, Mapping):
        raise UsageError("reward.options must be a mapping {reward_name: {option: value}}")
    node[leaf] = value


def algorithm_fields(algo_name: str) -> dict[str, Any]:
    cls = algorithm_class(algo_name)
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
            for f in dataclasses.fields(cls.Config)}


def resolve(overrides: Mapping[str, Any] | None = None, *, config_file: str | Path | None = None,
            preset: str | None = None, flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build the fully resolved config dict (see the module docstring for the order)."""
    cfg = copy.deepcopy(DEFAULTS)
    layers: list[dict[str, Any]] = []
    file_layer = load_config_file(config_file) if config_file else {}
    set_layer = dict(overrides or {})
    flag_layer = {k: v for k, v in (flags or {}).items() if v is not None}
    # the algorithm and model names decide which presets and fields apply
    for layer in (file_layer, set_layer, flag_layer):
        for k in ("algo.name", "model.name"):
            if k in layer:
                _set(cfg, k, layer[k])
    algo_name = cfg["algo"]["name"]
    fields = algorithm_fields(algo_name)
    model = model_preset(cfg["model"]["name"])
    layers.append(dict(model.defaults))
    if preset:
        presets = getattr(algorithm_class(algo_name), "PRESETS", {}) or {}
        if preset not in presets:
            raise UsageError(did_you_mean(preset, list(presets) or ["(none)"], f"preset for algorithm {algo_name!r}"))
        layers.append(dict(presets[preset]))
    layers += [file_layer, set_layer, flag_layer]
    user_keys: set[str] = set()
    for i, layer in enumerate(layers):
        for k, v in layer.items():
            if k.startswith("algo.") and k != "algo.name":
                name = k.split(".", 1)[1]
                if name not in fields:
                    raise UsageError(did_you_mean(k, [f"algo.{f}" for f in fields],
                                                  f"setting for algorithm {algo_name!r}:"))
            _set(cfg, k, v)
            if i >= 1:
                user_keys.add(k)
    for name, default in fields.items():
        cfg["algo"].setdefault(name, default)
    for k in PRESET_KEYS:
        sec, key = k.split(".")
        if cfg[sec][key] is None:
            cfg[sec][key] = MODEL_FALLBACKS.get(k)
    if isinstance(cfg["eval"]["rewards"], str):
        cfg["eval"]["rewards"] = [r.strip() for r in cfg["eval"]["rewards"].split(",") if r.strip()]
    _validate(cfg)
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def _validate(cfg: dict[str, Any]) -> None:
    """Types and ranges of every section (the algorithm's own Config checks ``algo.*``)."""
    _validate_finite(cfg)
    _validate_sampling(cfg)
    _validate_model(cfg)
    _validate_run(cfg)


def _validate_finite(node: Any, key: str = "") -> None:
    """No setting may be NaN or infinite (``--set sampler.guidance=nan`` would silently turn CFG off, and
    the manifest, strict JSON, could not record it for a resume)."""
    if isinstance(node, float) and not math.isfinite(node):
        raise UsageError(f"{key} must be a finite number, got {node!r}")
    if isinstance(node, Mapping):
        for k, v in node.items():
            _validate_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _validate_finite(v, f"{key}[{i}]")


def _validate_sampling(cfg: dict[str, Any]) -> None:
    need = _need
    s, t, e = cfg["sampler"], cfg["train"], cfg["eval"]
    need(isinstance(s["steps"], int) and s["steps"] >= 1, f"sampler.steps must be an integer >= 1, got {s['steps']!r}")
    need(isinstance(s["guidance"], (int, float)), f"sampler.guidance must be a number, got {s['guidance']!r}")
    need(isinstance(s["noise_level"], (int, float)) and s["noise_level"] > 0,
         f"sampler.noise_level must be a number > 0, got {s['noise_level']!r}")
    need(s["sde"] in ("flow_grpo", "dance", "cps"), f"sampler.sde must be flow_grpo, dance or cps, got {s['sde']!r}")
    need(s["schedule"] in ("auto", "scheduler", "linspace"),
         f"sampler.schedule must be auto, scheduler or linspace, got {s['schedule']!r}")
    need(s["final_image"] in (None, "sample", "x0"),
         f"sampler.final_image must be sample, x0 or null (the algorithm's default), got {s['final_image']!r}")
    need(isinstance(t["prompts_per_iteration"], int) and t["prompts_per_iteration"] >= 1,
         f"train.prompts_per_iteration must be an integer >= 1, got {t['prompts_per_iteration']!r}")
    need(isinstance(t["lr"], (int, float)) and t["lr"] >= 0, f"train.lr must be a number >= 0, got {t['lr']!r}")
    need(isinstance(t["micro_batch"], int) and t["micro_batch"] >= 1,
         f"train.micro_batch must be an integer >= 1, got {t['micro_batch']!r}")
    need(isinstance(t["optimizer_steps"], int) and t["optimizer_steps"] >= 1,
         f"train.optimizer_steps must be an integer >= 1, got {t['optimizer_steps']!r}")
    Cadence.parse(e["every"])  # an integer (iterations) or one budget amount; UsageError lists the forms
    need(isinstance(t["frozen"], bool), f"train.frozen must be true or false, got {t['frozen']!r}")
    need(isinstance(e["num_prompts"], int) and e["num_prompts"] >= 1,
         f"eval.num_prompts must be an integer >= 1, got {e['num_prompts']!r}")
    need(isinstance(e["images_per_prompt"], int) and e["images_per_prompt"] >= 1,
         f"eval.images_per_prompt must be an integer >= 1, got {e['images_per_prompt']!r}")
    need(isinstance(e["seed"], int) and not isinstance(e["seed"], bool) and 0 <= e["seed"] <= SEED_MAX,
         f"eval.seed must be an integer from 0 to {SEED_MAX} (2**63 - 1), got {e['seed']!r}")
    need(isinstance(e["rewards"], list), f"eval.rewards must be a list of reward names, got {e['rewards']!r}")
    cache = e.get("cache")
    need(cache is None or (isinstance(cache, str) and cache.strip() != ""),
         f"eval.cache must be a directory path or null, got {cache!r} (a numeric name reads as a number: write ./123)")
    need(cache is None or not Path(cache).exists() or Path(cache).is_dir(),
         f"eval.cache {cache!r} exists and is not a directory; name a directory (created when missing)")


def _validate_model(cfg: dict[str, Any]) -> None:
    need = _need
    need(cfg["model"]["mixed_precision"] in ("no", "bf16", "fp16"),
         f"model.mixed_precision must be no or bf16, got {cfg['model']['mixed_precision']!r}")
    # fp16 autocast without a gradient scaler lets small gradients underflow to zero; bf16 has fp32's range
    need(cfg["model"]["mixed_precision"] != "fp16",
         "model.mixed_precision=fp16 is refused: training without a gradient scaler would let small gradients "
         "underflow to zero; use model.mixed_precision=bf16 (same memory, fp32's exponent range)")
    m = cfg["model"]
    need(m["resolution"] is None or (isinstance(m["resolution"], int) and m["resolution"] >= 8
                                     and m["resolution"] % 8 == 0),
         f"model.resolution must be null or an integer multiple of 8, got {m['resolution']!r}")
    need(isinstance(m["lora_rank"], int) and not isinstance(m["lora_rank"], bool) and m["lora_rank"] >= 0,
         f"model.lora_rank must be an integer >= 0 (0 = full fine-tuning), got {m['lora_rank']!r}")
    need(m["lora_alpha"] is None or isinstance(m["lora_alpha"], (int, float)),
         f"model.lora_alpha must be null or a number, got {m['lora_alpha']!r}")
    need(m["lora_targets"] is None or (isinstance(m["lora_targets"], list) and m["lora_targets"]
                                       and all(isinstance(t, str) for t in m["lora_targets"])),
         f"model.lora_targets must be null or a non-empty list of module names, got {m['lora_targets']!r}")
    need(m["distributed"] in ("auto", "fsdp", "off"),
         f"model.distributed must be auto, fsdp or off, got {m['distributed']!r}")
    need(cfg["reward"]["normalize"] in ("none", "zscore"),
         f"reward.normalize must be none or zscore, got {cfg['reward']['normalize']!r}")
    need(isinstance(cfg["seed"], int) and not isinstance(cfg["seed"], bool) and 0 <= cfg["seed"] <= SEED_MAX,
         f"seed must be an integer from 0 to {SEED_MAX} (2**63 - 1), got {cfg['seed']!r}")


def _validate_run(cfg: dict[str, Any]) -> None:
    need = _need
    ru = cfg["run"]
    need(isinstance(ru["checkpoint_every"], int) and not isinstance(ru["checkpoint_every"], bool)
         and ru["checkpoint_every"] >= 0,
         f"run.checkpoint_every must be an integer >= 0 (iterations; 0 = only on SIGINT/SIGTERM), "
         f"got {ru['checkpoint_every']!r}")
    need(isinstance(ru["keep_checkpoints"], int) and not isinstance(ru["keep_checkpoints"], bool)
         and ru["keep_checkpoints"] >= 1,
         f"run.keep_checkpoints must be an integer >= 1, got {ru['keep_checkpoints']!r}")
    need(isinstance(ru["log_with"], list) and all(isinstance(x, str) for x in ru["log_with"]),
         f"run.log_with must be a list of tracker names (tensorboard, wandb, mlflow), got {ru['log_with']!r}")
    need(isinstance(ru["force"], bool) and (not ru["force"] or ru["overwrite"]),
         "--force (run.force=true) only widens --overwrite; pass --overwrite too")
    need(ru["on_nonfinite"] in ("stop", "skip"), f"run.on_nonfinite must be stop or skip, got {ru['on_nonfinite']!r}")
    need(ru["cost_profile"] is None or isinstance(ru["cost_profile"], str),
         f"run.cost_profile must be null, a shipped profile name or a JSON file, got {ru['cost_profile']!r}")
    need(isinstance(ru["clock"], str) and ru["clock"] != "",
         f"run.clock must be 'wall' or a cost profile (shipped name or JSON file), got {ru['clock']!r}")
    need(isinstance(ru["trace"], bool), f"run.trace must be true or false, got {ru['trace']!r}")
    need(isinstance(ru["flops"], bool), f"run.flops must be true or false, got {ru['flops']!r}")
    need(ru["peak_flops"] is None or (isinstance(ru["peak_flops"], (int, float)) and not isinstance(ru["peak_flops"], bool)
                                      and ru["peak_flops"] > 0),
         f"run.peak_flops must be null (the device table) or a number > 0 (FLOP/s per device, e.g. 989e12), got "
         f"{ru['peak_flops']!r}")
    need(ru["label"] is None or (isinstance(ru["label"], str) and ru["label"].strip() != ""),
         f"run.label must be null or a non-empty name, got {ru['label']!r}")


def algorithm_config(cfg: Mapping[str, Any]) -> Any:
    """Instantiate the algorithm's frozen Config from ``cfg['algo']`` (ValueError -> AlgorithmSettingsError)."""
    cls = algorithm_class(cfg["algo"]["name"])
    params = {k: v for k, v in cfg["algo"].items() if k != "name"}
    with algorithm_settings(cfg["algo"]["name"], catch=(TypeError, ValueError)):
        return cls.Config(**params)
