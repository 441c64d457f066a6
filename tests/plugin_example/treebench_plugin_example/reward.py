"""A reward outside treebench: how red an image is (mean red minus mean of green and blue, in [-1, 1])."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from bench.types import RewardOutput


class Redness:
    """The ``Reward`` contract: ``name``, ``version``, constructed as ``Redness(device=..., **options)``,
    called on images [L, 3, H, W] in [0, 1] with their prompts and metadata, returns float32 scores [L]."""

    name = "example_redness"
    version = "1"

    def __init__(self, device: Any = "cpu", weight: float = 1.0):
        self.weight = float(weight)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 meta: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        red = images[:, 0].mean(dim=(1, 2))
        others = images[:, 1:].mean(dim=(1, 2, 3))
        return RewardOutput((self.weight * (red - others)).float(), {"red": red.float()})
