"""Study storage, joining, dead-worker recovery and the trials table.

Storage (``--storage``): a journal file by default (``<out>/sweeps/<study>.journal``; several processes
on one machine, or on machines sharing the file system, append to it under a file lock), or an RDB
URL (``sqlite:///sweep.db``, ``postgresql://user@host/db``, ``mysql://...``) so that workers on many
machines join one study.

Dead workers: every running trial records its worker (host, pid, process start time) and a heartbeat
(unix time, refreshed every ``heartbeat_s``). A RUNNING trial whose worker process is gone (same host)
or whose heartbeat is older than ``grace_s`` is marked FAIL with the reason and its parameters are
enqueued again, so a resumed sweep re-runs it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.errors import UsageError
from bench.rundir import failpoints
from bench.rundir.layout import FINAL, ITERATIONS
from bench.rundir.lock import RunLock, process_start

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
SWEEP_ATTR = "treebench_sweep"


# ---- storage -------------------------------------------------------------------------------------------
def journal_path(out: Path, study: str) -> Path:
    return Path(out) / "sweeps" / f"{study}.journal"


def _postgres_url(url: str) -> str:
    """postgresql:// means psycopg2 to SQLAlchemy; use psycopg (3) when only that is installed."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg2") is not None:
        return url
    if importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    raise UsageError("a PostgreSQL storage needs a driver: pip install 'treebench[sweeps]' (installs psycopg)")


#: environment variable holding the storage URL, so a password stays out of shell history and process lists
STORAGE_ENV = "TREEBENCH_STORAGE"


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (what may be printed, logged or written)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _scrub(text: str, url: str) -> str:
    """A driver's error message with the URL's password removed, wherever it appears."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, redact(url))
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def make_storage(url: str | None, out: Path, study: str) -> tuple[Any, str]:
    """(optuna storage, description). ``url``: None (journal under ``out``), a ``*.journal`` / ``*.log``
    path, ``journal:PATH``, or an SQLAlchemy URL."""
    if url is None or url.startswith("journal:") or url.endswith((".journal", ".log")) or "://" not in url:
        if url is not None and "://" not in url and not url.startswith("journal:") \
                and not url.endswith((".journal", ".log")):
            raise UsageError(f"--storage {redact(url)!r}: give a journal file (*.journal), sqlite:///FILE.db, "
                             f"postgresql://USER@HOST/DB or mysql://USER@HOST/DB")
        path = journal_path(out, study) if url is None else Path(url.split("journal:", 1)[-1]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages import JournalStorage

        return JournalStorage(_journal_backend(str(path))), f"journal file {path}"
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several local workers write one file: wait for its lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    where = redact(url)
    for attempt in range(5):
        try:
            return RDBStorage(_postgres_url(url), **kwargs), where
        except ImportError as e:
            raise UsageError(f"--storage {redact(url)}: missing database driver ({_scrub(str(e), url)}); for "
                             f"PostgreSQL: pip install 'treebench[sweeps]'") from None
        except Exception as e:  # noqa: BLE001 - unreachable server, bad credentials, bad URL, or two workers creating
            if attempt == 4:    # the schema at the same moment (retried)
                raise UsageError(f"--storage {redact(url)}: cannot open the database: {type(e).__name__}: "
                                 f"{_scrub(str(e), url)}") from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _journal_backend(path: str) -> Any:
    """Optuna's journal file, with failpoint ``sweep.journal`` before each append (bench.rundir.failpoints)."""
    from optuna.storages.journal import JournalFileBackend

    class FailpointJournal(JournalFileBackend):
        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            failpoints.hit("sweep.journal", path)
            super().append_logs(logs)

    return FailpointJournal(path)


# ---- joining a study -----------------------------------------------------------------------------------
def open_study(name: str, storage: Any, directions: Sequence[str], definition: Mapping[str, Any],
               sampler: Any, pruner: Any) -> tuple[optuna.Study, bool]:
    """Create the study or join it (``load_if_exists``); a worker whose sweep definition differs from the
    study's (algorithm, objective, budget, seed, space, ...) is refused. Returns (study, created)."""
    existing = set(optuna.get_all_study_names(storage))
    study = optuna.create_study(study_name=name, storage=storage, directions=list(directions), sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    created = name not in existing
    stored = study.user_attrs.get(SWEEP_ATTR)
    if stored is None:
        study.set_user_attr(SWEEP_ATTR, json.loads(json.dumps(dict(definition), default=str)))
        return study, created
    mine = json.loads(json.dumps(dict(definition), default=str))
    diff = [k for k in sorted(set(stored) | set(mine)) if stored.get(k) != mine.get(k)]
    if diff:
        lines = "\n".join(f"  {k}: study has {stored.get(k)!r}, this worker has {mine.get(k)!r}" for k in diff)
        raise UsageError(f"study {name!r} already exists with a different sweep definition:\n{lines}\n"
                         f"Trials of one study must be comparable: join it with the same settings, or pick "
                         f"another --study name.")
    return study, created


# ---- workers, heartbeats, dead trials ------------------------------------------------------------------
def _pid_namespace() -> str | None:
    """Containers on one host may share a host name but not their process ids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def worker_identity(heartbeat_s: float | None = None) -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": pid, "start": process_start(pid),
            "heartbeat_s": heartbeat_s}


def worker_alive(worker: Mapping[str, Any] | None) -> bool | None:
    """True/False for a worker on this host (and process namespace), None when it runs elsewhere."""
    if not worker or worker.get("host") != socket.gethostname() or worker.get("pidns") != _pid_namespace():
        return None
    pid = int(worker.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = process_start(pid)
    return start is not None and (worker.get("start") is None or start == worker.get("start"))


class Heartbeat:
    """Refreshes the trial's ``heartbeat`` user attribute every ``interval`` seconds while it runs."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.trial, self.interval = trial, float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial.number}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # noqa: BLE001, S110 - a storage hiccup must not kill the trial; next beat retries
                pass

    def __enter__(self) -> Heartbeat:  # noqa: PYI034
        self.trial.set_user_attr("worker", worker_identity(self.interval))
        self.trial.set_user_attr("heartbeat", time.time())
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


def stale_reason(t: optuna.trial.FrozenTrial, grace_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial is considered dead, or None while it may still be alive."""
    now = time.time() if now is None else now
    worker = t.user_attrs.get("worker")
    alive = worker_alive(worker)
    if alive is False:
        return f"worker {worker['host']}:{worker['pid']} died while the trial was running"
    if alive is True:
        return None
    interval = (worker or {}).get("heartbeat_s")
    if interval is not None and float(interval) <= 0:
        return None  # that worker sends no heartbeats: only its own host can tell that it died
    if interval is not None:
        grace_s = max(grace_s, 3 * float(interval))
    beat = t.user_attrs.get("heartbeat")
    if beat is None and t.datetime_start is not None:
        beat = t.datetime_start.timestamp()
    if beat is not None and now - float(beat) > grace_s:
        who = f"{worker['host']}:{worker['pid']}" if worker else "unknown worker"
        return f"no heartbeat from {who} for {now - float(beat):.0f} s (grace {grace_s:.0f} s)"
    return None


def requeue_dead_trials(study: optuna.Study, storage: Any, grace_s: float, out: Path | None = None) -> list[int]:
    """Fail RUNNING trials whose worker died and enqueue their parameters again; returns their numbers."""
    requeued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(t, grace_s)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "reason", f"{reason}; re-queued")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another worker got there first
        study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number}, skip_if_exists=False)
        _close_dead_run_dir(t, reason)
        requeued.append(t.number)
    return requeued


def _close_dead_run_dir(t: optuna.trial.FrozenTrial, reason: str) -> None:
    """Give the dead trial's run directory a final.json (stop_reason "error") so readers see it ended."""
    run_dir = t.user_attrs.get("run_dir")
    if not run_dir or not Path(run_dir).is_dir() or (Path(run_dir) / FINAL).exists():
        return
    try:
        lock = RunLock(run_dir).acquire()  # a worker still writing it (bench.rundir.lock) keeps it
    except UsageError:
        return
    try:
        _write_dead_final(t, run_dir, reason)
    finally:
        lock.release()


def _write_dead_final(t: optuna.trial.FrozenTrial, run_dir: str, reason: str) -> None:
    last: dict[str, Any] = {}
    its = Path(run_dir) / ITERATIONS
    if its.is_file():
        lines = [ln for ln in its.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                last = json.loads(lines[-1])
            except json.JSONDecodeError:
                last = {}
    final = {"stop_reason": "error", "iterations": int(last.get("iteration", -1)) + 1,
             "samples_total": last.get("samples_total", 0), "nfe_total": last.get("nfe_total", 0),
             "seconds_total": last.get("seconds_total", 0.0), "wall_seconds": None, "final_eval": None,
             "best_eval": None, "error": f"sweep trial {t.number}: {reason}; re-queued"}
    tmp = Path(run_dir) / "final.json.tmp"
    tmp.write_text(json.dumps(final, indent=2))
    os.replace(tmp, Path(run_dir) / FINAL)


def counts(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial uses up the study's --trials target: all but WAITING ones and failures that were
    re-queued (their re-run counts instead)."""
    if t.state == TrialState.WAITING:
        return False
    return not (t.state == TrialState.FAIL and str(t.user_attrs.get("reason", "")).endswith("re-queued"))


def counted_trials(study: optuna.Study) -> int:
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


# ---- the trials table ----------------------------------------------------------------------------------
TABLE_ATTRS = ("stop_reason", "reason", "iterations", "samples_total", "nfe_total", "seconds_total",
               "run_dir", "requeued_from", "seed_values")


def trial_rows(study: optuna.Study, value_names: Sequence[str], seed: int | str) -> list[dict[str, Any]]:
    """One row per trial; ``seed`` is the trials' seed (``2000-2001`` for --seeds-per-trial 2: ``seed_values``
    then holds each seed's final value, ``value`` their mean)."""
    trials = study.get_trials(deepcopy=False)
    param_names: list[str] = []
    for t in trials:
        for p in t.params:
            if p not in param_names:
                param_names.append(p)
    rows = []
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        vals = t.values or [None] * len(value_names)
        for name, v in zip(value_names, vals):
            row[name] = v
        for p in param_names:
            row[f"params_{p}"] = t.params.get(p)
        row["seed"] = seed
        for a in TABLE_ATTRS:
            row[a] = t.user_attrs.get(a)
        if t.state == TrialState.FAIL and not row["reason"]:
            row["reason"] = t.system_attrs.get("fail_reason")
        w = t.user_attrs.get("worker")
        row["worker"] = f"{w['host']}:{w['pid']}" if isinstance(w, Mapping) else None
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
        row["duration_s"] = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_start and t.datetime_complete else None
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols or ["number"])
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write(path, buf.getvalue())


def atomic_write(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all, under a temporary name of this process and thread (concurrent workers
    of a study write the same files; none ever leaves a torn one). Failpoint ``sweep.storage``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("w", newline="") as f:
            failpoints.hit("sweep.storage", path, partial=lambda: f.write(text[: len(text) // 2]))
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def pareto_rows(study: optuna.Study, value_names: Sequence[str], seed: int | str) -> list[dict[str, Any]]:
    best = {t.number for t in study.best_trials}
    return [r for r in trial_rows(study, value_names, seed) if r["number"] in best]


def summarize(study: optuna.Study, value_names: Sequence[str]) -> dict[str, Any]:
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    out: dict[str, Any] = {"trials": sum(states.values()), "states": states}
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and all(math.isfinite(v) for v in t.values)]
    if complete and len(value_names) == 1:
        b = study.best_trial
        out["best"] = {"number": b.number, value_names[0]: b.value, "params": b.params,
                       "overrides": b.user_attrs.get("overrides")}
    elif complete:
        out["pareto"] = [{"number": t.number, **dict(zip(value_names, t.values)), "params": t.params}
                         for t in study.best_trials]
    return out


def describe_states(rows: Iterable[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
