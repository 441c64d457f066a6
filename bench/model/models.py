"""Building a ``Policy``: from a config's model section or preset, from a pipeline directory
(treebench's format or a real diffusers pipeline), with LoRA, gradient checkpointing and compile.

``build_policy(spec.model, device)`` is the entry point the runner, lora export and perf use; ``load_policy(path)``
loads one directory; ``build_random_policy`` wraps a random-weight architecture (``bench.model.random_models``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bench.errors import MissingWeightsError, UsageError
from bench.model.families import LORA_TARGETS, REAL_PIPELINES, denoiser_kind, family_for
from bench.model.policy import ModelOptions, Policy
from bench.model.random_models import (
    PRESET_DIR,
    REDUCED,
    TREEBENCH_CLASS,
    build_random_pipeline,
    quiet_libraries,
    random_preset_spec,
    tiny_pipeline_dir,
)
from bench.registry import model_preset

PACKAGE_DIR = Path(__file__).resolve().parents[1]


# ---- from a config ---------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"model.device={name!r} but CUDA is not available on this machine (use cpu or auto)")
    return dev


def model_dir(name: str, path: str | None) -> Path:
    """The pipeline directory of model preset ``name``: ``path`` (model.path: a local dir or a hub id in the
    offline cache), the package's shipped weights, or a tiny model built once in the cache."""
    if path:
        return resolve_model_path(path)
    source = model_preset(name).source
    if source.startswith("package:"):
        return PACKAGE_DIR / source.split(":", 1)[1]
    if source == "tiny-random":
        return tiny_pipeline_dir("flow")
    if source == "tiny-random-ddim":
        return tiny_pipeline_dir("epsilon")
    raise UsageError(f"model preset {name!r} loads from a local directory: pass --model-path DIR "
                     f"(a diffusers pipeline directory you downloaded)")


def model_prediction(name: str, path: str | None) -> str:
    """"flow" or "epsilon", read before the model loads (treebench, real and random pipelines)."""
    source = model_preset(name).source
    if source.startswith("random:") and not path:
        return index_prediction({"_class_name": random_preset_spec(source.split(":")[1])["pipeline"]})
    return index_prediction(read_model_index(model_dir(name, path)))


def model_scheduler(name: str, path: str | None) -> tuple[str, dict[str, Any]]:
    """(family, scheduler config) read before the model loads: family "treebench", "sd3", "flux" or "sd",
    and the model's ``scheduler/scheduler_config.json`` (random presets: the spec's scheduler config), so
    the "scheduler" flow schedule takes shift and sigma_min from the model itself."""
    source = model_preset(name).source
    if source.startswith("random:") and not path:
        spec = random_preset_spec(source.split(":")[1])
        return REAL_PIPELINES[spec["pipeline"]], dict(spec["components"].get("scheduler", {}).get("config", {}))
    d = model_dir(name, path)
    family = REAL_PIPELINES.get(read_model_index(d).get("_class_name"), "treebench")
    f = d / "scheduler" / "scheduler_config.json"
    return family, (json.loads(f.read_text()) if f.is_file() else {})


def build_policy(model: Any, device: torch.device) -> Policy:
    """The model a ``bench.spec.ModelSpec`` names: real and random-architecture presets, LoRA, precision
    options (docs/SCALE.md)."""
    mp = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[model.mixed_precision]
    source = model_preset(model.name).source
    if source.startswith("random:") and not model.path:
        _, name, *flags = source.split(":")
        return build_random_policy(name, device=device, autocast_dtype=mp, options=model.options,
                                   reduced="reduced" in flags)
    return load_policy(model_dir(model.name, model.path), device=device, autocast_dtype=mp, options=model.options)


# ---- pipeline directories ----------------------------------------------------------------------------------
def _import_class(library: str, name: str) -> Any:
    return getattr(importlib.import_module(library), name)


def read_model_index(path: Path) -> dict[str, Any]:
    idx = path / "model_index.json"
    if not idx.is_file():
        raise MissingWeightsError(
            f"no model found at {path}: expected a diffusers pipeline directory with model_index.json "
            f"(and component folders such as transformer/, text_encoder/, tokenizer/, scheduler/). "
            f"Download the model yourself (e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass "
            f"--model-path DIR.")
    return json.loads(idx.read_text())


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A local directory as given, or a hub id ("org/name") already in the local Hugging Face cache
    (looked up offline: nothing is downloaded)."""
    p = Path(path).expanduser()
    text = str(path)
    if p.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any lookup failure means "not available offline"
        raise MissingWeightsError(
            f"{text!r} is neither a local directory nor a model in the local Hugging Face cache ({type(e).__name__}). "
            f"Download it first (`huggingface-cli download {text} --local-dir DIR`) and pass --model-path DIR") from None


def index_prediction(index: dict[str, Any]) -> str:
    """"flow" or "epsilon" from a model_index.json (without loading anything)."""
    cls = index.get("_class_name")
    if cls == "StableDiffusionPipeline":
        return "epsilon"
    if cls in REAL_PIPELINES:
        return "flow"
    return index.get("treebench", {}).get("prediction", "flow")


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu",
                autocast_dtype: torch.dtype | None = None, options: ModelOptions | None = None) -> Policy:
    """Load a pipeline directory into a ``Policy`` (text encoder and VAE frozen, denoiser trainable,
    or LoRA-wrapped with its base frozen when ``options.lora_rank > 0``)."""
    path = resolve_model_path(path)
    index = read_model_index(path)
    quiet_libraries()
    options = options or ModelOptions()
    cls = index.get("_class_name")
    device = torch.device(device)
    if cls in REAL_PIPELINES:
        return _load_real_pipeline(path, index, device, autocast_dtype, options)
    if cls != TREEBENCH_CLASS:
        raise NotImplementedError(
            f"{path}: pipelines of class {cls!r} are not supported; supported: {TREEBENCH_CLASS!r} (the embedded "
            f"and tiny models) and {', '.join(REAL_PIPELINES)}")
    comps: dict[str, Any] = {}
    for name in ("transformer", "unet", "text_encoder", "tokenizer", "scheduler", "vae"):
        spec = index.get(name)
        if not spec or spec[0] is None:
            continue
        sub = path / name
        if not sub.is_dir():
            raise MissingWeightsError(f"{path}: component folder {sub} named in model_index.json is missing")
        klass = _import_class(spec[0], spec[1])
        comps[name] = klass.from_pretrained(sub)
    if "tokenizer" in comps and len(comps["tokenizer"]) < 4:
        raise MissingWeightsError(f"{path / 'tokenizer'}: tokenizer loaded with only {len(comps['tokenizer'])} "
                                  f"tokens; the tokenizer files are missing or broken")
    denoiser = comps.get("transformer", comps.get("unet"))
    if denoiser is None:
        raise MissingWeightsError(f"{path}: model_index.json names neither a transformer nor a unet")
    meta = dict(index.get("treebench", {}))
    if options.resolution is not None:
        meta["resolution"] = options.resolution
    for m in (comps["text_encoder"], comps.get("vae")):
        if m is not None:
            _to(m, device, options.frozen_dtype or torch.float32).eval()
    denoiser = prepare_denoiser(denoiser, options, device)
    return Policy(denoiser=denoiser, text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                  scheduler=comps["scheduler"], vae=comps.get("vae"), meta=meta, path=path, device=device,
                  autocast_dtype=autocast_dtype, options=options)


def model_options(model_cfg: Mapping[str, Any]) -> ModelOptions:
    """``ModelOptions`` from the ``model`` section of a resolved config. With mixed precision the frozen
    weights (text encoders, VAE, LoRA base weights) are stored in the autocast dtype."""
    mp = model_cfg.get("mixed_precision", "no")
    targets = model_cfg.get("lora_targets")
    return ModelOptions(
        resolution=model_cfg.get("resolution"), lora_rank=int(model_cfg.get("lora_rank") or 0),
        lora_alpha=model_cfg.get("lora_alpha"), lora_targets=tuple(targets) if targets else None,
        gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing", False)),
        compile=bool(model_cfg.get("compile", False)),
        guidance_embedding=float(model_cfg.get("guidance_embedding", 3.5)),
        use_t5=bool(model_cfg.get("use_t5", True)),
        frozen_dtype={"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mp])


# ---- denoiser preparation: LoRA, checkpointing, compile ----------------------------------------
def _to(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to a device, and cast only when the dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # its "should be kept in float32: []" notice is noise for a deliberate cast
        try:
            module.to(dtype)
        finally:
            dlog.set_verbosity(level)
    return module


def apply_lora(denoiser: nn.Module, rank: int, alpha: float | None = None,
               targets: Sequence[str] | None = None) -> nn.Module:
    """Freeze the denoiser's base weights and add a LoRA adapter (peft, via diffusers' ``add_adapter``:
    the model keeps its class, so diffusers can save and load the adapter). B starts at zero, so the
    wrapped model equals the base model until the first update."""
    from peft import LoraConfig

    targets = tuple(targets) if targets else LORA_TARGETS[denoiser_kind(denoiser)]
    names = [n for n, _ in denoiser.named_modules()]
    if not any(n.endswith(t) for t in targets for n in names):
        raise UsageError(f"model.lora_targets {list(targets)} match no module of {type(denoiser).__name__}; "
                         f"module names end with e.g. {sorted({n.rsplit('.', 1)[-1] for n in names if n})[:12]}")
    denoiser.requires_grad_(False)
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                     init_lora_weights="gaussian", target_modules=list(targets))
    denoiser.add_adapter(cfg)
    for n, p in denoiser.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # trainable adapter weights in float32 whatever the base dtype
            p.requires_grad_(True)
    return denoiser


def prepare_denoiser(denoiser: nn.Module, options: ModelOptions, device: torch.device) -> nn.Module:
    """Move to the device; LoRA (base weights in ``frozen_dtype``) or full fine-tuning (float32);
    gradient checkpointing; in-place ``torch.compile``."""
    if options.lora_rank > 0:
        _to(denoiser, device, options.frozen_dtype or torch.float32)
        apply_lora(denoiser, options.lora_rank, options.lora_alpha, options.lora_targets)
    else:
        _to(denoiser, device, torch.float32)
        denoiser.requires_grad_(True)
    denoiser.eval()
    if options.gradient_checkpointing:
        if not hasattr(denoiser, "enable_gradient_checkpointing"):
            raise UsageError(f"{type(denoiser).__name__} does not support gradient checkpointing")
        denoiser.enable_gradient_checkpointing()
    if options.compile:
        denoiser.compile()  # nn.Module.compile: in place, parameter names unchanged (checkpoints)
    return denoiser


# ---- real diffusers pipelines ------------------------------------------------------------------
_TOKENIZER_OR_SCHEDULER = ("Tokenizer", "Scheduler", "FeatureExtractor", "ImageProcessor")


def _component_problems(path: Path, name: str, spec: Sequence[Any]) -> list[str]:
    """What is missing from one component folder (empty = looks loadable)."""
    sub = path / name
    if not sub.is_dir():
        return [f"{sub}/ (component {name}: {spec[1]})"]
    if any(k in str(spec[1]) for k in _TOKENIZER_OR_SCHEDULER):
        return [] if any(sub.iterdir()) else [f"{sub}/ is empty (component {name})"]
    out = []
    if not (sub / "config.json").is_file():
        out.append(f"{sub / 'config.json'}")
    weights = [f for f in sub.iterdir() if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")]
    if not weights:
        out.append(f"{sub}/*.safetensors (weights of {name})")
    return out


def check_pipeline_files(path: Path, index: dict[str, Any], optional: Sequence[str] = ()) -> list[str]:
    """Raise ``MissingWeightsError`` naming every missing required file; return the optional
    components that are absent (e.g. SD3's T5)."""
    missing, absent = [], []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        if name in ("safety_checker", "feature_extractor", "image_encoder"):
            continue  # never used by treebench
        problems = _component_problems(path, name, spec)
        if problems and name in optional:
            absent.append(name)
        else:
            missing += problems
    if missing:
        raise MissingWeightsError(
            f"model at {path} is incomplete; missing:\n  " + "\n  ".join(missing) +
            f"\nDownload the full pipeline (e.g. `huggingface-cli download <repo> --local-dir {path}`; gated models "
            f"need an accepted licence and a token) and pass --model-path {path}.")
    return absent


def _load_real_pipeline(path: Path, index: dict[str, Any], device: torch.device,
                        autocast_dtype: torch.dtype | None, options: ModelOptions) -> Policy:
    import diffusers

    cls_name = index["_class_name"]
    family = REAL_PIPELINES[cls_name]
    impl = family_for(family)
    absent = set(check_pipeline_files(path, index, impl.optional_components))
    kwargs = impl.load_kwargs(index, absent, options.use_t5)
    dtype = options.frozen_dtype or torch.float32
    pipe = getattr(diffusers, cls_name).from_pretrained(path, dtype=dtype, **kwargs)
    return policy_from_pipeline(pipe, family, path, device, autocast_dtype, options)


def policy_from_pipeline(pipe: Any, family: str, path: Path, device: torch.device,
                         autocast_dtype: torch.dtype | None, options: ModelOptions) -> Policy:
    """Wrap a diffusers pipeline object (loaded or built in memory) into a ``Policy``."""
    vae = pipe.vae
    impl = family_for(family)
    if impl.prediction == "epsilon":
        from diffusers import DDIMScheduler

        pred = pipe.scheduler.config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise NotImplementedError(f"{path}: UNet models with prediction_type={pred!r} are not supported "
                                      f"(DDIM log-probs assume epsilon prediction)")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # DDPO samples with DDIM
        denoiser, prediction = pipe.unet, "epsilon"
    else:
        denoiser, prediction = pipe.transformer, "flow"
    max_len = impl.max_length
    res = int(options.resolution or impl.default_resolution)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if res % (2 * down):
        raise UsageError(f"model.resolution={res} must be a multiple of {2 * down} for this model")
    meta = {"prediction": prediction, "resolution": res, "latent_channels": int(vae.config.latent_channels),
            "vae_scale_factor": down, "max_length": max_len}
    frozen = options.frozen_dtype or torch.float32
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        m = getattr(pipe, name, None)
        if isinstance(m, nn.Module):
            _to(m, device, frozen).eval()
    denoiser = prepare_denoiser(denoiser, options, device)
    setattr(pipe, denoiser_kind(denoiser), denoiser)
    return Policy(denoiser=denoiser, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  scheduler=pipe.scheduler, vae=vae, meta=meta, path=path, device=device,
                  autocast_dtype=autocast_dtype, family=family, pipeline=pipe, options=options)


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the safetensors files of a pipeline directory (first 16 hex digits), for manifests."""
    h = hashlib.sha256()
    if Path(path).is_file():  # a random-architecture spec: no weights, hash the spec
        h.update(Path(path).read_bytes())
        return h.hexdigest()[:16]
    for f in sorted(Path(path).rglob("*.safetensors")):
        h.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def build_random_policy(name: str, device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                        options: ModelOptions | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                        reduced: bool = False) -> Policy:
    """A ``Policy`` over a random-weight real architecture (``bench/presets/<name>.json``).
    ``reduced`` shrinks it to CPU-test size (``REDUCED``; 32 px), keeping every component's class."""
    quiet_libraries()
    spec = random_preset_spec(name)
    options = options or ModelOptions()
    if reduced:
        overrides = {**REDUCED[spec["pipeline"]], **(overrides or {})}
        if options.resolution is None:
            options = dataclasses.replace(options, resolution=32)
    if options.resolution is None and spec.get("resolution"):
        options = dataclasses.replace(options, resolution=int(spec["resolution"]))
    pipe = build_random_pipeline(spec, device, overrides)
    return policy_from_pipeline(pipe, REAL_PIPELINES[spec["pipeline"]], PRESET_DIR / f"{name}.json",
                                torch.device(device), autocast_dtype, options)
