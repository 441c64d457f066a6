"""Failpoints: named places where a write (or the reward call) can be made to fail on purpose.

Switched on by the environment variable ``TREEBENCH_FAILPOINTS`` (read at import) or by ``set_failpoints``
(the tests' ``failpoints`` fixture)::

    TREEBENCH_FAILPOINTS="checkpoint.rename=enospc@2"          # the 2nd hit only
    TREEBENCH_FAILPOINTS="log.iterations=eio@3+,final=eacces"   # the 3rd hit and every later one; every hit

Faults: ``crash`` (the process exits at once with status ``CRASH_STATUS``, like ``kill -9``: nothing is
cleaned up), ``enospc``, ``eio``, ``eacces``, ``efbig`` (an ``OSError`` with that errno, as the system would
raise; ``efbig`` is a file-size limit, ``ulimit -f``).
A write site may first write part of its data (``partial``), as a real full disk does.

When no failpoint is set, ``hit`` costs one dict lookup. The names are ``NAMES`` (docs/ERRORS.md).
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from typing import Callable

#: every failpoint, where it fires
NAMES = {
    "log.iterations": "appending a record to iterations.jsonl",
    "log.evals": "appending a record to evals.jsonl",
    "log.eval_scores": "appending an evaluation's per-image scores to eval_scores.jsonl",
    "log.rewrite": "rewriting iterations.jsonl / evals.jsonl / eval_scores.jsonl on resume (temporary file)",
    "manifest": "writing manifest.json (temporary file)",
    "final": "writing final.json (temporary file)",
    "checkpoint.policy": "writing policy.safetensors of a checkpoint",
    "checkpoint.optimizer": "writing optimizer.safetensors of a checkpoint",
    "checkpoint.rng": "writing rng.safetensors of a checkpoint",
    "checkpoint.state": "writing state.json of a checkpoint",
    "checkpoint.meta": "writing meta.json of a checkpoint",
    "checkpoint.rename": "renaming a complete checkpoint into place",
    "checkpoint.prune": "deleting old checkpoints",
    "samples.grid": "writing an evaluation's sample grid PNG",
    "trace": "appending to trace.jsonl (run.trace)",
    "reward": "calling the reward model",
    "sweep.storage": "writing a sweep's results (trials.csv, pareto.csv, sweep.json)",
    "sweep.journal": "appending to a sweep's Optuna journal file (the default storage)",
    "lock": "writing the lock file .lock of a run, comparison or sweep directory",
    "compare.options": "writing compare.json of a comparison directory",
    "report": "writing a report PDF (bench compare, bench report; a temporary file, renamed)",
}
FAULTS = {"crash": None, "enospc": errno.ENOSPC, "eio": errno.EIO, "eacces": errno.EACCES, "efbig": errno.EFBIG}
CRASH_STATUS = 86
ENV = "TREEBENCH_FAILPOINTS"


@dataclass
class Failpoint:
    fault: str
    at: int = 1           # the hit (1-based) that fires
    onward: bool = True   # and every later hit
    hits: int = 0


def parse(spec: str) -> dict[str, Failpoint]:
    """``name=fault[@n[+]]`` separated by commas; no ``@``: every hit."""
    out: dict[str, Failpoint] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        fault, _, at = rest.partition("@")
        if not sep or name not in NAMES or fault not in FAULTS:
            raise ValueError(f"{ENV}: bad failpoint {part!r}: write NAME=FAULT[@N[+]] with NAME one of "
                             f"{', '.join(NAMES)} and FAULT one of {', '.join(FAULTS)}")
        if at:
            n = at.rstrip("+")
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"{ENV}: bad hit number in {part!r} (N >= 1, N+ for every hit from N)")
            out[name] = Failpoint(fault, int(n), at.endswith("+"))
        else:
            out[name] = Failpoint(fault)
    return out


_ACTIVE: dict[str, Failpoint] = parse(os.environ.get(ENV, ""))


def set_failpoints(spec: str | dict[str, Failpoint]) -> None:
    """Replace the active failpoints (``""``: none)."""
    global _ACTIVE
    _ACTIVE = parse(spec) if isinstance(spec, str) else dict(spec)


def hit(name: str, path: object = None, partial: Callable[[], object] | None = None) -> None:
    """Fire failpoint ``name`` if it is set and due: ``partial`` (part of the write) first, then the fault."""
    fp = _ACTIVE.get(name)
    if fp is None:
        return
    fp.hits += 1
    if fp.hits < fp.at or (fp.hits > fp.at and not fp.onward):
        return
    if partial is not None:
        partial()
    code = FAULTS[fp.fault]
    if code is None:
        sys.stderr.write(f"failpoint {name}: crash\n")
        sys.stderr.flush()
        os._exit(CRASH_STATUS)
    raise OSError(code, f"{os.strerror(code)} (failpoint {name})", None if path is None else str(path))
