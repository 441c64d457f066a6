"""The run directory's layout: every file name, the schema version, and the typed readers.

This module owns the run directory (docs/RUNDIR.md). Writers (``bench.rundir.runlog``, checkpoints,
the trace, evaluations) take their paths from here, and every reader (``bench show``, ``bench compare``,
resume, sweeps, ``reports``) reads through ``RunDir``, so a file is named in one place and a directory
written by another schema is refused with one message.

Readers are tolerant where a live or killed run leaves partial data: a JSON Lines file may end in a
partial line (dropped; a bad line anywhere else is an error naming the file and line), and a missing
file reads as empty. ``RunDir.manifest`` checks the schema version.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import UsageError

#: the run-directory format written by this version of treebench (``manifest.json["schema_version"]``)
SCHEMA_VERSION = 1
#: schema versions this version can read
READABLE_SCHEMA_VERSIONS = (1,)

MANIFEST = "manifest.json"          # resolved config, versions, budget (written at start)
ITERATIONS = "iterations.jsonl"     # one IterationRecord per iteration
EVALS = "evals.jsonl"               # one record per held-out evaluation
EVAL_SCORES = "eval_scores.jsonl"   # one line per evaluated image
FINAL = "final.json"                # stop reason, totals, best evaluation (written at the end)
TRACE = "trace.jsonl"               # the call trace (run.trace)
CHECKPOINTS = "checkpoints"         # step_<iteration>/ directories
SAMPLES = "samples"                 # evaluation sample grids
LOCK = ".lock"                      # the run lock of the process writing the directory
#: sub-directories a search for run directories does not descend into
NOT_RUNS = (CHECKPOINTS, SAMPLES)

# the evaluation cache (eval.cache, bench.run.evalcache): outside run directories, shared by the runs of a
# comparison; a dot-directory, so searches for run directories skip it
EVAL_CACHE = ".eval_cache"          # bench compare's cache folder: DIR/.eval_cache


def eval_cache_entry(cache: Path, key: str) -> Path:
    """The JSON entry of one cached iteration-0 evaluation."""
    return Path(cache) / f"{key}.json"


def eval_cache_grid(cache: Path, key: str, png_sha256: str) -> Path:
    """The sample grid of one entry, named by its content (so racing writers never mix two grids)."""
    return Path(cache) / f"{key}-{png_sha256[:16]}.png"


class JSONLError(UsageError):
    """A JSON Lines file of a run directory has an unreadable line that is not its last."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; a missing file or invalid JSON is a ``UsageError`` naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or unreadable (a run still being created)."""
    try:
        return read_json(path)
    except UsageError:
        return None


def read_jsonl(path: Path, strict: bool = True) -> tuple[list[dict[str, Any]], list[int]]:
    """Records of a JSON Lines file and the (1-based) numbers of the lines dropped as unreadable. A
    partial last line (a killed or still-writing process) is dropped; an unreadable line elsewhere (or a
    line that is not a JSON object) raises ``JSONLError`` when ``strict``, else it is dropped too."""
    path = Path(path)
    if not path.is_file():
        packed = path.with_name(path.name + ".gz")  # a run shipped with its large logs compressed (export_run)
        if not packed.is_file():
            return [], []
        try:
            lines = gzip.decompress(packed.read_bytes()).decode().splitlines()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise JSONLError(f"{packed}: not a readable gzip file ({e})") from None
        return _records(lines, packed, strict)
    return _records(path.read_text().splitlines(), path, strict)


def _records(lines: list[str], path: Path, strict: bool) -> tuple[list[dict[str, Any]], list[int]]:
    out: list[dict[str, Any]] = []
    bad: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if strict and n != len(lines):
                raise JSONLError(f"{path}:{n}: not a JSON record (only the last line of a killed run may be "
                                 f"partial)")
            bad.append(n)
            continue
        out.append(rec)
    return out, bad


def check_schema(manifest: dict[str, Any], where: Path) -> int:
    """The manifest's schema version, refused (``UsageError``) when this version cannot read it."""
    v = manifest.get("schema_version")
    if v in READABLE_SCHEMA_VERSIONS:
        return int(v)
    if isinstance(v, int) and v > SCHEMA_VERSION:
        raise UsageError(f"{where}: written by a newer treebench (run-directory schema {v}; this version reads "
                         f"{list(READABLE_SCHEMA_VERSIONS)}): upgrade treebench to read it")
    raise UsageError(f"{where}: run-directory schema {v!r} is not one this version reads "
                     f"({list(READABLE_SCHEMA_VERSIONS)}); it was written by an older or foreign tool")


@dataclass(frozen=True)
class RunDir:
    """One run directory: its paths and typed readers."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ---- paths ----
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def iterations_path(self) -> Path:
        return self.path / ITERATIONS

    @property
    def evals_path(self) -> Path:
        return self.path / EVALS

    @property
    def eval_scores_path(self) -> Path:
        return self.path / EVAL_SCORES

    @property
    def final_path(self) -> Path:
        return self.path / FINAL

    @property
    def trace_path(self) -> Path:
        return self.path / TRACE

    @property
    def checkpoints_path(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    # ---- state ----
    def is_run(self) -> bool:
        """A treebench run directory: it has a manifest."""
        return self.manifest_path.is_file()

    def is_finished(self) -> bool:
        return self.final_path.is_file()

    def has_checkpoint(self) -> bool:
        d = self.checkpoints_path
        return d.is_dir() and any(d.glob("step_*"))

    # ---- readers ----
    def manifest(self) -> dict[str, Any]:
        """The manifest, its schema version checked."""
        m = read_json(self.manifest_path)
        check_schema(m, self.path)
        return m

    def final(self) -> dict[str, Any] | None:
        """final.json, or None while the run has not finished."""
        return read_json(self.final_path) if self.final_path.is_file() else None

    def iterations(self) -> list[dict[str, Any]]:
        return read_jsonl(self.iterations_path)[0]

    def evals(self) -> list[dict[str, Any]]:
        return read_jsonl(self.evals_path)[0]

    def eval_scores(self) -> list[dict[str, Any]]:
        return read_jsonl(self.eval_scores_path)[0]


def find_runs(root: Path) -> list[Path]:
    """Run directories at or below ``root`` (a run directory itself, or a tree of them), sorted."""
    root = Path(root)
    if RunDir(root).is_run():
        return [root]
    if not root.is_dir():
        return []
    return sorted(m.parent for m in root.rglob(MANIFEST)
                  if not any(part in NOT_RUNS for part in m.relative_to(root).parts[:-1]))


#: what ``export_run`` keeps of a run: enough to recompute every report number (evaluations, per-image scores,
#: per-iteration records, totals, settings), without checkpoints, sample grids or the call trace
EXPORTED = (MANIFEST, FINAL, EVALS, ITERATIONS)
#: exported compressed (``<name>.gz``; the readers above read either form)
EXPORTED_PACKED = (EVAL_SCORES,)


def export_run(src: Path, dst: Path) -> list[Path]:
    """Copy the small, recomputable part of run directory ``src`` to ``dst`` (created): ``EXPORTED`` as they
    are, ``EXPORTED_PACKED`` gzip-compressed (deterministic: no name or time in the gzip header). Returns the
    files written. ``bench report dst`` reads the copy as it reads the run."""
    src, dst = Path(src), Path(dst)
    if not RunDir(src).is_run():
        raise UsageError(f"{src}: not a run directory (no {MANIFEST})")
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EXPORTED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            written.append(dst / name)
    for name in EXPORTED_PACKED:
        if (src / name).is_file():
            out = dst / (name + ".gz")
            out.write_bytes(gzip.compress((src / name).read_bytes(), compresslevel=9, mtime=0))
            written.append(out)
    return written
