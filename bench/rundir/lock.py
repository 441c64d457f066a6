"""One writer per run directory: an advisory lock held for the whole life of the process that writes it.

The lock is ``fcntl.flock`` on ``RUN/.lock``; the file also holds who took it (pid, host, process start
time, time taken, the command with its URL passwords redacted) as JSON, so a refused process can name the
holder. The kernel drops a flock when its process dies, however it dies (``kill -9`` included), so a lock
file with no flock on it is the normal trace of a crash: it is taken over with a warning. A clean exit
removes the file. The file is opened with ``O_NOFOLLOW``: a ``.lock`` that is a symbolic link is refused,
never written through. A lock file that cannot be written (disk full) is removed again and reported as a
``WriteFault`` (exit 1).

The same lock guards the output directory of ``bench compare`` (exclusive, like a run) and of ``bench sweep``
(``shared=KEY``: every worker of one study holds it together, a process of another study or a comparison
is refused).

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

from bench.errors import RunLocked, UsageError, WriteFault
from bench.rundir import failpoints
from bench.rundir.layout import LOCK
from bench.rundir.secrets import redact, redact_argv

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
            f"command: {redact(str(info.get('command', '?')))})")


def _read_info(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        info = json.loads(raw.decode() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


#: errno values of a lock file that cannot be written for want of space or a working disk (exit 1, not 2)
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _open_nofollow(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)


class RunLock:
    """The lock on one run directory (or, ``what``, another output directory). ``acquire`` raises
    ``RunLocked`` (exit 2) when a live process holds it; ``release`` removes the file. Also a context manager.

    ``shared=KEY``: processes giving the same key hold the lock together (the workers of one sweep study);
    anyone else, exclusive or with another key, is refused while one of them lives."""

    def __init__(self, run_dir: str | os.PathLike, what: str = "run directory", shared: str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.what = what
        self.shared = shared
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if self.fd is not None:
            return self
        for attempt in range(40):  # the holder may remove the file between our open and our flock: retry
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise RunLocked(f"cannot lock {self.what} {self.run_dir}: {e.strerror} (the file system may "
                                    f"not support locks; see docs/RUNDIR.md)") from None
                joined = self._join(fd, last_try=attempt == 39)
                if joined is None:  # a peer of ours was leaving: try again
                    time.sleep(0.05)
                    continue
                return joined
            if not self._same_file(fd):  # we locked a file its holder had just removed: not the lock any more
                os.close(fd)
                continue
            try:
                self._take(fd)
                if self.shared is not None:  # others of the same key may join from now on
                    fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise RunLocked(f"cannot lock {self.what} {self.run_dir}: its lock file keeps being replaced")

    def _open(self) -> int:
        try:
            return _open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunLocked(f"{self.path} is a symbolic link: treebench does not write its lock file through a "
                                f"link it did not create. Remove the link, then run the command again.") from None
            if e.errno in _SPACE_ERRNOS:
                raise self._write_fault(e) from None
            raise UsageError(f"cannot write to {self.what} {self.run_dir}: {e.strerror or e}") from None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.lstat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _join(self, fd: int, last_try: bool) -> RunLock | None:
        """The lock is held: join the holders when they share our key, else refuse. None: retry (the holders
        are releasing it, or it was replaced)."""
        info = _read_info(fd)
        if self.shared is None or info.get("shared") != self.shared:
            os.close(fd)
            raise RunLocked(self._held_message(info))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # a peer of our key holds it exclusively for a moment (taking it, or its last release)
            os.close(fd)
            if last_try:
                raise RunLocked(self._held_message(info)) from None
            return None
        if not self._same_file(fd) or _read_info(fd).get("shared") != self.shared:
            os.close(fd)
            return None
        self.fd = fd
        return self

    def _held_message(self, info: dict[str, Any]) -> str:
        if self.what != "run directory":
            return (f"{self.what} {self.run_dir} is in use by {_describe(info)}; one command writes it at a time. "
                    f"Wait for it to finish (or stop it), or choose another --out.")
        return (f"run directory {self.run_dir} is in use by {_describe(info)}; one process writes a run at a "
                f"time. Wait for it to finish (or stop it), then run the command again.")

    def _write_fault(self, e: OSError) -> WriteFault:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        fault = WriteFault(f"could not write the lock file {self.path}: {os.strerror(e.errno) if e.errno else e} ({name}); nothing was "
                           f"started and no lock file was left.\n  to continue: free space on the file system "
                           f"holding {self.run_dir} (or fix the disk), then run the command again.")
        fault.__cause__ = e
        return fault

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
                "command": " ".join(redact_argv(["bench", *sys.argv[1:]])) if sys.argv else "?"}
        if self.shared is not None:
            info["shared"] = self.shared
        data = json.dumps(info).encode()
        try:
            os.ftruncate(fd, 0)
            failpoints.hit("lock", self.path, partial=lambda: os.pwrite(fd, data[: len(data) // 2], 0))
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            os.fsync(fd)
        except OSError as e:  # we hold the flock: the file is ours to remove, so no empty lock file stays
            try:
                os.unlink(self.path)
            except OSError:
                pass
            raise self._write_fault(e) from None

    def release(self) -> None:
        if self.fd is None:
            return
        last = True
        if self.shared is not None:  # the last of the sharing processes removes the file
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                last = False
        if last:
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
        fd = _open_nofollow(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = _read_info(fd)
        # a shared lock (a sweep's workers) admits another shared one: test it with an exclusive one
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if info.get("shared") else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            return info
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
