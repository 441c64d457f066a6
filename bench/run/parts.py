"""What the stages around the loop (evaluation ``bench.run.evaluation``, the start and the finish
``bench.run.finish``) use of a run: ``RunParts``, the run's spec, the parts built from it and its state.

``bench.run.runner.Run`` is the one implementation. It is a Protocol, not the class itself, because the
runner imports those modules: naming ``Run`` there would make the import graph cyclic. Everything is typed
by the real classes, so a checker sees every member these modules touch; the part of a run that checkpoints
save and restore is a ``bench.rundir.state.CheckpointParts``, its progress a ``bench.rundir.state.RunState``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from bench.engine.flops import ModelCounts
from bench.engine.prompts import PromptSet
from bench.engine.rollout import RolloutEngine
from bench.model.policy import Conditioning, Policy
from bench.protocols import Algorithm, Reward
from bench.run.distributed import Dist, NullLog
from bench.run.trackers import Trackers
from bench.rundir.runlog import RunLog
from bench.rundir.state import CheckpointParts, RunState
from bench.spec import RunSpec
from bench.types import PromptBatch


class RunParts(Protocol):
    spec: RunSpec
    out: Path                            # the run directory
    device: torch.device                 # this rank's device
    dist: Dist                           # one process, or this rank of a data-parallel launch
    policy: Policy
    engine: RolloutEngine
    algo: Algorithm
    reward: Reward                       # the training reward
    eval_rewards: dict[str, Reward]      # every held-out reward by name (the training reward among them)
    train_prompts: PromptSet
    eval_prompts: PromptSet
    eval_batch: PromptBatch              # the first eval.num_prompts eval prompts
    eval_conditioning: Conditioning | None  # their encoding, made by the first evaluation and reused
    log: RunLog | NullLog                # the run directory's writer (rank 0) or nothing
    trackers: Trackers
    arith: dict[str, Any]                # one iteration's batch arithmetic (bench.engine.arithmetic)
    counts: ModelCounts | None           # FLOPs per call kind (None: not counted)
    flops_info: dict[str, Any]           # how they were counted, and the peak FLOP/s MFU divides by
    state: RunState                      # what the run has done so far, and how it ended
    checkpointed: CheckpointParts        # what a checkpoint saves and restores

    def drain_calls(self, iteration: int, stage: str = "train") -> dict[str, Any]: ...
