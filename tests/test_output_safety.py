"""One writer per output, and a full or read-only disk: the run stops cleanly and the same command resumes."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from teacher_farm.client import cache as cache_module
from teacher_farm.client import lock as lock_module
from teacher_farm.client import shards
from teacher_farm.client.cache import CacheOptions, CacheRun
from teacher_farm.client.lock import OutputLock
from teacher_farm.schemas.errors import OutputLocked, OutputWriteError
from teacher_farm.schemas.scoring import Scoring
from tests.conftest import ROOT, load_manifest
from tests.standin import StandInTeacher

HOLD = """
import sys, time
from pathlib import Path
from teacher_farm.client.lock import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def corpus(tmp_path, n=40):
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"l{i}", "text": f"line number {i} " * 20}) + "\n" for i in range(n))
    )
    return path


def run(tmp_path, inp, out="out", **kw):
    opts = CacheOptions(
        input=str(inp), out_dir=tmp_path / out, scoring=Scoring(k=4), rows_per_shard=10, batch_lines=5, **kw
    )
    return asyncio.run(CacheRun(opts, StandInTeacher()).run())


def rows(out):
    import pyarrow.parquet as pq

    manifest = load_manifest(out)
    return pq.read_table(
        [out / s.file for s in sorted(manifest.shards.values(), key=lambda s: s.index)]
    ).to_pylist()


# --- one writer ---------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    inp = corpus(tmp_path)
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "out" / "manifest.json.lock")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked) as exc:
            run(tmp_path, inp)
        message = str(exc.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "wait for it" in message
        assert load_manifest(tmp_path / "out") is None  # it wrote nothing
        # Another shard index of a split run has its own lock.
        run(tmp_path, inp, parts=2, part=1)
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed): its lock is stale and the next writer takes it over.
    lock = OutputLock(tmp_path / "out" / "manifest.json.lock")
    with lock:
        assert lock.took_over["pid"] == holder.pid


def test_a_stale_lock_is_taken_over_and_says_so(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "out" / "manifest.json.lock"
    lock.parent.mkdir()
    lock.write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00Z"})
    )
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, corpus(tmp_path)).rows == 40
    assert f"taking over a stale lock from pid {dead.pid} on host {socket.gethostname()}" in caplog.text
    assert lock.read_text() == ""  # released at the end of the run


def test_a_live_holder_on_this_host_wins_even_without_flock(tmp_path, monkeypatch):
    """On a filesystem where flock does nothing, the pid in the lock file still stops a second writer."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / "x.lock"
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        monkeypatch.setattr("fcntl.flock", lambda fd, op: None)
        with pytest.raises(OutputLocked, match=f"pid {sleeper.pid}"):
            OutputLock(path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_where_flock_may_be_node_local_a_writer_of_another_host_taking_it_at_once_wins(tmp_path, monkeypatch):
    """On a network filesystem both hosts get the flock: the new holder waits, reads back, and stops when
    the other's later write is there."""
    path = tmp_path / "x.lock"
    monkeypatch.setattr(lock_module, "filesystem_type", lambda p: "nfs4")
    other = {"host": "node-17.other", "pid": 4242, "started": "2026-01-01T00:00:00Z", "heartbeat": 0}
    monkeypatch.setattr(lock_module.time, "sleep", lambda s: path.write_text(json.dumps(other)))
    with pytest.raises(OutputLocked, match="node-17.other"):
        OutputLock(path).acquire()


def test_on_a_local_disk_the_lock_is_taken_without_waiting(tmp_path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(lock_module.time, "sleep", waits.append)
    # Read from this machine's own mount table (whatever disk its temporary directory is on).
    assert lock_module.filesystem_type(Path("/proc/self")) == "proc"
    monkeypatch.setattr(lock_module, "filesystem_type", lambda p: "ext4")
    with OutputLock(tmp_path / "x.lock"):
        pass
    assert waits == []
    monkeypatch.setattr(lock_module, "filesystem_type", lambda p: None)  # not known: the settle stays
    with OutputLock(tmp_path / "x.lock"):
        pass
    assert waits == [lock_module.SETTLE_S]


def test_the_filesystem_type_is_that_of_the_deepest_mount_holding_the_path(tmp_path, monkeypatch):
    info = tmp_path / "mountinfo"
    info.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 27 0:50 / /scratch\\040data rw - nfs4 server:/export rw\n"
        "41 40 0:51 / /scratch\\040data/fast rw shared:1 - lustre mds@tcp:/fs rw\n"
    )
    real = lock_module.Path

    def fake(p):
        return real(info) if str(p) == "/proc/self/mountinfo" else real(p)

    monkeypatch.setattr(lock_module, "Path", fake)
    monkeypatch.setattr(lock_module.os.path, "realpath", lambda p: str(p))
    assert lock_module.filesystem_type("/scratch data/out/x.lock") == "nfs4"
    assert lock_module.filesystem_type("/scratch data/fast/x.lock") == "lustre"
    assert lock_module.filesystem_type("/scratch datax/x.lock") == "ext4"
    assert lock_module.filesystem_type("/home/x.lock") == "ext4"


# --- a full disk --------------------------------------------------------------------------


class FillingDisk:
    """A file object that takes ``room`` bytes and then fails as a full disk does."""

    written = 0

    def __init__(self, path, room):
        self.f = open(path, "wb")
        self.room = room

    def write(self, data):
        if FillingDisk.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FillingDisk.written += len(data)
        return self.f.write(data)

    def close(self):
        self.f.close()

    @property
    def closed(self):
        return self.f.closed

    def flush(self):
        self.f.flush()

    def tell(self):
        return self.f.tell()


def test_a_full_disk_stops_the_run_with_what_was_written_and_the_same_command_resumes(tmp_path, monkeypatch):
    inp = corpus(tmp_path)
    run(tmp_path, inp, "clean")
    clean = rows(tmp_path / "clean")
    one_shard = (tmp_path / "clean" / "part-000000.parquet").stat().st_size
    FillingDisk.written = 0
    monkeypatch.setattr(
        shards, "open_sink", lambda path: pa.PythonFile(FillingDisk(path, int(2.5 * one_shard)), mode="w")
    )
    with pytest.raises(OutputWriteError) as exc:
        run(tmp_path, inp)
    out = tmp_path / "out"
    message = str(exc.value)
    manifest = load_manifest(out)
    assert sorted(manifest.shards) == [0, 1]  # the finished shards, and only they
    written = sum(s.bytes for s in manifest.shards.values())
    assert f"cannot write {out / '.part-000002.parquet.tmp'}: No space left on device" in message
    assert f"{written:,} bytes" in message and "run the same command again" in message
    assert not list(out.glob(".*.tmp"))  # the unfinished shard's space is given back
    monkeypatch.undo()  # space freed
    summary = run(tmp_path, inp)
    assert summary.skipped_shards == 2 and rows(out) == clean


def test_a_read_only_output_says_which_path_and_resumes_once_writable(tmp_path, monkeypatch):
    inp = corpus(tmp_path)
    real = cache_module.save_manifest
    calls = []

    def read_only_after_first(manifest, out_dir, name="manifest.json"):
        calls.append(name)
        if len(calls) > 2:  # the new manifest, shard 0's commit, then the disk turns read-only
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(manifest, out_dir, name)

    monkeypatch.setattr(cache_module, "save_manifest", read_only_after_first)
    with pytest.raises(OutputWriteError, match=r"cannot write .*manifest\.json: Read-only file system"):
        run(tmp_path, inp)
    assert sorted(load_manifest(tmp_path / "out").shards) == [0]
    monkeypatch.undo()
    assert run(tmp_path, inp).rows == 40


def test_a_full_disk_through_the_cli_is_one_line_of_advice(tmp_path):
    """The message reaches the user as the CLI's one error line, exit status 1."""
    inp = corpus(tmp_path, 3)
    code = f"""
import errno, os, sys
import pyarrow as pa
from teacher_farm.client import shards
def full(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
shards.open_sink = full
from teacher_farm import cli
from tests.standin import StandInTeacher
import teacher_farm.client.transport as t
t.TeacherPool = lambda *a, **k: StandInTeacher()
sys.exit(cli.main(["cache", "--server", "http://unused", "--input", {str(inp)!r},
                   "--out", {str(tmp_path / "o")!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("teacher-farm cache: error: cannot write") and "No space left on device" in last
    assert "Traceback" not in proc.stderr
