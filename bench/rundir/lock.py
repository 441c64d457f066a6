"""One writer per run directory: an advisory lock held for the whole life of the process that writes it.

The lock is ``fcntl.flock`` on ``RUN/.lock``; the file also holds who took it (pid, host, process start
time, time taken) as JSON, so a refused process can name the holder. The kernel drops a flock when its
process dies, however it dies (``kill -9`` included), so a lock file with no flock on it is the normal
trace of a crash: it is taken over with a warning. A clean exit removes the file.

What it cannot guarantee (docs/RUNDIR.md):
- file systems whose ``flock`` is local to one machine (NFS mounted ``nolock`` or ``local_lock=all``,
  some FUSE or object-store mounts): two processes on different machines both get the lock there. A lock
  file naming another host is therefore never taken over silently: the process is refused and told to
  remove the file once it knows that the other process is gone.
- a holder on another host that died: its lock may linger until the file server expires it (NFSv4
  leases), and this host cannot check that process; the same refusal applies.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.errors import RunLocked, UsageError
from bench.rundir.layout import LOCK

LOCK_NAME = LOCK  # the file name is the run directory layout's (bench.rundir.layout)


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22; tells a reused pid from
    the original process), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return now is None or start is None or now == start


def _describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {info.get('since', '?')}, "
            f"command: {info.get('command', '?')})")


def _read_info(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        info = json.loads(raw.decode() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """The lock on one run directory. ``acquire`` raises ``RunLocked`` (exit 2) when a live process holds
    it; ``release`` removes the file. Also a context manager."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if self.fd is not None:
            return self
        for _ in range(20):  # the holder may remove the file between our open and our flock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"cannot write to run directory {self.run_dir}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                info = _read_info(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLocked(self._held_message(info)) from None
                raise RunLocked(f"cannot lock run directory {self.run_dir}: {e.strerror} (the file system may "
                                f"not support locks; see docs/RUNDIR.md)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder had just removed: not the lock any more
                os.close(fd)
                continue
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise RunLocked(f"cannot lock run directory {self.run_dir}: its lock file keeps being replaced")

    def _held_message(self, info: dict[str, Any]) -> str:
        return (f"run directory {self.run_dir} is in use by {_describe(info)}; one process writes a run at a "
                f"time. Wait for it to finish (or stop it), then run the command again.")

    def _take(self, fd: int) -> None:
        """We hold the flock: a previous holder named in the file died (or exited without cleaning)."""
        old = _read_info(fd)
        host = socket.gethostname()
        if old.get("pid") is not None:
            if old.get("host") != host:
                raise RunLocked(
                    f"run directory {self.run_dir} is locked by {_describe(old)}, which this host ({host}) cannot "
                    f"check. Its lock is not held here, which on a shared file system without working locks "
                    f"does not prove that it stopped. If that process is gone, remove {self.path} and run the "
                    f"command again.")
            if int(old["pid"]) != os.getpid() and _pid_alive(int(old["pid"]), old.get("start")):
                raise RunLocked(
                    f"run directory {self.run_dir} is locked by {_describe(old)}, which is still running, but "
                    f"the file system let this process take the lock too (locks do not work there); refusing "
                    f"to write the run twice.")
            print(f"warning: taking over the lock of {self.run_dir}: its holder {_describe(old)} is no longer "
                  f"running (it crashed or was killed)", file=sys.stderr, flush=True)
        pid = os.getpid()
        info = {"pid": pid, "host": host, "start": process_start(pid),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(["bench", *sys.argv[1:]]) if sys.argv else "?"}
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so nobody locks the file we remove
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds the lock of ``run_dir`` right now, or None (nobody, or a dead holder's leftover file)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
