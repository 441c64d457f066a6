"""Cheap toy rewards (as in DDPO, Black et al. 2023, arXiv:2305.13301): for tests and smoke runs.

- ``brightness``: mean pixel value of the image in [0, 1].
- ``jpeg_compressibility``: DDPO's compressibility reward, the negative size in kB of the image saved
  as JPEG at quality 95 with PIL (DDPO ``jpeg_compressibility``; higher = more compressible).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bench.types import RewardOutput


def _check(images: torch.Tensor, prompts: Sequence[str], name: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} expects images [L, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name} got {images.shape[0]} images but {len(prompts)} prompts")


class Brightness:
    """Mean pixel value in [0, 1]."""

    name = "brightness"
    version = "1"
    differentiable = True  # score_grad (direct-gradient algorithms)

    def __init__(self, device: str = "cpu", **options: Any):
        if options:
            raise ValueError(f"brightness takes no options, got {sorted(options)}")
        self.device = device

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 meta: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        _check(images, prompts, self.name)
        scores = images.detach().float().clamp(0, 1).mean(dim=(1, 2, 3)).cpu()
        return RewardOutput(scores=scores.to(torch.float32))

    def score_grad(self, images: torch.Tensor, prompts: Sequence[str],
                   meta: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """The same score, differentiable with respect to ``images``."""
        _check(images, prompts, self.name)
        return images.float().clamp(0, 1).mean(dim=(1, 2, 3))


class JpegCompressibility:
    """Negative JPEG size in kB (quality 95)."""

    name = "jpeg_compressibility"
    version = "1"

    def __init__(self, device: str = "cpu", quality: int = 95, **options: Any):
        if options:
            raise ValueError(f"jpeg_compressibility takes only 'quality', got {sorted(options)}")
        self.device = device
        self.quality = int(quality)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 meta: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        from PIL import Image

        _check(images, prompts, self.name)
        arr = (images.detach().float().clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1) * 255).round()
        sizes = []
        for a in arr.astype(np.uint8):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return RewardOutput(scores=-torch.tensor(sizes, dtype=torch.float32))
