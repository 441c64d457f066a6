"""Starting and stopping 2-process ``accelerate launch`` runs from the tests (tests/test_multiproc.py,
tests/test_fsdp.py, tests/test_scale_distributed.py).

The launcher (torch elastic, under ``accelerate launch``) starts every rank in a session of its own
(``start_new_session``), so signalling the launcher's process group does not reach the ranks: a test that
kills "the launch" by process group leaves both ranks running, still writing the run directory. ``kill_tree``
kills the launcher and every descendant by process id; ``Launch.wait`` does that on a timeout, so a hung
launch never outlives its test.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.run.distributed import launch_command

#: the environment of every launch: one intra-op thread per rank (2 ranks on the 2-core CI machine), offline,
#: and no failpoints inherited from the calling shell
ENV = {**{k: v for k, v in os.environ.items() if k != "TREEBENCH_FAILPOINTS"},
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (the ranks of a launch live in sessions of their own) and wait
    until the descendants are gone; ``pid`` itself, a child of the caller, is left for the caller to reap
    (``Popen.wait``), so that its exit status stays readable."""
    try:
        root = psutil.Process(pid)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [root, *children]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def tail(self, n: int = 4000) -> str:
        return f"exit status {self.returncode}\n--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}"


class Launch:
    """``accelerate launch --num_processes 2 ... -m bench.cli ARGS`` started in the background (a free
    port of its own: ``launch_command``); output goes to files under ``logs`` (two launches may run at once
    without filling a pipe)."""

    def __init__(self, args: list[str], logs: Path, env: dict[str, str] | None = None, num_processes: int = 2,
                 script: list[str] | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        cmd = launch_command(script or ["-m", "bench.cli", *args], num_processes=num_processes)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> Result:
        """The launch's result; on ``timeout`` the launcher and its ranks are killed and the test fails."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()
            raise AssertionError(f"the launch did not end within {timeout:.0f} s (killed):\n{self._result(-9).tail()}")
        return self._result(rc)

    def _result(self, rc: int) -> Result:
        return Result(rc, self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"))


def run_launch(args: list[str], logs: Path, timeout: float, **kw) -> Result:
    return Launch(args, logs, **kw).wait(timeout)
