"""Shared plumbing of the model-based rewards: lazy loading, input checks, batching, dtype/autocast,
and the image preprocessing of CLIP-family models written for batched tensors in [0, 1].

Each reward's authors preprocess PIL images; here images arrive as ``[L, 3, H, W]`` float tensors
in [0, 1] on the policy's device, so the same operations are applied to tensors:
bicubic resize with antialiasing (what PIL's bicubic filter does when it shrinks), centre crop or
pad, per-channel normalisation. Where the original converts to 8-bit before resizing (PIL), the
resized tensor is clamped to [0, 1] as 8-bit saturation would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.types import RewardOutput

#: OpenAI CLIP normalisation constants (used by CLIP, open_clip's OpenAI/LAION models, BLIP, HPS).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"`` -> fp16 autocast on CUDA (the precision the HPS/ImageReward/PickScore authors
    evaluate with), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision where it is safe: weights stay fp32, matmuls run in ``dtype``."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_inputs(images: Tensor, prompts: Sequence[str], meta: Sequence[Mapping[str, Any]] | None) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [L, 3, H, W] tensor in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    if meta is not None and len(meta) not in (0, images.shape[0]):
        raise ValueError(f"got {images.shape[0]} images but {len(meta)} metadata entries")


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, int(batch_size))):
        yield slice(start, min(n, start + max(1, int(batch_size))))


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def resize_bicubic(x: Tensor, hw: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)


def resize_shortest_center_crop(x: Tensor, size: int | Sequence[int], clamp: bool = False) -> Tensor:
    """torchvision ``Resize(size)`` (shorter side, bicubic) + ``CenterCrop(size)`` on [B, 3, H, W]."""
    th, tw = _size2(size)
    h, w = x.shape[-2:]
    short = min(th, tw) if th == tw else None
    if short is not None:
        # torchvision: the shorter side becomes `size`, the longer one int(size * long / short)
        if h <= w:
            nh, nw = short, int(short * w / h)
        else:
            nh, nw = int(short * h / w), short
    else:
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = resize_bicubic(x, (nh, nw))
    if clamp:
        x = x.clamp(0.0, 1.0)
    top = round((nh - th) / 2.0)
    left = round((nw - tw) / 2.0)
    return x[..., top:top + th, left:left + tw]


def resize_longest_pad(x: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """HPS's ``ResizeMaxSize``: the longer side becomes ``size`` (bicubic), then centred zero padding
    to a square (left/top get the smaller half)."""
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = resize_bicubic(x, (nh, nw))
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class LazyReward:
    """Base of the model-based rewards: options, lazy load on first call, batched scoring.

    Subclasses set ``name``/``_base_version``, implement ``_locate()`` (find files, raise
    ``MissingWeightsError``; returns the list of files whose hashes identify the weights),
    ``_load()`` (build the model on ``self.device``) and ``_score(images, prompts) -> (scores,
    components)`` for one batch already on the device. A subclass whose ``_score`` is differentiable in
    the images (no detach, no PIL / numpy round trip) sets ``differentiable = True``: ``score_grad`` then
    scores with the autograd graph kept, for direct-gradient algorithms (ReFL, DRaFT-K).
    """

    name: str = "reward"
    _base_version: str = "0"
    #: ``_score`` keeps the graph back to the images (``score_grad`` is available)
    differentiable: bool = False

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16,
                 dtype: str | torch.dtype | None = "auto") -> None:
        self.device = torch.device(device)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.dtype = parse_dtype(dtype, self.device)
        self._loaded = False
        self._files: list[Any] | None = None
        self._hash: str | None = None

    # -- identity -----------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """Base version (package, variant, preprocessing) + the hash of the weight files once they
        have been found; ``+weights-missing`` while they cannot be found."""
        if self._hash is None:
            from rewards._paths import MissingWeightsError

            try:
                self._resolve()
            except MissingWeightsError:
                return f"{self._base_version}+weights-missing"
        return f"{self._base_version}+sha256:{self._hash}"

    def _resolve(self) -> None:
        if self._files is None:
            from rewards._paths import dir_sha256, file_sha256

            self._files = list(self._locate())
            parts = [dir_sha256(f) if f.is_dir() else file_sha256(f) for f in self._files]
            self._hash = parts[0] if len(parts) == 1 else "-".join(p[:8] for p in parts)

    def _locate(self) -> list:
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    def _score(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def ensure_loaded(self) -> None:
        if not self._loaded:
            self._resolve()
            self._load()
            self._loaded = True

    # -- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str],
                 meta: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        check_inputs(images, prompts, meta)
        self.ensure_loaded()
        L = images.shape[0]
        scores: list[Tensor] = []
        comps: dict[str, list[Tensor]] = {}
        for sl in chunks(L, self.batch_size):
            # clamp like the 8-bit conversion the authors' PIL pipelines start from
            x = images[sl].to(self.device, torch.float32).clamp(0.0, 1.0)
            s, c = self._score(x, list(prompts[sl]))
            scores.append(s.detach().float().cpu())
            for k, v in c.items():
                comps.setdefault(k, []).append(v.detach().float().cpu())
        out = torch.cat(scores) if scores else torch.zeros(0)
        return RewardOutput(scores=out.to(torch.float32),
                            components={k: torch.cat(v).to(torch.float32) for k, v in comps.items()})

    def score_grad(self, images: Tensor, prompts: Sequence[str],
                   meta: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        """Scores [L] float32 on the reward's device, differentiable with respect to ``images`` (the same
        preprocessing, precision and batching as ``__call__``; the reward model's own weights are frozen).
        Components are not returned: the direct-gradient loss uses the score only."""
        if not self.differentiable:
            raise NotImplementedError(f"reward {self.name!r} has no gradient path")
        check_inputs(images, prompts, meta)
        self.ensure_loaded()
        freeze_modules(self)
        out = []
        with torch.enable_grad():
            for sl in chunks(images.shape[0], self.batch_size):
                x = images[sl].to(self.device, torch.float32).clamp(0.0, 1.0)
                s, _ = self._score(x, list(prompts[sl]))
                out.append(s.float())
        return torch.cat(out) if out else images.new_zeros(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, loaded={self._loaded})"


def freeze_modules(obj: Any) -> None:
    """``requires_grad_(False)`` on every torch module held by ``obj``'s attributes (a reward model's
    weights never receive gradients when a direct-gradient update back-propagates through it)."""
    for v in vars(obj).values():
        if isinstance(v, torch.nn.Module):
            v.requires_grad_(False)


# --- transformers CLIP helpers (PickScore, aesthetic) ----------------------------------------------

def hf_clip_image_cfg(processor_dir) -> dict:
    """Resize/crop/normalise settings of a transformers CLIP image processor directory
    (``preprocessor_config.json``); OpenAI CLIP's 224-pixel defaults when the file is absent."""
    from pathlib import Path

    cfg = {"shortest": 224, "crop": (224, 224), "mean": CLIP_MEAN, "std": CLIP_STD}
    if processor_dir is None or not any((Path(processor_dir) / f).is_file()
                                        for f in ("preprocessor_config.json", "processor_config.json")):
        return cfg
    from transformers import CLIPImageProcessor

    p = CLIPImageProcessor.from_pretrained(str(processor_dir))
    size, crop = p.size, p.crop_size
    short = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    if short is None:
        raise NotImplementedError(f"{processor_dir}: only shortest-edge CLIP preprocessing is implemented")
    ch = crop.get("height") if hasattr(crop, "get") else crop.height
    cw = crop.get("width") if hasattr(crop, "get") else crop.width
    if int(getattr(p, "resample", 3)) != 3:  # PIL BICUBIC
        raise NotImplementedError(f"{processor_dir}: only bicubic resizing is implemented")
    cfg.update(shortest=int(short), crop=(int(ch), int(cw)), mean=tuple(p.image_mean), std=tuple(p.image_std))
    if not getattr(p, "do_center_crop", True):
        raise NotImplementedError(f"{processor_dir}: CLIP preprocessing without centre crop")
    return cfg


def hf_clip_preprocess(images: Tensor, cfg: dict) -> Tensor:
    """CLIPImageProcessor on tensors: shorter side -> ``shortest`` (bicubic), centre crop, normalise."""
    short, (ch, cw) = cfg["shortest"], cfg["crop"]
    h, w = images.shape[-2:]
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    x = resize_bicubic(images, (nh, nw)).clamp(0.0, 1.0)
    top, left = round((nh - ch) / 2.0), round((nw - cw) / 2.0)
    if top < 0 or left < 0:
        x = F.pad(x, (max(0, -left), max(0, -left), max(0, -top), max(0, -top)))
        top, left = max(0, top), max(0, left)
    return normalize(x[..., top:top + ch, left:left + cw], cfg["mean"], cfg["std"])


def hf_clip_image_embeds(model, pixels: Tensor) -> Tensor:
    """``CLIPModel.get_image_features`` (projected pooled vision output), [B, P]."""
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def hf_clip_text_embeds(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``CLIPModel.get_text_features`` (projected pooled text output), [B, P]."""
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
    return model.text_projection(out.pooler_output)
