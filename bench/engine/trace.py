"""The call trace: every call of an expensive component, recorded where it is made.

The rollout engine records denoiser calls (rollout, ``logp`` in the update, the reference pass for KL,
evaluation), VAE decodes and prompt encodings; the runner records reward scoring and optimizer steps.
Direct-gradient algorithms (ReFL, DRaFT-K) also decode and score with gradients inside the update: the
engine records those as ``vae_decode_backward`` and ``reward_backward`` (forward and backward of the
decoder / the reward model on ``rows`` images), so their cost is in the same trace.
A :class:`Call` says which component ran, on how many rows, with or without gradients, with gradient
checkpointing on or off, and in which phase. ``bench.engine.pricing`` prices a trace with a measured cost profile;
``bench.cost.estimate`` produces the same trace without loading any weights (a test checks both agree).

Rows are input rows of one call: a classifier-free-guided denoiser evaluation of one latent is 2 rows
(``per_eval`` = 2), an unguided one 1; for the VAE and the reward a row is one image, for the text
encoder one prompt.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from bench.rundir.layout import TRACE

#: Call kinds, the keys of a cost profile's tables (docs/COST.md).
DENOISER_KINDS = ("forward", "forward_backward", "forward_backward_checkpointed")
KINDS = (*DENOISER_KINDS, "vae_decode", "text_encode", "reward", "optimizer_step", "vae_decode_backward",
         "reward_backward")
#: Phases of a training iteration that hold calls ("advantage" makes none), plus evaluation.
TRAIN_PHASES = ("rollout", "reward", "update")


@dataclass(frozen=True)
class Call:
    """One call of an expensive component.

    kind:          a KINDS entry (what a cost profile prices)
    rows:          input rows of the call (see the module docstring)
    phase:         "rollout" | "reward" | "update" | "eval"
    component:     "denoiser", "vae", "text_encoder", "optimizer" or the reward's name
    grad:          the call builds a graph that the update back-propagates through
    checkpointing: gradient checkpointing was on for that backward
    per_eval:      rows per evaluated item (2 for a CFG-guided denoiser evaluation, else 1)
    role:          "policy", or "reference" for the frozen reference's pass (KL term)
    """

    kind: str
    rows: int
    phase: str
    component: str = "denoiser"
    grad: bool = False
    checkpointing: bool = False
    per_eval: int = 1
    role: str = "policy"

    def as_list(self) -> list[Any]:
        return [self.kind, self.rows, self.phase, self.component, self.grad, self.checkpointing, self.per_eval,
                self.role]

    @classmethod
    def from_list(cls, v: Sequence[Any]) -> "Call":
        return cls(*v)


def denoiser_kind(grad: bool, checkpointing: bool) -> str:
    if not grad:
        return "forward"
    return "forward_backward_checkpointed" if checkpointing else "forward_backward"


class CallRecorder:
    """Collects calls in order; the runner drains it once per iteration and once per evaluation."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def denoiser(self, rows: int, *, phase: str, grad: bool, checkpointing: bool, per_eval: int,
                 role: str = "policy") -> None:
        self.calls.append(Call(denoiser_kind(grad, checkpointing), int(rows), phase, "denoiser", bool(grad),
                               bool(grad and checkpointing), int(per_eval), role))

    def record(self, kind: str, rows: int, phase: str, component: str, grad: bool = False) -> None:
        self.calls.append(Call(kind, int(rows), phase, component, bool(grad)))

    def drain(self) -> list[Call]:
        out, self.calls = self.calls, []
        return out

    @contextlib.contextmanager
    def ignoring(self) -> Iterator[None]:
        """Calls made inside are bookkeeping, not work of the run, and are dropped: e.g. the zero-learning-rate
        ``optimizer.step()`` with which torch.distributed.checkpoint creates an empty optimizer's state before
        loading or reading it (a sharded resume would otherwise log one optimizer step too many)."""
        n = len(self.calls)
        try:
            yield
        finally:
            del self.calls[n:]


def record_reward(recorder: CallRecorder, name: str, rows: int, phase: str) -> None:
    """One call of a reward model on ``rows`` images (a weighted reward is one call of the combination)."""
    recorder.record("reward", rows, phase, str(name))


def attach_optimizer(optimizer: Any, recorder: CallRecorder) -> None:
    """Record every optimizer step (a torch optimizer's step post-hook)."""
    optimizer.register_step_post_hook(lambda opt, args, kwargs: recorder.record("optimizer_step", 1, "update",
                                                                                "optimizer"))


def summarize(calls: Iterable[Call]) -> dict[str, int]:
    """Calls and rows per kind: ``trace/<kind>/calls``, ``trace/<kind>/rows`` (kinds that occurred),
    plus ``trace/reference_forward/calls`` and ``/rows`` for the KL reference pass (a subset of forward)."""
    n: Counter = Counter()
    r: Counter = Counter()
    for c in calls:
        n[c.kind] += 1
        r[c.kind] += c.rows
        if c.role == "reference":
            n["reference_forward"] += 1
            r["reference_forward"] += c.rows
    out: dict[str, int] = {}
    for k in sorted(n):
        out[f"trace/{k}/calls"] = n[k]
        out[f"trace/{k}/rows"] = r[k]
    return out


def nfe(calls: Iterable[Call]) -> int:
    """Denoiser forward passes in the NFE convention (rows of rollout and update denoiser calls)."""
    return sum(c.rows for c in calls if c.component == "denoiser" and c.phase in ("rollout", "update"))


class TraceWriter:
    """``trace.jsonl`` in a run directory: one line per iteration with its full call list (``run.trace``)."""

    def __init__(self, out_dir: Path, resume_iteration: int | None = None,
                 kept_evals: Iterable[int] = ()):
        """On resume, the lines of the iterations a resume recomputes are dropped: training iterations from
        ``resume_iteration`` on, and evaluations not among ``kept_evals`` (the iterations of the
        evaluations the checkpoint carries; one at ``resume_iteration`` may or may not be among them)."""
        self.path = Path(out_dir) / TRACE
        if resume_iteration is not None and self.path.is_file():
            kept, keep = set(kept_evals), []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # a torn last line
                it = rec.get("iteration", resume_iteration)
                if (it in kept) if rec.get("stage") == "eval" else (it < resume_iteration):
                    keep.append(line)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in keep))
            os.replace(tmp, self.path)
        elif resume_iteration is None and self.path.exists():
            self.path.unlink()

    def write(self, iteration: int, calls: Sequence[Call], stage: str = "train") -> None:
        from bench.rundir import failpoints

        with open(self.path, "a") as f:
            failpoints.hit("trace", self.path)
            f.write(json.dumps({"iteration": iteration, "stage": stage, "fields": list(asdict(calls[0]))
                                if calls else [], "calls": [c.as_list() for c in calls]}) + "\n")


def read_trace(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``trace.jsonl`` with ``calls`` as :class:`Call` objects."""
    out = []
    for line in (Path(run_dir) / TRACE).read_text().splitlines():
        rec = json.loads(line)
        rec["calls"] = [Call.from_list(v) for v in rec["calls"]]
        out.append(rec)
    return out
