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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from bench.registry import UsageError

TREEBENCH_CLASS = "TreebenchPipeline"


class MissingWeightsError(UsageError):
    """Model or reward weights were not found locally; the message names the paths looked for."""


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
    denoiser:      the trainable module (SD3 transformer or UNet), possibly LoRA-wrapped
    latent_shape:  (C, h, w)
    """

    def __init__(self, *, denoiser: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                 vae: nn.Module | None, meta: dict[str, Any], path: Path, device: torch.device,
                 autocast_dtype: torch.dtype | None = None):
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = vae
        self.meta = meta
        self.path = path
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.prediction: str = meta.get("prediction", "flow")
        res = int(meta["resolution"])
        C = int(meta.get("latent_channels", 3))
        down = int(meta.get("vae_scale_factor", 1)) if vae is not None else 1
        self.resolution = res
        self.latent_shape = (C, res // down, res // down)
        self.max_length = int(meta.get("max_length", 77))
        self._empty: Conditioning | None = None
        self._is_unet = type(denoiser).__name__.startswith("UNet") or hasattr(denoiser, "conv_in")
        self.text_encoder.requires_grad_(False)
        if self.vae is not None:
            self.vae.requires_grad_(False)

    # ---- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
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
        """Model output [B, C, h, w] (float32) for latents x [B, C, h, w] at timesteps [B]."""
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        dtype = next(self.denoiser.parameters()).dtype
        with ctx:
            x_in = x.to(self.device, dtype)
            t_in = timestep.to(self.device)
            c = {k: v.to(self.device, dtype) for k, v in cond.tensors.items()}
            if self._is_unet:
                out = self.denoiser(sample=x_in, timestep=t_in, encoder_hidden_states=c["encoder_hidden_states"],
                                    return_dict=False)[0]
            else:
                out = self.denoiser(hidden_states=x_in, timestep=t_in, return_dict=False, **c)[0]
        return out.float()

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
        self.denoiser.train(mode)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Context in which ``predict`` evaluates the frozen reference (LoRA adapters disabled)."""
        disable = getattr(self.denoiser, "disable_adapter", None)
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


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu",
                autocast_dtype: torch.dtype | None = None) -> Policy:
    """Load a pipeline directory into a ``Policy`` (text encoder and VAE frozen, denoiser trainable)."""
    path = Path(path)
    index = read_model_index(path)
    _quiet_libraries()
    cls = index.get("_class_name")
    if cls != TREEBENCH_CLASS:
        raise NotImplementedError(
            f"{path}: pipelines of class {cls!r} are not supported by this loader yet; supported: "
            f"{TREEBENCH_CLASS!r} (the embedded and tiny models)")
    device = torch.device(device)
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
    for m in (denoiser, comps["text_encoder"], comps.get("vae")):
        if m is not None:
            m.to(device).eval()
    denoiser.requires_grad_(True)
    return Policy(denoiser=denoiser, text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                  scheduler=comps["scheduler"], vae=comps.get("vae"), meta=index.get("treebench", {}),
                  path=path, device=device, autocast_dtype=autocast_dtype)


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the safetensors files of a pipeline directory (first 16 hex digits), for manifests."""
    h = hashlib.sha256()
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
