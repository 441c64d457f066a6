"""Weighted sums of rewards: ``--reward hpsv2=1.0,clip_score=1.0`` (TreeGRPO's HPSv2.1 + CLIPScore).

``WeightedSum`` is itself a reward. Score = sum_i w_i * s_i, where s_i is part i's score, or, with
``normalize="zscore"``, part i's score standardised over the batch, (s_i - mean(s_i)) / std(s_i)
(population std; a part with zero spread contributes 0), so that rewards on different scales
(HPS ~0.3, PickScore ~20) weigh what their weights say. Every part's raw score is logged as a
component under its name, and each part's own components as ``"<name>/<component>"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bench.types import RewardOutput

NORMALIZE = ("none", "zscore")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``"hpsv2=1.0,clip_score=0.5"`` -> ``[("hpsv2", 1.0), ("clip_score", 0.5)]``.

    A bare name means weight 1.0 (``"hpsv2"`` -> ``[("hpsv2", 1.0)]``). Raises ``ValueError`` with the
    offending item on empty items, missing names, non-numeric or non-finite weights, or repeats.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty reward spec; expected e.g. 'hpsv2=1.0,clip_score=0.5'")
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i, item in enumerate(spec.split(",")):
        item = item.strip()
        if not item:
            raise ValueError(f"reward spec {spec!r}: item {i + 1} is empty (stray comma?)")
        name, eq, weight = (s.strip() for s in item.partition("="))
        if not name:
            raise ValueError(f"reward spec {spec!r}: item {item!r} has no reward name before '='")
        if not _NAME.match(name):
            raise ValueError(f"reward spec {spec!r}: {name!r} is not a valid reward name")
        if eq:
            try:
                w = float(weight)
            except ValueError:
                raise ValueError(f"reward spec {spec!r}: weight {weight!r} of {name!r} is not a number "
                                 f"(write {name}=0.5)") from None
            if not math.isfinite(w):
                raise ValueError(f"reward spec {spec!r}: weight of {name!r} must be finite, got {weight!r}")
        else:
            w = 1.0
        if name in seen:
            raise ValueError(f"reward spec {spec!r}: {name!r} appears twice")
        seen.add(name)
        out.append((name, w))
    return out


def format_reward_spec(parts: Sequence[tuple[str, float]]) -> str:
    return ",".join(f"{n}={float(w)!r}" for n, w in parts)


class WeightedSum:
    """A reward made of weighted parts: ``WeightedSum([("hpsv2", 1.0, hps), ("clip_score", 1.0, clip)])``."""

    def __init__(self, parts: Sequence[tuple[str, float, Any]], normalize: str = "none") -> None:
        if not parts:
            raise ValueError("WeightedSum needs at least one part")
        if normalize not in NORMALIZE:
            raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZE)}")
        names = [n for n, _, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"WeightedSum parts must have distinct names, got {names}")
        for n, w, r in parts:
            if not callable(r):
                raise TypeError(f"part {n!r} is not a reward (not callable)")
            if not math.isfinite(float(w)):
                raise ValueError(f"weight of {n!r} must be finite, got {w!r}")
        self.parts = [(str(n), float(w), r) for n, w, r in parts]
        self.normalize = normalize
        self.name = format_reward_spec([(n, w) for n, w, _ in self.parts])

    @classmethod
    def from_spec(cls, spec: str, make: Callable[[str], Any], normalize: str = "none") -> WeightedSum:
        """Build from ``"a=1.0,b=0.5"`` with ``make(name) -> reward``."""
        return cls([(n, w, make(n)) for n, w in parse_reward_spec(spec)], normalize=normalize)

    @property
    def version(self) -> str:
        """The parts' versions (they change when a part's weights are found/loaded) and the options."""
        inner = ";".join(f"{n}={w!r}@{getattr(r, 'version', '?')}" for n, w, r in self.parts)
        return f"weighted[{self.normalize}]({inner})"

    @staticmethod
    def _zscore(s: Tensor) -> Tensor:
        std = s.std(unbiased=False) if s.numel() > 1 else s.new_zeros(())
        return (s - s.mean()) / std if std > 0 else torch.zeros_like(s)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str],
                 meta: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        total: Tensor | None = None
        comps: dict[str, Tensor] = {}
        for name, w, reward in self.parts:
            out = reward(images, prompts, meta)
            s = out.scores.detach().to(torch.float32).cpu()
            comps[name] = s
            for k, v in out.components.items():
                comps[f"{name}/{k}"] = v.detach().to(torch.float32).cpu()
            term = w * (self._zscore(s) if self.normalize == "zscore" else s)
            total = term if total is None else total + term
        return RewardOutput(scores=total.to(torch.float32), components=comps,
                            weights={name: w for name, w, _ in self.parts})

    @property
    def differentiable(self) -> bool:
        """A gradient path exists when every part has one and the sum is unnormalised (a z-score over the
        batch would depend on how the update splits it)."""
        return self.normalize == "none" and all(getattr(r, "differentiable", False) for _, _, r in self.parts)

    def score_grad(self, images: Tensor, prompts: Sequence[str],
                   meta: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        """sum_i w_i score_i, differentiable with respect to ``images`` (see ``differentiable``)."""
        if not self.differentiable:
            raise NotImplementedError(f"reward {self.name!r} has no gradient path (every part needs one and "
                                      f"reward.normalize must be none)")
        total: Tensor | None = None
        for _, w, reward in self.parts:
            s = reward.score_grad(images, prompts, meta).to(torch.float32)
            term = w * s.to(total.device) if total is not None else w * s
            total = term if total is None else total + term
        assert total is not None
        return total

    def __repr__(self) -> str:
        return f"WeightedSum({self.name!r}, normalize={self.normalize!r})"
