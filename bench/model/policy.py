"""The runtime model: ``Policy`` (prompt encoding, denoiser calls, decoding) and its options.

Building one (presets, loaders, LoRA) is ``bench.model.models``; random and tiny architectures are
``bench.model.random_models``; what differs between model families is ``bench.model.families``.

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

``ModelOptions`` (applied by ``bench.model.models``) adds LoRA (peft, through diffusers' ``add_adapter``: the
denoiser's base weights are frozen, text encoders and VAE always are), gradient checkpointing,
``torch.compile`` and the dtype of frozen weights. ``bench.model.models.build_random_policy`` builds the
real architectures with random weights from the configs in ``bench/presets/*.json`` (speed and memory
measurements without downloading weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from bench.errors import UsageError
from bench.model.families import family_for


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
        self.family_impl = family_for(family)
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
        self._pinned: dict[str, nn.Parameter] | None = None
        #: module called for forward passes with gradients (a DDP/FSDP wrapper of ``denoiser`` under
        #: multi-process training, see bench.run.distributed); no-grad passes call ``denoiser`` directly
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
        """Conditioning [P, ...]; real pipelines use diffusers' own ``encode_prompt`` (the empty prompt ""
        is the unconditional branch, as the pipelines' default negative prompt)."""
        return Conditioning(self.family_impl.encode(self, list(prompts)))

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
            out = self.family_impl.forward(self, module, x_in, t_in, c)
        return out.float()

    def _input_dtype(self) -> torch.dtype:
        """dtype of the denoiser's base weights (not its LoRA weights): inputs are cast to it."""
        for name, p in self.denoiser.named_parameters():
            if "lora_" not in name:
                return p.dtype
        return torch.float32

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents [L, C, h, w] -> images [L, 3, H, W] float32 in [0, 1]; ``grad=True`` keeps the autograd
        graph back to the latents (direct-gradient updates; the VAE's own weights stay frozen)."""
        with torch.set_grad_enabled(grad):
            x = latents.to(self.device, torch.float32)
            if self.vae is not None:
                cfg = self.vae.config
                x = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
                x = self.vae.decode(x.to(next(self.vae.parameters()).dtype), return_dict=False)[0].float()
            return ((x + 1) / 2).clamp(0, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable denoiser parameters by name (what checkpoints and weight snapshots key on): the ones
        pinned by ``pin_trainable_parameters`` when set (sharded training), else the module's own."""
        if self._pinned is not None:
            return dict(self._pinned)
        return {n: p for n, p in self.denoiser.named_parameters() if p.requires_grad}

    def pin_trainable_parameters(self) -> None:
        """Fix the trainable parameter objects from now on. Under FSDP (bench/model/fsdp.py) the module holds
        gathered copies of some parameters between a no-grad forward and the next reshard; the
        optimizer, gradient clipping, checkpoints and snapshots must keep using the sharded ones."""
        self._pinned = {n: p for n, p in self.denoiser.named_parameters() if p.requires_grad}

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
