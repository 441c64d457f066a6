"""A run's state as the run directory sees it: what it has done so far (``RunState``: checkpoints carry it,
resume restores it, final.json reports it) and the parts a checkpoint saves and restores
(``CheckpointParts``).

These are declared here, below the run in the layering (tests/test_layering.py), so checkpoints and resume
(``bench.rundir.resume``) take typed arguments without importing the run: ``bench.run.runner.Run`` holds a
``RunState`` and builds its ``CheckpointParts`` once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from bench.budget import Totals
from bench.model.policy import Policy
from bench.model.snapshots import WeightSnapshots


@dataclass
class RunState:
    """What a run has done so far, and how it ended."""

    totals: Totals = field(default_factory=Totals)
    evals: list[dict[str, Any]] = field(default_factory=list)  # every evaluation record (evals.jsonl)
    last_checkpoint: int | None = None       # iterations done at the newest checkpoint written or restored
    checkpoint_seconds: float = 0.0          # spent writing checkpoints (outside the budget)
    wall_before: float = 0.0                 # wall seconds of earlier processes (resumed runs)
    wall0: float = field(default_factory=time.perf_counter)
    in_update: bool = False                  # inside advantages/update: the state is not checkpointable
    final_record: dict[str, Any] | None = None  # final.json, once written
    write_fault: OSError | None = None       # a write fault seen while finishing (final eval, final.json)
    final_fault: OSError | None = None       # final.json could not be written

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall0


class Stateful(Protocol):
    """An algorithm's own state in a checkpoint (``bench.protocols.Algorithm`` has these two methods)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class CheckpointParts:
    """What a checkpoint saves of a run besides its ``RunState``, and restores into it, with the settings
    the checkpoint functions read."""

    out: Path                          # the run directory
    config: Mapping[str, Any]          # the resolved config the state is computed with (stored, compared on resume)
    policy: Policy                     # its trainable parameters
    snapshots: WeightSnapshots         # the algorithm's weight snapshots (bench.model.snapshots)
    optimizer: torch.optim.Optimizer
    algo: Stateful
    optimizer_settings: Mapping[str, Any]  # lr, betas, eps, weight_decay of the config (checked after loading)
    keep: int                          # run.keep_checkpoints
    is_main: bool                      # rank 0 writes; other ranks only restore
    sharded: bool                      # an FSDP-sharded denoiser: every rank gathers its shards for rank 0
    #: a context in which the engine's call recorder drops what it sees (CallRecorder.ignoring): the zero-lr
    #: optimizer step torch takes when a sharded optimizer state is gathered or loaded is not the run's work
    ignoring_calls: Callable[[], AbstractContextManager[None]]
