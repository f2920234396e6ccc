"""One writer per output: a lock file beside the manifest it guards, naming its holder and its heartbeat.

``manifest.json.lock`` (one per ``--part`` when a corpus is split) holds the host, pid, start
time and heartbeat of the ``teacher-farm cache`` writing into the directory, under an exclusive
``flock`` that the kernel drops when that process dies. A second writer is refused at once with the
holder's name. Where ``flock`` is only node-local (Lustre ``localflock``, NFS ``local_lock=flock``)
two hosts both get it: the holder then refreshes its heartbeat every ``HEARTBEAT_S``, and a lock of
another host whose heartbeat is younger than ``STALE_S`` is never taken over (a lock of this host
is, once its pid is gone). On such a filesystem (any but a disk of this host or memory) the new
holder also waits ``SETTLE_S`` after writing itself in and reads the file back. A holder that finds
its lock file naming another writer stops (``check``). A lock file whose holder is gone (killed,
crashed, its host rebooted) is stale: the next run takes it over and says so in its log.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from teacher_farm.schemas.errors import OutputLocked

log = logging.getLogger(__name__)

#: Seconds between the holder's heartbeats.
HEARTBEAT_S = 5.0
#: A lock of another host whose heartbeat is younger than this is alive (clocks may differ by seconds).
STALE_S = 60.0
#: After writing itself into the lock file, the new holder waits this long and reads it back: a writer
#: of another host that took it in the same moment is then seen (the later write wins, the other stops).
SETTLE_S = 0.2
#: Filesystems of this host's own disks or memory, whose flock every writer that can open the file sees: no
#: settle there. Any other (NFS, Lustre, GPFS, CIFS, FUSE, an unknown one) may grant flock node-locally.
LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs", "jfs", "zfs", "tmpfs", "ramfs", "overlay"}
)


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` lies on (``/proc/self/mountinfo``); None where that is unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:  # not Linux
        return None
    target = os.path.realpath(path)
    best, kind = -1, None
    for line in lines:
        fields, _, tail = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not tail:
            continue
        # Mount points escape space, tab, newline and backslash as octal.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # The deepest mount point holding the path wins; of equal ones, the last mounted (over the others).
        if inside and len(point) >= best:
            best, kind = len(point), tail.split()[0]
    return kind


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    age = holder.get("heartbeat")
    beat = f", heartbeat {time.time() - age:.0f} s ago" if isinstance(age, (int, float)) else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started', '?')}{beat}"


class OutputLock:
    """Hold ``path`` exclusively for as long as the ``with`` block runs."""

    def __init__(self, path: Path, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.path = path
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._fd: int | None = None
        #: The holder this lock took over from, when the previous one died without letting go.
        self.took_over: dict[str, Any] | None = None
        self._me: dict[str, Any] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        #: Set when the lock file was found naming another writer: this one must stop.
        self.lost: dict[str, Any] | None = None

    @property
    def _held(self) -> int:
        """The lock file's descriptor, while the lock is held."""
        assert self._fd is not None, "the lock is not held"
        return self._fd

    def _read(self) -> dict[str, Any]:
        try:
            holder = json.loads(os.pread(self._held, 4096, 0) or b"{}")
            return holder if isinstance(holder, dict) else {}
        except (ValueError, OSError):
            return {}

    def _alive_elsewhere(self, holder: dict[str, Any]) -> bool:
        """Whether ``holder`` is another live writer: a live pid of this host, or a fresh heartbeat of
        another."""
        if not isinstance(holder.get("pid"), int):
            return False
        if holder.get("host") == socket.gethostname():
            return holder["pid"] != os.getpid() and _alive(holder["pid"])
        beat = holder.get("heartbeat")
        return isinstance(beat, (int, float)) and time.time() - beat < self.stale_s

    def acquire(self) -> None:
        """Take the lock or raise ``OutputLocked`` naming the process that holds it."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputLocked(self._refusal(self._read())) from None
            # flock is advisory and may be node-local or a no-op on network filesystems: a live
            # holder on this host, or one of another host with a fresh heartbeat, still wins.
            holder = self._read()
            if self._alive_elsewhere(holder):
                raise OutputLocked(self._refusal(holder))
            self._me = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self._write()
            if filesystem_type(self.path) not in LOCAL_FILESYSTEMS:
                time.sleep(SETTLE_S)
                if (now := self._read()).get("pid") != self._me["pid"] or now.get("host") != self._me["host"]:
                    raise OutputLocked(self._refusal(now))
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        if holder.get("pid") is not None:
            self.took_over = holder
            log.warning(
                "%s: taking over a stale lock from %s, which is no longer running",
                self.path,
                _describe(holder),
            )
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._beat.start()

    def _write(self) -> None:
        data = json.dumps({**self._me, "heartbeat": time.time()}).encode() + b"\n"
        os.ftruncate(self._held, 0)
        os.pwrite(self._held, data, 0)
        os.fsync(self._held)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read()
                if holder and (holder.get("pid"), holder.get("host")) != (self._me["pid"], self._me["host"]):
                    self.lost = holder
                    return
                self._write()
            except OSError as exc:  # a full or unreachable disk: the run's own writes will say so
                log.warning("%s: cannot refresh the lock's heartbeat: %s", self.path, exc)

    def check(self) -> None:
        """Raise ``OutputLocked`` if another writer has taken this lock over (before committing anything)."""
        if self.lost is not None:
            raise OutputLocked(
                f"{self.path.parent}: another teacher-farm cache ({_describe(self.lost)}) took over the lock "
                f"{self.path} while this one ran; this run stops without committing more. Run one writer at "
                "a time"
            )

    def _refusal(self, holder: dict[str, Any]) -> str:
        who = _describe(holder) if holder.get("pid") is not None else "another process"
        return (
            f"{self.path.parent} is being written by another teacher-farm cache ({who}; lock file "
            f"{self.path}); wait for it to finish or stop it, or choose another --out (or --part)"
        )

    def release(self) -> None:
        """Let go: the file stays, emptied, so the next run finds no holder to take over from."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        try:
            if self.lost is None:
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
