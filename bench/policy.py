"""Models: one loader for real and embedded pipelines.

A model is a diffusers-style pipeline directory (local path or the HF cache, never the network at test
time). ``model_index.json`` names each component as ``[library, class]``; the components are loaded with
their libraries' own ``from_pretrained``. treebench's own format (``_class_name: "TreebenchPipeline"``)
is what the embedded shapes model and the tiny test models use::

    model_index.json      {"_class_name": "TreebenchPipeline",
                           "transformer" | "unet": ["diffusers", "SD3Transformer2DModel" | "UNet2DConditionModel"],
                           "text_encoder": ["transformers", "CLIPTextModelWithProjection" | "CLIPTextModel"],
                           "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler" | "DDIMScheduler"],
                           "vae": [null, null] | ["diffusers", "AutoencoderKL"],
                           "treebench": {"prediction": "flow" | "epsilon", "resolution": 32,
                                         "latent_channels": 3, "max_length": 16,
                                         "defaults": {"sampler.steps": 10, ...}}}
    transformer/ (or unet/)   config.json + diffusion_pytorch_model.safetensors
    text_encoder/             config.json + model.safetensors
    tokenizer/                tokenizer.json + tokenizer_config.json
    scheduler/                scheduler_config.json

Pixel-space models (``vae: [null, null]``) work on images scaled to [-1, 1]; ``decode`` maps back to
[0, 1]. Prompt encoding (Treebench format): ``encoder_hidden_states`` = the text encoder's last hidden
state [P, S, D], ``pooled_projections`` = its projected pooled output [P, D'] (SD3 transformer only).

Real pipelines (``_class_name`` one of ``REAL_PIPELINES``) are loaded with diffusers' own pipeline
class and encode prompts with its ``encode_prompt``:

* ``StableDiffusion3Pipeline`` (SD3 / SD3.5): CLIP-L + CLIP-G (+ T5-XXL when present; without it the
  T5 part of the sequence is zeros, as diffusers does), 16-channel VAE latents at 1/8 resolution.
* ``FluxPipeline`` (FLUX.1-dev): CLIP pooled + T5 sequence; guidance-distilled: the guidance scale is an
  input of the transformer (``ModelOptions.guidance_embedding``, 3.5), one NFE per step, no CFG;
  latents are packed into 2x2 patches for the transformer and unpacked after.
* ``StableDiffusionPipeline`` (SD 1.x, DDPO's setting): CLIP-L, epsilon-prediction UNet, its scheduler
  replaced by ``DDIMScheduler`` built from the same config (as DDPO does).

``ModelOptions`` adds LoRA (peft, through diffusers' ``add_adapter``: the denoiser's base weights are
frozen, text encoders and VAE always are), gradient checkpointing, ``torch.compile`` and the dtype of
frozen weights. ``build_random_policy`` builds the real architectures with random weights from the
configs in ``bench/presets/*.json`` (speed and memory measurements without downloading weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from bench.errors import MissingWeightsError, UsageError

TREEBENCH_CLASS = "TreebenchPipeline"
#: diffusers pipeline classes ``load_policy`` understands -> model family
REAL_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "StableDiffusionPipeline": "sd"}
#: LoRA target modules (peft suffix match) per denoiser family: Flow-GRPO's SD3 list (also used for
#: FLUX, whose double blocks have the same projections) and DDPO's UNet attention projections.
LORA_TARGETS = {
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
}


@dataclass(frozen=True)
class ModelOptions:
    """How a model is loaded and trained (the ``model.*`` config keys).

    resolution:        image side in pixels for real/random pipelines (None = the model's default)
    lora_rank:         LoRA rank; 0 = full fine-tuning of the denoiser
    lora_alpha:        LoRA alpha (None = equal to the rank, scale 1)
    lora_targets:      module-name suffixes wrapped with LoRA (None = ``LORA_TARGETS`` of the family)
    gradient_checkpointing: recompute denoiser activations in the backward pass (less memory)
    compile:           ``torch.compile`` the denoiser (in place: parameter names do not change)
    guidance_embedding: guidance scale fed to guidance-distilled transformers (FLUX.1-dev: 3.5)
    use_t5:            SD3: load the T5 text encoder when the pipeline has one
    frozen_dtype:      dtype of frozen weights (text encoders, VAE, and the base weights under LoRA);
                       None = float32. Trainable weights stay float32 (autocast does the rest).
    """

    resolution: int | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    gradient_checkpointing: bool = False
    compile: bool = False
    guidance_embedding: float = 3.5
    use_t5: bool = True
    frozen_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise UsageError(f"model.lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise UsageError(f"model.resolution must be a multiple of 8, got {self.resolution}")


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts: named tensors with a leading prompt dimension [P, ...]."""

    tensors: dict[str, Tensor]

    def take(self, idx: Tensor) -> "Conditioning":
        return Conditioning({k: v.index_select(0, idx.to(v.device)) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        keys = parts[0].tensors.keys()
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


class Policy:
    """A text-to-image denoiser with everything the engine needs.

    prediction:    "flow" (velocity) or "epsilon"
    denoiser:      the trainable module (SD3/FLUX transformer or UNet), possibly LoRA-wrapped
    latent_shape:  (C, h, w)
    family:        "treebench" (own format), "sd3", "flux" or "sd" (diffusers pipelines)
    pipeline:      the diffusers pipeline object (real families: prompt encoding), else None
    """

    def __init__(self, *, denoiser: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                 vae: nn.Module | None, meta: dict[str, Any], path: Path, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, family: str = "treebench", pipeline: Any = None,
                 options: ModelOptions | None = None):
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = vae
        self.meta = meta
        self.path = path
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.family = family
        self.pipeline = pipeline
        self.options = options or ModelOptions()
        self.prediction: str = meta.get("prediction", "flow")
        res = int(meta["resolution"])
        C = int(meta.get("latent_channels", 3))
        down = int(meta.get("vae_scale_factor", 1)) if vae is not None else 1
        self.resolution = res
        self.latent_shape = (C, res // down, res // down)
        self.max_length = int(meta.get("max_length", 77))
        self._empty: Conditioning | None = None
        self._is_unet = type(denoiser).__name__.startswith("UNet") or hasattr(denoiser, "conv_in")
        #: module called for forward passes with gradients (a DDP/FSDP wrapper of ``denoiser`` under
        #: multi-process training, see bench.distributed); no-grad passes call ``denoiser`` directly
        self.train_module: nn.Module | None = None
        for m in self.frozen_modules():
            m.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        """Text encoders and VAE (never trained)."""
        mods = [self.text_encoder, self.vae]
        if self.pipeline is not None:
            mods += [getattr(self.pipeline, n, None) for n in ("text_encoder_2", "text_encoder_3")]
        return [m for m in mods if isinstance(m, nn.Module)]

    @property
    def is_lora(self) -> bool:
        return bool(getattr(self.denoiser, "_hf_peft_config_loaded", False)) or hasattr(self.denoiser,
                                                                                        "disable_adapter")

    # ---- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        if self.family != "treebench":
            return self._encode_with_pipeline(list(prompts))
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        out = self.text_encoder(input_ids=ids)
        tensors = {"encoder_hidden_states": out.last_hidden_state.float()}
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is not None and not self._is_unet:
            tensors["pooled_projections"] = pooled.float()
        return Conditioning(tensors)

    def _encode_with_pipeline(self, prompts: list[str]) -> Conditioning:
        """diffusers' own ``encode_prompt`` of the pipeline (the empty prompt "" is the unconditional
        branch, as the pipelines' default negative prompt)."""
        pipe, dev = self.pipeline, self.device
        if self.family == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_length)
            return Conditioning({"encoder_hidden_states": emb.float(), "pooled_projections": pooled.float()})
        if self.family == "flux":
            emb, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=dev,
                                                max_sequence_length=self.max_length)
            return Conditioning({"encoder_hidden_states": emb.float(), "pooled_projections": pooled.float()})
        if self.family == "sd":
            emb, _ = pipe.encode_prompt(prompts, dev, 1, False)
            return Conditioning({"encoder_hidden_states": emb.float()})
        raise ValueError(f"unknown model family {self.family!r}")

    def empty_conditioning(self) -> Conditioning:
        """Encoding of the empty prompt (the unconditional branch of CFG), cached."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    # ---- denoiser ------------------------------------------------------------------------------
    def timestep_values(self, sigma_or_t: Tensor) -> Tensor:
        """Flow models see timestep = sigma * num_train_timesteps (SD3 convention); epsilon models
        see the integer DDIM timestep."""
        if self.prediction == "flow":
            n = float(getattr(self.scheduler.config, "num_train_timesteps", 1000))
            return sigma_or_t * n
        return sigma_or_t

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """Model output [B, C, h, w] (float32) for latents x [B, C, h, w] at timesteps [B].

        The denoiser runs under autocast when mixed precision is on; its output is cast back to
        float32 so the step math and log-probs stay float32."""
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        module = self.train_module if (self.train_module is not None and torch.is_grad_enabled()) else self.denoiser
        dtype = self._input_dtype()
        with ctx:
            x_in = x.to(self.device, dtype)
            t_in = timestep.to(self.device)
            c = {k: v.to(self.device, dtype) for k, v in cond.tensors.items()}
            if self._is_unet:
                out = module(sample=x_in, timestep=t_in, encoder_hidden_states=c["encoder_hidden_states"],
                             return_dict=False)[0]
            elif self.family == "flux":
                out = self._flux_forward(module, x_in, t_in, c)
            else:
                out = module(hidden_states=x_in, timestep=t_in, return_dict=False, **c)[0]
        return out.float()

    def _input_dtype(self) -> torch.dtype:
        """dtype of the denoiser's base weights (not its LoRA weights): inputs are cast to it."""
        for name, p in self.denoiser.named_parameters():
            if "lora_" not in name:
                return p.dtype
        return torch.float32

    def _flux_forward(self, module: nn.Module, x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
        """FLUX transformer on latents [B, C, h, w]: packs 2x2 patches into tokens [B, hw/4, 4C], feeds
        positional ids, the distilled guidance scale and timestep = sigma (FluxPipeline divides its
        sigma*1000 timesteps by 1000), then unpacks the velocity."""
        B, C, h, w = x.shape
        packed = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(x.dtype)
        txt_ids = torch.zeros(c["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        cfg = getattr(self.denoiser, "config", None)
        guidance = (torch.full((B,), float(self.options.guidance_embedding), device=x.device, dtype=torch.float32)
                    if getattr(cfg, "guidance_embeds", False) else None)
        out = module(hidden_states=packed, timestep=t.to(x.dtype) / 1000.0, guidance=guidance,
                     pooled_projections=c["pooled_projections"], encoder_hidden_states=c["encoder_hidden_states"],
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [L, C, h, w] -> images [L, 3, H, W] float32 in [0, 1]."""
        x = latents.to(self.device, torch.float32)
        if self.vae is not None:
            cfg = self.vae.config
            x = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
            x = self.vae.decode(x.to(next(self.vae.parameters()).dtype), return_dict=False)[0].float()
        return ((x + 1) / 2).clamp(0, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        (self.train_module if self.train_module is not None else self.denoiser).train(mode)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Context in which ``predict`` evaluates the frozen reference (LoRA adapters disabled): the
        base model for the KL term (``algo.beta > 0``)."""
        den = self.denoiser
        if getattr(den, "_hf_peft_config_loaded", False):  # diffusers add_adapter (PeftAdapterMixin)
            den.disable_adapters()
            try:
                yield
            finally:
                den.enable_adapters()
            return
        disable = getattr(den, "disable_adapter", None)  # a peft PeftModel
        if disable is None:
            raise NotImplementedError("a frozen reference for KL needs a LoRA-wrapped denoiser (model.lora_rank > 0)")
        with disable():
            yield

    # ---- schedules -----------------------------------------------------------------------------
    def ddim_alpha_bars(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """Epsilon models: (alpha_bar at each level 0..T [T+1], integer timesteps [T]) of the DDIM
        schedule (diffusers DDIMScheduler spacing; the final level uses ``final_alpha_cumprod``)."""
        sch = self.scheduler
        sch.set_timesteps(num_steps)
        ts = sch.timesteps.clone().long()
        ac = sch.alphas_cumprod.float()
        ratio = sch.config.num_train_timesteps // num_steps
        ab = [ac[int(t)] for t in ts]
        last_prev = int(ts[-1]) - ratio
        ab.append(ac[last_prev] if last_prev >= 0 else torch.as_tensor(float(sch.final_alpha_cumprod)))
        return torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in ab]), ts.float()

    def default_settings(self) -> dict[str, Any]:
        return dict(self.meta.get("defaults", {}))


# ---- loading ----------------------------------------------------------------------------------
def _import_class(library: str, name: str) -> Any:
    return getattr(importlib.import_module(library), name)


def _quiet_libraries() -> None:
    """No per-file progress bars from diffusers/transformers when loading small components."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


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
    _quiet_libraries()
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


def model_options(model_cfg: dict[str, Any], device: str | torch.device = "cpu") -> ModelOptions:
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


def denoiser_kind(denoiser: nn.Module) -> str:
    return "unet" if type(denoiser).__name__.startswith("UNet") else "transformer"


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
    optional = ("text_encoder_3", "tokenizer_3") if family == "sd3" else ()
    absent = set(check_pipeline_files(path, index, optional))
    kwargs: dict[str, Any] = {}
    if family == "sd3" and (absent or not options.use_t5 or index.get("text_encoder_3", [None])[0] is None):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)  # SD3 without T5 (zeros in its place)
    if family == "sd":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if "image_encoder" in index:
            kwargs["image_encoder"] = None
    dtype = options.frozen_dtype or torch.float32
    pipe = getattr(diffusers, cls_name).from_pretrained(path, dtype=dtype, **kwargs)
    return policy_from_pipeline(pipe, family, path, device, autocast_dtype, options)


#: per family: default resolution, max text length (tokens) for ``encode_prompt``
_FAMILY_DEFAULTS = {"sd3": (1024, 256), "flux": (1024, 512), "sd": (512, 77)}


def policy_from_pipeline(pipe: Any, family: str, path: Path, device: torch.device,
                         autocast_dtype: torch.dtype | None, options: ModelOptions) -> Policy:
    """Wrap a diffusers pipeline object (loaded or built in memory) into a ``Policy``."""
    vae = pipe.vae
    if family == "sd":
        from diffusers import DDIMScheduler

        pred = pipe.scheduler.config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise NotImplementedError(f"{path}: UNet models with prediction_type={pred!r} are not supported "
                                      f"(DDIM log-probs assume epsilon prediction)")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # DDPO samples with DDIM
        denoiser, prediction = pipe.unet, "epsilon"
    else:
        denoiser, prediction = pipe.transformer, "flow"
    res_default, max_len = _FAMILY_DEFAULTS[family]
    res = int(options.resolution or res_default)
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
    if family == "sd":
        pipe.unet = denoiser
    else:
        pipe.transformer = denoiser
    return Policy(denoiser=denoiser, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  scheduler=pipe.scheduler, vae=vae, meta=meta, path=path, device=device,
                  autocast_dtype=autocast_dtype, family=family, pipeline=pipe, options=options)


# ---- random-weight real architectures ----------------------------------------------------------
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def random_preset_spec(name: str) -> dict[str, Any]:
    f = PRESET_DIR / f"{name}.json"
    if not f.is_file():
        valid = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise UsageError(f"no random-architecture config {f}; valid: {', '.join(valid)}")
    return json.loads(f.read_text())


def build_random_pipeline(spec: dict[str, Any], device: str | torch.device = "cpu",
                          overrides: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> Any:
    """The pipeline object of a random-architecture spec (``bench/presets/*.json``), random weights,
    built directly on ``device`` (no weights file is read or written).

    spec: {"pipeline": class name, "<component>": {"class": ..., "config": {...}}, ...}; tokenizers are
    word-level tokenizers built in-process (token ids only feed embedding lookups of random encoders).
    ``overrides`` patches component configs (tests shrink the architectures with it)."""
    import diffusers
    import transformers

    overrides = overrides or {}
    torch.manual_seed(seed)
    comps: dict[str, Any] = {}
    device = torch.device(device)
    for name, c in spec["components"].items():
        cfg = {**c.get("config", {}), **overrides.get(name, {})}
        kind = c["class"]
        if kind == "word_tokenizer":
            comps[name] = word_tokenizer(TINY_WORDS, int(cfg.get("max_length", 77)))
        elif c["library"] == "diffusers" and "Scheduler" in kind:
            comps[name] = getattr(diffusers, kind).from_config(cfg)
        elif c["library"] == "diffusers":
            with device:
                comps[name] = getattr(diffusers, kind).from_config(cfg)
        else:
            config_cls = getattr(transformers, c["config_class"])
            with device:
                comps[name] = getattr(transformers, kind)(config_cls(**cfg))
        if name.startswith("text_encoder") and isinstance(comps[name], nn.Module):
            comps[name].eval()
    for name in spec.get("absent", ()):
        comps[name] = None
    return getattr(diffusers, spec["pipeline"])(**comps, **spec.get("extra", {}))


_TINY_CLIP = {"vocab_size": 1000, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "projection_dim": 16}
_TINY_VAE = {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 4}
#: Per pipeline class: config patches that shrink a random-architecture spec to CPU-test size while
#: keeping every component's class and the shapes that connect them (32 px images).
REDUCED: dict[str, dict[str, dict[str, Any]]] = {
    "StableDiffusion3Pipeline": {
        "transformer": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
                        "caption_projection_dim": 16, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                        "pos_embed_max_size": 16, "sample_size": 16, "dual_attention_layers": [0]},
        "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_CLIP, "vae": _TINY_VAE},
    "FluxPipeline": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]},
        "text_encoder": _TINY_CLIP,
        "text_encoder_2": {"vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2},
        "vae": _TINY_VAE},
    "StableDiffusionPipeline": {
        "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                 "cross_attention_dim": 16, "attention_head_dim": 8, "sample_size": 16,
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
        "text_encoder": {k: v for k, v in _TINY_CLIP.items() if k != "projection_dim"}, "vae": _TINY_VAE},
}


def build_random_policy(name: str, device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                        options: ModelOptions | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                        reduced: bool = False) -> Policy:
    """A ``Policy`` over a random-weight real architecture (``bench/presets/<name>.json``).
    ``reduced`` shrinks it to CPU-test size (``REDUCED``; 32 px), keeping every component's class."""
    _quiet_libraries()
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


# ---- saving and tiny models -------------------------------------------------------------------
def save_pipeline(out_dir: str | os.PathLike, *, denoiser: nn.Module, text_encoder: nn.Module,
                  tokenizer: Any, scheduler: Any, meta: dict[str, Any], vae: nn.Module | None = None) -> Path:
    """Write a pipeline in treebench's diffusers-style format (safetensors everywhere)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dname = "unet" if type(denoiser).__name__.startswith("UNet") else "transformer"
    denoiser.save_pretrained(out / dname, safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    if vae is not None:
        vae.save_pretrained(out / "vae", safe_serialization=True)
    import diffusers

    index = {
        "_class_name": TREEBENCH_CLASS,
        "_diffusers_version": diffusers.__version__,
        dname: ["diffusers", type(denoiser).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "vae": ["diffusers", type(vae).__name__] if vae is not None else [None, None],
        "treebench": meta,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def word_tokenizer(words: Sequence[str], max_length: int) -> Any:
    """A word-level tokenizer trained in-process (``tokenizers``), wrapped for transformers.

    Ids: 0 <pad>, 1 <unk>, 3 <eos> (not 2: CLIPTextModel pools at the first eos_token_id unless it is 2),
    every sequence ends with <eos> (the empty CFG prompt too)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", bos_token="<bos>", model_max_length=max_length)


TINY_WORDS = ("a small large red green blue yellow purple orange white black circle square triangle "
              "diamond star on the left right top bottom centre center of and two one cat dog photo").split()


def build_tiny_pipeline(out_dir: str | os.PathLike, prediction: str = "flow", resolution: int = 16,
                        seed: int = 0, words: Sequence[str] = TINY_WORDS) -> Path:
    """Build and save a tiny random text-to-image pipeline (pixel space, 3 channels) for tests and
    smoke runs: an SD3 transformer + flow-matching scheduler, or a UNet + DDIM for epsilon models."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    max_length = 12
    tok = word_tokenizer(words, max_length)
    tcfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=max_length, projection_dim=32,
                          eos_token_id=3, pad_token_id=0, bos_token_id=2)
    meta: dict[str, Any] = {"prediction": prediction, "resolution": resolution, "latent_channels": 3,
                            "max_length": max_length}
    if prediction == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        text = CLIPTextModelWithProjection(tcfg)
        den = SD3Transformer2DModel(sample_size=resolution, patch_size=2, in_channels=3, out_channels=3,
                                    num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                                    pos_embed_max_size=resolution // 2)
        sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        meta["defaults"] = {"sampler.steps": 6, "sampler.guidance": 1.0, "sampler.noise_level": 0.7}
    elif prediction == "epsilon":
        from diffusers import DDIMScheduler, UNet2DConditionModel

        text = CLIPTextModel(tcfg)
        den = UNet2DConditionModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                                   block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                   attention_head_dim=8,
                                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        meta["defaults"] = {"sampler.steps": 6, "sampler.guidance": 1.0, "sampler.noise_level": 1.0}
    else:
        raise UsageError(f"unknown prediction type {prediction!r}; valid: flow, epsilon")
    return save_pipeline(out_dir, denoiser=den, text_encoder=text, tokenizer=tok, scheduler=sch, meta=meta)


def tiny_pipeline_dir(prediction: str = "flow", seed: int = 0) -> Path:
    """Build (once) and return a cached tiny random pipeline directory."""
    root = Path(os.environ.get("TREEBENCH_CACHE", Path.home() / ".cache" / "treebench"))
    out = root / f"tiny-{prediction}-s{seed}-v1"
    if not (out / "model_index.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_tiny_pipeline(tmp, prediction=prediction, seed=seed)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out
