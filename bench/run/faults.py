"""Faults during a run (docs/ERRORS.md): clean stops on SIGINT/SIGTERM, NaN/inf batches never applied,
out-of-memory turned into advice, write faults (disk full, I/O error, permission) into what was kept and
how to continue."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, TypeGuard

import torch

from bench.errors import NonFiniteGrad, OutOfMemory, WriteFault
from bench.rundir.layout import FINAL, ITERATIONS, MANIFEST
from bench.types import RewardOutput, Rollout

#: where a non-finite value was seen -> how messages name it
NONFINITE_WHAT = {"reward": "rewards", "logp": "rollout log-probs", "grad": "gradients", "loss": "loss statistics"}


class StopFlag:
    """Set by a signal handler; the runner checks it at phase boundaries (``bench.errors.Interrupted``)."""

    def __init__(self) -> None:
        self.signal: str | None = None  # name of the signal asking for a clean stop


@contextlib.contextmanager
def stop_signals(flag: StopFlag):
    """SIGINT/SIGTERM ask for a clean stop: the run finishes the current phase (or the update, once
    started), writes a checkpoint and stops with reason "interrupted". A second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if flag.signal is not None:
            raise KeyboardInterrupt
        flag.signal = name
        print(f"\n{name}: stopping cleanly after the current phase and writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def refuse_nonfinite_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Optimizer pre-step hook: NaN/inf gradients never reach the weights."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # one bool per gradient: for a sharded gradient (bench/model/fsdp.py) it is the global answer of every rank
    if grads and not all(bool(torch.isfinite(g).all()) for g in grads):
        raise NonFiniteGrad("non-finite gradient")


def nonfinite_inputs(rewards: RewardOutput, rollout: Rollout) -> str | None:
    """"reward" or "logp" when the batch cannot be trained on, else None."""
    logp = rollout.logp_old[rollout.trainable]
    if not bool(torch.isfinite(rewards.scores).all()):
        return "reward"
    if logp.numel() and not bool(torch.isfinite(logp).all()):
        return "logp"
    return None


def report_nonfinite(where: str, iteration: int, stop: bool, last_checkpoint: int | None) -> None:
    what = NONFINITE_WHAT[where]
    if stop:
        print(f"error: NaN/inf in the {what} of iteration {iteration}; stopping (stop_reason nonfinite). The "
              f"weights were not updated with it; the last checkpoint "
              f"({last_checkpoint if last_checkpoint is not None else 'none'}) is valid. Set "
              f"run.on_nonfinite=skip to skip such batches.", file=sys.stderr, flush=True)
    else:
        print(f"warning: NaN/inf in the {what} of iteration {iteration}; batch skipped "
              f"(run.on_nonfinite=skip)", file=sys.stderr, flush=True)


def oom_failure(e: BaseException, *, device: Any, iteration: int, micro_batch: int, prompts_per_iteration: int,
                out: Any, resumable: bool) -> OutOfMemory:
    """The device ran out of memory: which settings lower memory, and how to continue."""
    failure = OutOfMemory(
        f"out of memory on {device} at iteration {iteration} ({str(e).splitlines()[0][:200]}).\n"
        f"  Lower train.micro_batch (now {micro_batch} rows per denoiser call, e.g. --set "
        f"train.micro_batch={max(1, micro_batch // 2)}): it changes memory, not results, and may be "
        f"changed on --resume.\n  Or lower train.prompts_per_iteration (now {prompts_per_iteration}; this "
        f"changes the algorithm's batch) or use model.mixed_precision=bf16."
        + (f"\n  The run can continue from its last checkpoint: bench run --resume {out} --set "
           f"train.micro_batch=N" if resumable else ""))
    failure.__cause__ = e
    return failure


# ---- write faults: disk full, I/O error, permission denied ----------------------------------------------
#: errno values that mean "the run directory cannot be written" (not a bug of treebench)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
_ADVICE = {errno.ENOSPC: "free space on the file system holding", errno.EDQUOT: "free space (quota) for",
           errno.EIO: "check the disk (I/O error) holding", errno.EACCES: "restore write permission on",
           errno.EPERM: "restore write permission on", errno.EROFS: "remount read-write the file system holding",
           errno.EFBIG: "free space or raise the file size limit for"}


def is_write_fault(e: BaseException | None) -> TypeGuard[OSError]:
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def describe_oserror(e: OSError) -> str:
    """"No space left on device (ENOSPC)": the errno in words and by name."""
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{os.strerror(e.errno) if e.errno else e} ({name})"


def write_failure(e: OSError, out: Path, *, last_checkpoint: int | None, final_fault: OSError | None) -> WriteFault:
    """The message of a run stopped by a write fault: what failed, what was kept, how to continue."""
    from bench.rundir.checkpoint import step_dir
    from bench.rundir.resume import read_jsonl

    where = e.filename or f"a file in {out}"
    lines = [f"could not write {where}: {describe_oserror(e)}; the run stopped."]
    if not (out / MANIFEST).is_file():
        lines.append(f"  nothing was kept: {out} has no manifest.json yet, so there is nothing to resume.")
        lines.append(f"  to continue: {_ADVICE.get(e.errno, 'fix')} {out}, then start the run again with the "
                     f"same options and --overwrite (it replaces {out}).")
        return _chained(WriteFault("\n".join(lines)), e)
    try:
        logged, _ = read_jsonl(out / ITERATIONS)
        kept = f"{len(logged)} iteration(s) logged in {out / ITERATIONS}"
    except OSError as e2:
        kept = f"iterations.jsonl unreadable ({describe_oserror(e2)})"
    ck = step_dir(out, last_checkpoint) if last_checkpoint is not None else None
    if ck is not None and (ck / "meta.json").is_file():
        kept += f"; last good checkpoint {ck} (after iteration {last_checkpoint - 1})"
        resume_from = f"resume continues from iteration {last_checkpoint}"
    else:
        kept += "; no checkpoint yet"
        resume_from = "resume starts again from iteration 0"
    lines.append(f"  kept: {kept}.")
    if final_fault is not None:
        lines.append(f"  final.json was not written ({describe_oserror(final_fault)}).")
    elif (out / FINAL).is_file():
        lines.append("  final.json records the stop (stop_reason error).")
    lines.append(f"  to continue: {_ADVICE.get(e.errno, 'fix')} {out}, then run:  bench run --resume {out}"
                 f"\n  ({resume_from}; later iterations are recomputed exactly)")
    return _chained(WriteFault("\n".join(lines)), e)


def _chained(failure: WriteFault, cause: BaseException) -> WriteFault:
    failure.__cause__ = cause
    return failure
