"""One writer per output: a lock file beside the manifest it guards, naming its holder.

``manifest.json.lock`` (one per ``--shard-index`` when a corpus is split) holds the host, pid and
start time of the ``teacher-farm cache`` writing into the directory, under an exclusive ``flock``
that the kernel drops when that process dies, however it dies. A second writer is refused at once
with the holder's name. A lock file whose holder is gone (killed, crashed, its host rebooted) is
stale: the next run takes it over and says so in its log.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from teacher_farm.schemas.errors import OutputLocked

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started', '?')}"


class OutputLock:
    """Hold ``path`` exclusively for as long as the ``with`` block runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        #: The holder this lock took over from, when the previous one died without letting go.
        self.took_over: dict | None = None

    def _read(self) -> dict:
        try:
            return json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except (ValueError, OSError):
            return {}

    def acquire(self) -> None:
        """Take the lock or raise ``OutputLocked`` naming the process that holds it."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder: dict = {}
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._read()
                raise OutputLocked(self._refusal(holder)) from None
            holder = self._read()
            here = socket.gethostname()
            # flock is advisory and may be a no-op on some network filesystems: a live holder on
            # this host still wins.
            if holder.get("host") == here and isinstance(holder.get("pid"), int) and holder["pid"] != os.getpid() \
                    and _alive(holder["pid"]):
                raise OutputLocked(self._refusal(holder))
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        if holder.get("pid") is not None:
            self.took_over = holder
            log.warning("%s: taking over a stale lock from %s, which is no longer running", self.path, _describe(holder))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(me).encode() + b"\n", 0)
        os.fsync(self._fd)

    def _refusal(self, holder: dict) -> str:
        who = _describe(holder) if holder.get("pid") is not None else "another process"
        return (
            f"{self.path.parent} is being written by another teacher-farm cache ({who}; lock file {self.path}); "
            "wait for it to finish or stop it, or choose another --out (or --shard-index)"
        )

    def release(self) -> None:
        """Let go: the file stays, emptied, so the next run finds no holder to take over from."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # a full or read-only disk must not hide the error that stopped the run
            pass
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
