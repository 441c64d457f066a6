"""The run directory (format: docs/RUNDIR.md): checked before anything is built, created, described by
its manifest, then appended to by the run log. The glossary of logged keys is ``bench.run.records``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.errors import UsageError
from bench.rundir import failpoints
from bench.rundir.layout import EVAL_SCORES, EVALS, FINAL, ITERATIONS, MANIFEST, SAMPLES, SCHEMA_VERSION
from bench.rundir.lock import LOCK_NAME, RunLock
from bench.rundir.secrets import redact_argv


def reward_hacking_flag(evals: Sequence[Mapping[str, Any]], train_key: str, heldout_keys: Sequence[str],
                        window: int = 3) -> bool:
    """Over the last ``window`` evaluations the training reward strictly increases while some held-out
    reward strictly decreases."""
    if len(evals) < window:
        return False
    last = evals[-window:]

    def series(k: str) -> list[float] | None:
        vals = [e.get(k) for e in last]
        return None if any(v is None for v in vals) else [float(v) for v in vals]

    tr = series(train_key)
    if tr is None or not all(b > a for a, b in zip(tr, tr[1:])):
        return False
    for k in heldout_keys:
        s = series(k)
        if s is not None and all(b < a for a, b in zip(s, s[1:])):
            return True
    return False


#: A held-out reward must be below its iteration-0 value at this many consecutive evaluations after
#: iteration 0 (the current one included) for the sustained-fall rule: one low evaluation that recovers
#: is not a flag.
SUSTAIN = 2


def standard_error(rec: Mapping[str, Any], key: str) -> float | None:
    """The resolution of an eval mean: the population std over images / sqrt(images) of one evaluation
    (``eval/<r>/std``, ``eval_images``), None when the record lacks them."""
    std, n = rec.get(f"{key}/std"), rec.get("eval_images")
    if std is None or not n:
        return None
    return float(std) / math.sqrt(float(n))


def sustained_fall(evals: Sequence[Mapping[str, Any]], train_key: str, heldout_keys: Sequence[str],
                   stay: int = SUSTAIN) -> list[str]:
    """Held-out keys judged on the whole curve at the newest evaluation: the run's first evaluation is at
    iteration 0, the training reward's eval score has exceeded its iteration-0 value by more than its
    resolution at some evaluation since (the run learned its reward), and the held-out reward is below its
    iteration-0 value by more than its resolution at each of the last ``stay`` evaluations after iteration
    0 (resolution: the standard error of the iteration-0 eval mean, ``standard_error``). A held-out score
    that collapsed (to 0, say) and stays there is flagged at every later evaluation, which the
    last-3-evaluations rule cannot do once the score no longer falls, and so is one whose collapse later
    drags the training reward back to its start too (over-optimisation that ends in collapse); a flat curve
    whose evaluations wander within the resolution is not, nor a run whose training reward never rose."""
    if len(evals) < stay + 1 or int(evals[0].get("iteration", -1)) != 0:
        return []
    first, last = evals[0], evals[-stay:]
    if any(int(e.get("iteration", 0)) == 0 for e in last):
        return []

    def beyond(key: str, rec: Mapping[str, Any], sign: float) -> bool:
        v0, v = first.get(key), rec.get(key)
        if v0 is None or v is None or not (math.isfinite(float(v0)) and math.isfinite(float(v))):
            return False
        res = standard_error(first, key) or 0.0
        return sign * (float(v) - float(v0)) > res

    if not any(beyond(train_key, e, +1.0) for e in evals[1:]):
        return []
    return [k for k in heldout_keys if all(beyond(k, e, -1.0) for e in last)]


def json_safe(v: Any) -> Any:
    """NaN -> null, +-inf -> "inf"/"-inf", recursively: strict JSON that reports read back."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Mapping):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("treebench", "torch", "diffusers", "transformers", "accelerate", "peft", "numpy", "open-clip-torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_json(path: Path, obj: Any, failpoint: str | None = None) -> None:
    """``atomic_write_text`` of ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n", failpoint)


def atomic_write_text(path: Path, data: str, failpoint: str | None = None) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsynced, renamed over it. On any failure the
    temporary file is removed and ``path`` keeps its previous content. ``failpoint`` names the injection
    point hit before the write (half of ``data`` is written first, as a real full disk would)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            if failpoint:
                failpoints.hit(failpoint, tmp, partial=lambda: f.write(data[: len(data) // 2]))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_temp_files(out: Path) -> list[Path]:
    """Temporary files a killed writer left in run directory ``out`` (call only while holding its lock)."""
    from bench.rundir.checkpoint import CHECKPOINT_DIR, TMP_PREFIX

    found = [*out.glob("*.tmp"), *out.glob(f"{SAMPLES}/*.tmp"), *(out / CHECKPOINT_DIR).glob(f"{TMP_PREFIX}*")]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return found


class RunLog:
    """Appends records to a run directory; optionally mirrors them to TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool = False):
        self.out = out
        self.iter_path = out / ITERATIONS
        self.eval_path = out / EVALS
        self.scores_path = out / EVAL_SCORES
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UsageError(f"run.tensorboard=true needs the tensorboard package ({e}); "
                                 f"pip install tensorboard") from None
            self._tb = SummaryWriter(str(out / "tensorboard"))

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        atomic_write_json(self.out / MANIFEST, {"schema_version": SCHEMA_VERSION, **manifest},
                          failpoint="manifest")

    def _append(self, path: Path, record: Mapping[str, Any] | Sequence[Mapping[str, Any]], failpoint: str) -> None:
        """Append one record, or several in one write (a list)."""
        records = record if isinstance(record, list) else [record]
        line = "".join(json.dumps(json_safe(r)) + "\n" for r in records)
        with open(path, "a") as f:
            # a full disk may take part of the line: resume drops a torn last line (bench.rundir.resume.read_jsonl)
            failpoints.hit(failpoint, path, partial=lambda: (f.write(line[: len(line) // 2]), f.flush()))
            f.write(line)
            f.flush()

    def iteration(self, record: Mapping[str, Any]) -> None:
        self._append(self.iter_path, record, "log.iterations")
        self._mirror(record, "train", int(record["iteration"]))

    def evaluation(self, record: Mapping[str, Any]) -> None:
        self._append(self.eval_path, record, "log.evals")
        self._mirror(record, "", int(record["samples_total"]))

    def eval_scores(self, lines: Sequence[Mapping[str, Any]]) -> None:
        """One evaluation's per-image scores (eval_scores.jsonl, docs/RUNDIR.md)."""
        self._append(self.scores_path, lines, "log.eval_scores")

    def _mirror(self, record: Mapping[str, Any], prefix: str, step: int) -> None:
        if self._tb is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, v, step)
        self._tb.flush()

    def final(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.out / FINAL, summary, failpoint="final")
        if self._tb is not None:
            self._tb.close()


def device_info(device: Any) -> dict[str, Any]:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": 1,
            "threads": torch.get_num_threads()}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def host_info() -> dict[str, Any]:
    # the command line without the passwords of its URLs (a sweep worker's --storage postgresql://user:PW@...)
    return {"hostname": platform.node(), "platform": platform.platform(), "argv": redact_argv(sys.argv)}


# ---- lifecycle: check, create, describe ------------------------------------------------------------------
def is_treebench_run(out: Path) -> bool:
    """Whether ``out`` holds a manifest.json that treebench wrote (a JSON object with its schema version and
    a configuration): the only non-empty directory ``--overwrite`` empties without ``--force``."""
    try:
        man = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(man, dict) and isinstance(man.get("schema_version"), int) and isinstance(man.get("config"), dict)


def _listing(entries: Sequence[Path], n: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in entries)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_overwrite(out: Path, force: bool) -> None:
    """``--overwrite`` deletes only what treebench created: the contents of a treebench run, or of an empty
    directory; anything else needs ``--force`` (the message names what would go). Never the working directory
    (or one holding it) or the home directory, never through a symbolic link."""
    if out.is_symlink():
        raise UsageError(f"--out {out} is a symbolic link (to {os.readlink(out)}); --overwrite does not delete "
                         f"through links: give the directory itself as --out, or choose another --out")
    if not out.is_dir():
        return
    real, cwd = out.resolve(), Path.cwd().resolve()
    what = ("the current working directory" if real == cwd else
            "a directory holding the current working directory" if real in cwd.parents else
            "the home directory" if real == Path.home().resolve() else None)
    if what is not None:
        raise UsageError(f"--overwrite refuses to empty {out}: it is {what}; choose another --out")
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if not entries or is_treebench_run(out) or force:
        return
    raise UsageError(f"--overwrite refuses to empty {out}: it is not a treebench run (no manifest.json written by "
                     f"treebench) and it holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
                     f"({_listing(entries)}). Choose another --out, or add --force to delete them.")


def check_out_dir(out: Path, overwrite: bool, resume: bool = False, force: bool = False) -> Path:
    """Validate the run directory before anything is built or deleted."""
    if resume:
        if not (out / MANIFEST).is_file():
            raise UsageError(f"--resume {out}: not a run directory (no manifest.json); nothing to resume")
        if not os.access(out, os.W_OK):
            raise UsageError(f"cannot write to run directory {out}: permission denied")
        return out
    if out.exists() and not out.is_dir():
        raise UsageError(f"run directory {out} exists and is not a directory; choose another --out")
    if overwrite:
        check_overwrite(out, force)
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        if (out / MANIFEST).is_file():
            from bench.rundir.checkpoint import list_checkpoints

            it_file = out / ITERATIONS
            done = it_file.read_bytes().count(b"\n") if it_file.is_file() else 0
            cks = list_checkpoints(out)
            where = f"newest checkpoint {cks[0].name}" if cks else "no checkpoint"
            raise UsageError(f"run directory {out} already holds a run ({done} iterations logged, {where}); "
                             f"pass --resume {out} to continue it, --overwrite to replace it, or choose "
                             f"another --out")
        entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
        raise UsageError(f"run directory {out} already exists, is not empty and is not a treebench run "
                         f"({_listing(entries)}); choose another --out (--overwrite --force would delete what it "
                         f"holds)")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK):
        why = "is not a directory" if not anc.is_dir() else "is not writable"
        raise UsageError(f"cannot create run directory {out}: {anc} {why}; choose another --out")
    return out


def create_out_dir(out: Path, overwrite: bool, lock: RunLock | None = None, force: bool = False) -> RunLock:
    """Create (or with ``overwrite`` empty) a run directory already checked by ``check_out_dir``; returns
    its lock (``lock`` when the caller already holds it), taken before anything in it is deleted."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to run directory {out}: {e.strerror or e}") from None
    if lock is None:
        lock = RunLock(out).acquire()
    try:
        if overwrite:  # everything but the lock this process holds
            check_overwrite(out, force)  # again, under the lock: what is deleted is what was checked
            for p in out.iterdir():
                if p.name == LOCK_NAME:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        else:  # another process may have started (and finished) a run here since the check
            check_out_dir(out, overwrite=False)
    except BaseException:
        lock.release()
        raise
    return lock


def manifest(spec: Any, *, out: Path, policy: Any, weights_sha256: str, reward: Any,
             eval_rewards: Mapping[str, Any], device: Any, batch: Mapping[str, Any], world_size: int,
             prompts: Mapping[str, Any], schedule: Mapping[str, Any] | None = None,
             flops: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """manifest.json of a new run (``spec``: a ``bench.spec.RunSpec``)."""
    from dataclasses import asdict

    cfg = spec.config
    return {
        "created": now_iso(), "run_name": out.name, "config": cfg,
        "algorithm": {"name": spec.algo_name, "config": asdict(spec.algo_config)},
        "model": {"name": spec.model.name, "path": str(policy.path), "weights_sha256": weights_sha256,
                  "prediction": policy.prediction},
        "reward": {"spec": spec.reward.name, "name": getattr(reward, "name", spec.reward.name),
                   "version": str(getattr(reward, "version", "unknown"))},
        "eval_rewards": [{"name": n, "version": str(getattr(r, "version", "unknown"))}
                         for n, r in eval_rewards.items()],
        "budget": spec.budget.to_dict(), "seed": spec.seed, "git": git_state(), "packages": package_versions(),
        "weights_frozen": spec.optimizer.frozen,  # train.frozen: a null arm, no weight ever changes
        "device": device_info(device), "host": host_info(), "batch": dict(batch),
        "world_size": world_size,  # processes training data-parallel
        "cost_profile": spec.cost_profile.describe() if spec.cost_profile is not None else None,
        "prompts": dict(prompts),
        # the base schedule every rollout and evaluation of T steps uses (MixGRPO-Flash compresses its
        # post-window part per iteration); epsilon models: DDIM alpha_bar levels and integer timesteps
        "schedule": dict(schedule or {}),
        # FLOPs per row of each call kind (meta device) and the peak FLOP/s MFU divides by (docs/RUNDIR.md)
        "flops": dict(flops or {}),
    }


def save_grid(images: Any, path: Path, ncol: int = 8) -> None:
    """A PNG grid of images [L, 3, H, W] in [0, 1] (upscaled to at least 64 px per image)."""
    import torch
    from PIL import Image

    L, _, H, W = images.shape
    nrow = math.ceil(L / ncol)
    scale = max(1, 64 // max(H, W))
    grid = torch.ones(3, nrow * (H + 2), min(L, ncol) * (W + 2))
    for i in range(L):
        r, c = divmod(i, ncol)
        grid[:, r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = images[i]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp")
    try:  # whole or not at all, like every file of a run directory
        img.save(tmp, format="PNG")
        failpoints.hit("samples.grid", path, partial=None)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
