"""Where ``bench compare`` runs its training runs: one after another, N at once on this machine
(``--jobs N``), or as jobs of a cluster scheduler through submitit (``--launcher slurm``; ``--launcher
submitit-local`` is submitit's own local executor, for a single machine and for tests).

Every run is the same ``bench run`` command whichever launcher starts it, so a run's records depend only
on its command and its numerics, not on the launcher. On CPU the number of threads is part of the
numerics (it changes float rounding of reductions): ``--threads-per-run T`` pins it (OMP/MKL threads) for
every run, and runs started with the same T give identical records whether they ran alone or side by
side. On GPUs each concurrent run gets its own device (``CUDA_VISIBLE_DEVICES``); a run that needs
several GPUs is started under ``accelerate launch`` (``bench.run.distributed.launch_command``).

submitit writes each job's pickled call and its result into its folder (``DIR/submitit/``): these are
files this process wrote for its own jobs, read back by submitit itself; treebench never unpickles
anything else.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import UsageError

LAUNCHERS = ("local", "submitit-local", "slurm")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: Python < 3.11 has no -P: drop the current directory from the path before anything is imported (``sys``
#: is built in, so nothing can shadow it), then run the module as ``python -m`` would
_SAFE_PATH_STUB = ("import sys; del sys.path[0]; module = sys.argv.pop(1); import runpy; "
                   "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def python_module(module: str) -> list[str]:
    """argv running ``python -m module`` WITHOUT the current directory on the child's import path: plain
    ``python -m`` puts it first, so a ``yaml.py`` (or the ``planted.py`` of ``--algos planted:Evil``) in the
    directory the command is run from would be imported by every child. The child imports treebench from
    its install (or ``PYTHONPATH``), like the ``bench`` command itself. ``-P`` on Python 3.11+ (and
    ``PYTHONSAFEPATH=1`` in ``safe_env``, for the processes those children start, e.g. under accelerate)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module]
    return [sys.executable, "-c", _SAFE_PATH_STUB, module]


def safe_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process: on Python 3.11+ ``PYTHONSAFEPATH=1``, so that neither it nor the Python
    processes it starts put the current directory (or a script's directory) first on their import path."""
    if sys.version_info >= (3, 11):
        env["PYTHONSAFEPATH"] = "1"
    return env


@dataclass(frozen=True)
class Job:
    """One training run: its output prefix (``[algo seedS]``), its command, and why it runs (resume...)."""

    label: str
    cmd: list[str]
    note: str = ""


@dataclass(frozen=True)
class Launch:
    """How the runs are executed (the launcher options of ``bench compare``).

    launcher:        "local" (subprocesses here), "submitit-local" or "slurm" (submitit executors)
    jobs:            local: runs at once (each on its own GPU when the runs use GPUs)
    threads:         CPU threads of every run (None: the library default, all cores)
    gpus_per_run:    GPUs of one run (> 1: started under accelerate launch)
    folder:          submitit's log and job folder
    partition, time_min, cpus_per_run, mem_gb, slurm_args: SLURM resources of every job
    """

    launcher: str = "local"
    jobs: int = 1
    threads: int | None = None
    gpus_per_run: int = 0
    folder: Path | None = None
    partition: str | None = None
    time_min: int = 24 * 60
    cpus_per_run: int | None = None
    mem_gb: int | None = None
    slurm_args: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"--launcher {self.launcher!r}: one of {', '.join(LAUNCHERS)}")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads-per-run must be >= 1, got {self.threads}")
        if self.gpus_per_run < 0:
            raise UsageError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run}")
        if self.launcher != "local" and self.jobs != 1:
            raise UsageError("--jobs is for --launcher local; a scheduler runs the submitted jobs at once")
        if self.launcher == "local" and self.gpus_per_run > 1:
            raise UsageError("--gpus-per-run > 1 is for --launcher slurm/submitit-local; on this machine start one "
                             "multi-GPU run with accelerate launch (docs/SCALE.md)")
        if self.time_min < 1:
            raise UsageError(f"--time-limit must be >= 1 minute, got {self.time_min}")


def add_cluster_args(p: argparse.ArgumentParser, what: str, launcher_help: str) -> Any:
    """The launcher options ``bench compare`` and ``bench sweep`` share; returns their argument group."""
    g = p.add_argument_group(f"where the {what} execute (bench/fleet/launch.py, docs/SCALE.md)")
    g.add_argument("--launcher", default="local", choices=LAUNCHERS, help=launcher_help)
    g.add_argument("--gpus-per-run", type=int, default=0,
                   help="slurm/submitit-local: GPUs per job; > 1 starts a run under accelerate launch")
    g.add_argument("--partition", default=None, help="slurm: partition of every job")
    g.add_argument("--time-limit", type=int, default=24 * 60, help="slurm: minutes per job (default 1440)")
    g.add_argument("--cpus-per-run", type=int, default=None, help="slurm/submitit-local: CPUs per job")
    g.add_argument("--mem-gb", type=int, default=None, help="slurm: memory per job in GB")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option for every job, e.g. account=proj1 or qos=high (repeatable)")
    g.add_argument("--submitit-folder", default=None, help="submitit's job and log folder (default DIR/submitit)")
    return g


def launch_from_args(a: argparse.Namespace, jobs: int = 1, threads: int | None = None) -> Launch:
    return Launch(launcher=a.launcher, jobs=jobs, threads=threads, gpus_per_run=a.gpus_per_run,
                  folder=Path(a.submitit_folder) if a.submitit_folder else None, partition=a.partition,
                  time_min=a.time_limit, cpus_per_run=a.cpus_per_run, mem_gb=a.mem_gb,
                  slurm_args=parse_slurm_args(a.slurm_arg))


def parse_slurm_args(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for kv in items:
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise UsageError(f"--slurm-arg {kv!r}: expected KEY=VALUE (an sbatch option, e.g. account=proj1)")
        out[k.strip()] = v.strip()
    return out


def run_env(threads: int | None, device: str | None = None) -> dict[str, str]:
    """The environment of one run: pinned CPU threads and, with GPUs, its one visible device."""
    env = dict(os.environ)
    if threads is not None:
        env.update({v: str(threads) for v in _THREAD_VARS})
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return safe_env(env)


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` order), none without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(jobs: int, run_device: str | None) -> list[str | None]:
    """One device per concurrent run: GPU ids when the runs use CUDA (``--device`` cuda/auto with GPUs
    visible), else None (CPU runs share the cores, see ``--threads-per-run``)."""
    if jobs == 1 or (run_device is not None and not run_device.startswith(("cuda", "auto"))):
        return [None] * jobs
    gpus = visible_gpus()
    if not gpus:
        return [None] * jobs
    if jobs > len(gpus):
        raise UsageError(f"--jobs {jobs} needs one GPU per concurrent run, {len(gpus)} visible "
                         f"({','.join(gpus)}): use --jobs {len(gpus)} or --device cpu")
    return gpus[:jobs]


# ---- streaming a child's output ---------------------------------------------------------------------
def stream(proc: subprocess.Popen, prefix: str, redraw: bool, lock: threading.Lock | None = None) -> int:
    """Echo ``proc``'s merged output line by line with a prefix; return its exit status.

    Progress bars redraw with carriage returns: with ``redraw`` (one run on a terminal) they keep
    redrawing one prefixed line; otherwise only each bar's final state (the text before a newline) is
    written, so concurrent runs never overwrite each other's lines."""
    lock = lock or threading.Lock()
    buf, drawn = b"", False
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        buf += chunk
        while True:
            cuts = [i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0]
            if not cuts:
                break
            i = min(cuts)
            seg, sep, buf = buf[:i].decode("utf-8", "replace"), buf[i:i + 1], buf[i + 1:]
            with lock:
                if sep == b"\n":
                    sys.stdout.write(("\r" if drawn else "") + f"{prefix} {seg}\n")
                    drawn = False
                elif redraw and seg:
                    sys.stdout.write(f"\r{prefix} {seg}")
                    drawn = True
                sys.stdout.flush()
    if buf:
        with lock:
            sys.stdout.write(("\r" if drawn else "") + f"{prefix} {buf.decode('utf-8', 'replace')}\n")
            sys.stdout.flush()
    return proc.wait()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


# ---- local: one after another, or N at once ---------------------------------------------------------
def run_local(jobs: Sequence[Job], launch: Launch, run_device: str | None) -> list[str]:
    """Run ``jobs`` here, ``launch.jobs`` at a time; returns the failed ones ("label (exit N)")."""
    slots = device_slots(launch.jobs, run_device)
    redraw = launch.jobs == 1 and sys.stdout.isatty()
    lock = threading.Lock()
    free = list(range(len(slots)))
    running: dict[int, tuple[Job, subprocess.Popen, threading.Thread, float, list[int]]] = {}
    failed: list[str] = []
    todo = list(jobs)
    n = 0

    def say(msg: str) -> None:
        with lock:
            print(msg, flush=True)

    try:
        while todo or running:
            while todo and free:
                job, slot = todo.pop(0), free.pop(0)
                n += 1
                dev = slots[slot]
                where = f" on GPU {dev}" if dev is not None else ""
                threads = f", {launch.threads} thread(s)" if launch.threads is not None else ""
                say(f"== compare {n}/{len(jobs)}{job.note}{where}{threads}: {subprocess.list2cmdline(job.cmd)}")
                proc = subprocess.Popen(job.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=run_env(launch.threads, dev))
                rc: list[int] = []
                th = threading.Thread(target=lambda p=proc, j=job, r=rc: r.append(stream(p, j.label, redraw, lock)),
                                      daemon=True)
                th.start()
                running[slot] = (job, proc, th, time.monotonic(), rc)
            for slot, (job, proc, th, t0, rc) in list(running.items()):
                if th.is_alive():
                    continue
                th.join()
                code = rc[0] if rc else proc.wait()
                say(f"== {job.label} exit {code} after {time.monotonic() - t0:.1f} s")
                if code != 0:
                    failed.append(f"{job.label.strip('[]')} (exit {code})")
                del running[slot]
                free.append(slot)
                free.sort()
            if running:
                time.sleep(0.05)
    except KeyboardInterrupt:
        _stop([p for _, p, *_ in running.values()])
        raise
    return failed


# ---- submitit: SLURM, or its local executor -------------------------------------------------------------
def submitit_command(cmd: Sequence[str], runner: Sequence[str], gpus_per_run: int) -> list[str]:
    """The job's command: the run itself, or under accelerate launch for a multi-GPU run."""
    if gpus_per_run <= 1:
        return list(cmd)
    if list(cmd[:len(runner)]) != list(runner) or list(runner[-2:]) != ["-m", "bench.cli"]:
        raise UsageError("--gpus-per-run > 1 starts `bench run` under accelerate launch; it needs the standard "
                         "runner (python -m bench.cli)")
    from bench.run.distributed import launch_command

    return launch_command(["-m", "bench.cli", *cmd[len(runner):]], num_processes=gpus_per_run, cpu=False)


def _executor(launch: Launch, out: Path) -> Any:
    try:
        import submitit
    except ImportError:
        raise UsageError(f"--launcher {launch.launcher} needs submitit: pip install 'treebench[cluster]' "
                         f"(or pip install submitit)") from None
    folder = launch.folder or (out / "submitit")
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm" if launch.launcher == "slurm" else "local")
    params: dict[str, Any] = {"timeout_min": launch.time_min, "name": "treebench",
                              "tasks_per_node": 1, "nodes": 1}
    if launch.gpus_per_run:
        params["gpus_per_node"] = launch.gpus_per_run
    if launch.cpus_per_run:
        params["cpus_per_task"] = launch.cpus_per_run
    if launch.launcher == "slurm":
        if launch.partition:
            params["slurm_partition"] = launch.partition
        if launch.mem_gb:
            params["mem_gb"] = launch.mem_gb
        if launch.slurm_args:
            params["slurm_additional_parameters"] = dict(launch.slurm_args)
    ex.update_parameters(**params)
    return ex


def run_submitit(jobs: Sequence[Job], launch: Launch, out: Path, runner: Sequence[str]) -> list[str]:
    """Submit every job, wait for all, report each job's log; returns the failed ones."""
    import submitit

    ex = _executor(launch, out)
    env = run_env(launch.threads)
    submitted = []
    for job in jobs:
        cmd = submitit_command(job.cmd, runner, launch.gpus_per_run)
        fn = submitit.helpers.CommandFunction(cmd, verbose=False, cwd=os.getcwd(), env=env)
        sj = ex.submit(fn)
        print(f"== submitted {job.label}{job.note} as {launch.launcher} job {sj.job_id}: "
              f"{subprocess.list2cmdline(cmd)}", flush=True)
        submitted.append((job, sj))
    failed = []
    for job, sj in submitted:
        try:
            sj.result()
            print(f"== {job.label} job {sj.job_id} finished (log {sj.paths.stdout})", flush=True)
        except Exception as e:  # noqa: BLE001 - submitit raises its own job errors; each is reported
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            print(f"== {job.label} job {sj.job_id} FAILED: {first} (log {sj.paths.stderr})", flush=True)
            failed.append(f"{job.label.strip('[]')} (job {sj.job_id})")
    return failed
