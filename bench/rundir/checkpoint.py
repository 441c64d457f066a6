"""Checkpoints and exact resume.

A checkpoint is a directory ``RUN/checkpoints/step_<n:06d>/`` holding the state after ``n`` completed
training iterations::

    policy.safetensors      trainable denoiser weights (LoRA adapters only, when LoRA is on)
    optimizer.safetensors   every tensor of the optimizer state (Adam moments, step counters)
    rng.safetensors         torch CPU generator state and one state per CUDA device
    state.json              iteration, budget totals, evaluations so far, algorithm ``state_dict``,
                            the non-tensor optimizer state, Python / NumPy RNG states, wall and checkpoint seconds
    meta.json               format version, iteration, size and sha256 of every file above

Nothing is pickled: tensors go to safetensors, everything else to JSON; loading never unpickles.
Writes are atomic: everything goes to a temporary directory, each file is fsynced, ``meta.json`` is
written last, then the directory is renamed into place and its parent fsynced. A checkpoint whose
``meta.json`` is missing or whose files do not match their recorded sha256 is corrupt; resume then
falls back to the previous one with a warning. The last ``run.keep_checkpoints`` are kept.

What a resumed run may change, and how it continues from a checkpoint, is ``bench.rundir.resume``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.errors import CheckpointError, UsageError
from bench.rundir import failpoints
from bench.rundir.layout import CHECKPOINTS

FORMAT_VERSION = 1
CHECKPOINT_DIR = CHECKPOINTS  # the run directory layout's name (bench.rundir.layout)
_PREFIX = "step_"
TMP_PREFIX = ".tmp_"  # temporary checkpoint directories (removed on failure, and by resume)

def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---- tensors <-> JSON (no pickle) -------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON-able form of ``obj``; tensors are moved to ``tensors`` and referenced by name."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {key!r}")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


# ---- RNG ------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global generator states: tensors (torch CPU / CUDA) and JSON (Python, NumPy)."""
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npst[0], [int(x) for x in npst[1]], int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, js


def set_rng_state(tensors: Mapping[str, torch.Tensor], js: Mapping[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(cuda[:n])
    if "python" in js:
        v, state, gauss = js["python"]
        random.setstate((v, tuple(state), gauss))
    if "numpy" in js:
        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- files ----------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any, failpoint: str) -> None:
    data = json.dumps(obj)
    with open(path, "w") as f:
        failpoints.hit(failpoint, path, partial=lambda: f.write(data[: len(data) // 2]))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], failpoint: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    failpoints.hit(failpoint, path, partial=lambda: path.write_bytes(b"\0" * 64))
    try:
        save_file(dict(tensors), str(path))
    except SafetensorError as e:  # safetensors reports a failed write as its own error: give the OSError back
        code = safetensors_errno(e)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e
    _fsync_path(path)


#: errors a failed safetensors write may carry, recognised by their words when the message has no errno
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS)


def safetensors_errno(e: BaseException) -> int | None:
    """The errno inside a ``SafetensorError`` from a failed write ("I/O error: File too large (os error 27)"),
    or None when it is not a system error."""
    import re

    text = str(e)
    m = re.search(r"os error (\d+)", text)
    if m:
        return int(m.group(1))
    return next((c for c in _WRITE_ERRNOS if os.strerror(c).lower() in text.lower()), None)


def step_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"{_PREFIX}{iteration:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, newest (highest iteration) first; temporary ones excluded."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit():
            found.append((int(p.name[len(_PREFIX):]), p))
    return [p for _, p in sorted(found, reverse=True)]


def save(run_dir: str | os.PathLike, iteration: int, *, policy: Mapping[str, torch.Tensor],
         optimizer: Mapping[str, Any], state: Mapping[str, Any], keep: int) -> Path:
    """Write the checkpoint after ``iteration`` completed iterations atomically; keep the newest ``keep``.

    policy:    trainable weights by parameter name
    optimizer: ``torch.optim.Optimizer.state_dict()``
    state:     JSON-serialisable run state (iteration, totals, evals, algorithm state, ...)
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(Path(run_dir), iteration)
    tmp = root / f"{TMP_PREFIX}{final.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, iteration, policy, optimizer, state)
        _move_into_place(root, tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing behind (it may hold the space)
        raise
    try:
        prune(run_dir, keep)
    except OSError as e:  # the new checkpoint is in place; an old one left over is harmless (pruned next time)
        warn(f"could not delete old checkpoints in {root}: {e.strerror or e}; they stay until the next "
             f"checkpoint")
    return final


def _write_files(tmp: Path, iteration: int, policy: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
                 state: Mapping[str, Any]) -> None:
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = _encode(dict(optimizer), opt_tensors, "optimizer")
    rng_tensors, rng_json = rng_state()
    _write_tensors(tmp / "policy.safetensors", {k: v.detach().cpu().contiguous() for k, v in policy.items()},
                   "checkpoint.policy")
    _write_tensors(tmp / "optimizer.safetensors", opt_tensors, "checkpoint.optimizer")
    _write_tensors(tmp / "rng.safetensors", rng_tensors, "checkpoint.rng")
    _write_json(tmp / "state.json", {**state, "iteration": iteration, "optimizer": opt_json, "rng": rng_json},
                "checkpoint.state")
    files = {}
    for name in ("policy.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    _write_json(tmp / "meta.json", {"format": FORMAT_VERSION, "iteration": iteration,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "files": files}, "checkpoint.meta")
    _fsync_path(tmp)


def _move_into_place(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; a checkpoint of the same iteration already there (a
    resumed run that was already finished) is replaced, and restored if the rename fails."""
    old = None
    if final.exists():
        old = root / f"{TMP_PREFIX}old_{final.name}_{os.getpid()}"
        os.rename(final, old)
    try:
        failpoints.hit("checkpoint.rename", final)
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(root)


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and any leftover temporary directories."""
    failpoints.hit("checkpoint.prune", Path(run_dir) / CHECKPOINT_DIR)
    for p in list_checkpoints(run_dir)[max(1, int(keep)):]:
        shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINT_DIR
    for p in root.glob(f"{TMP_PREFIX}*"):
        try:
            pid = int(p.name.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            pid = -1
        if pid != os.getpid():
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    iteration: int
    state: dict[str, Any]            # state.json without the optimizer / rng entries
    policy: dict[str, torch.Tensor]
    optimizer: dict[str, Any]        # an Optimizer.state_dict() again
    rng_tensors: dict[str, torch.Tensor]
    rng_json: dict[str, Any]


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify one checkpoint directory; ``CheckpointError`` says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: meta.json missing or unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path}: meta.json has an unknown format")
    for name in ("policy.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        rec = meta["files"].get(name)
        f = path / name
        if rec is None or not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != rec.get("bytes") or _sha256(f) != rec.get("sha256"):
            raise CheckpointError(f"{path}: {name} does not match its recorded size/sha256 (corrupt)")
    try:
        state = json.loads((path / "state.json").read_text())
        policy = load_file(str(path / "policy.safetensors"))
        opt_t = load_file(str(path / "optimizer.safetensors"))
        rng_t = load_file(str(path / "rng.safetensors"))
        optimizer = _decode(state.pop("optimizer"), opt_t)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    rng_json = state.pop("rng", {})
    if state.get("iteration") != meta.get("iteration"):
        raise CheckpointError(f"{path}: state.json and meta.json disagree on the iteration")
    return Checkpoint(path=path, iteration=int(state["iteration"]), state=state, policy=policy,
                      optimizer=optimizer, rng_tensors=rng_t, rng_json=rng_json)


def load_latest(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest valid checkpoint (warning about each corrupt newer one); None when the run has none.
    Raises ``UsageError`` when checkpoints exist but none is valid."""
    found = list_checkpoints(run_dir)
    problems = []
    for p in found:
        try:
            ck = load(p)
        except CheckpointError as e:
            problems.append(str(e))
            warn(f"skipping checkpoint {p.name}: {e}; falling back to the previous checkpoint")
            continue
        return ck
    if found:
        raise UsageError(f"no valid checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: " + "; ".join(problems)
                         + ". Start the run again with --overwrite.")
    return None
