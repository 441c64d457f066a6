"""Every random draw comes from a generator derived from (seed, iteration, stage).

Stages are short strings ("prompts", "noise", "plan", "update", "eval", ...). Derivation is a stable
hash, so adding a stage never shifts the draws of another, and the same config + seed gives the same
run on CPU regardless of micro-batching.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, iteration: int, stage: str) -> int:
    """A 63-bit seed from (seed, iteration, stage), stable across processes and platforms."""
    h = hashlib.blake2b(f"{int(seed)}/{int(iteration)}/{stage}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(seed: int, iteration: int, stage: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch generator for one stage of one iteration (CPU by default: draws on CPU and moves
    the result, so CPU and GPU runs sample the same noise)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, iteration, stage))
    return g


def numpy_rng(seed: int, iteration: int, stage: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, iteration, stage))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (for library code that draws from them, e.g. weight init)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
