"""Many ranks for real: ``torchrun --nproc_per_node 2`` on the CPU (gloo), over caches and an online teacher.

One launch serves every test here (starting two ranks costs seconds): this file is also the script
each rank runs. Every rank iterates each case for two shuffled epochs, with 0 and 2 DataLoader
workers, and runs an ``all_reduce`` at every step and at the end of every epoch, as a DDP loop
would: a rank with one step more than another fails there (or hangs, which the launch's timeout
turns into a failure). It writes the ``line`` numbers it saw and its steps to a JSON file that the
tests read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
#: Seconds the whole two-rank launch may take before it counts as a hang.
LAUNCH_TIMEOUT_S = 240
#: Seconds a rank waits in a collective for the other (gloo's timeout): a mismatch fails, not hangs.
COLLECTIVE_TIMEOUT_S = 60
BATCH_SIZE = 2
#: Online: batches of 2 sequences, batch i all token 10 + i (so an answer names its batch).
ONLINE_BATCHES = 7
VOCAB = 1000


# ------------------------------------------------------------------------------------ one rank


def rank_main(spec: dict, out: Path) -> None:
    """Run every case on this rank, in step with the others, and write what it saw."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from teacher_farm.training import OnlineTeacher, TopkDataset, collate_topk

    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()

    def in_step(value: int, where: str) -> None:
        # 1 per step, 0 at the end of an epoch: any other sum means the ranks are out of step.
        t = torch.tensor([float(value)])
        dist.all_reduce(t)
        if t.item() != value * world:
            raise SystemExit(f"rank {rank}: ranks out of step at {where} (sum {t.item()} for {value} each)")

    result: dict = {"rank": rank, "world": world, "datasets": {}, "online": {}}
    for name, case in spec["datasets"].items():
        for workers, context in ((0, None), (2, None), *(((2, "spawn"),) if case.get("spawn") else ())):
            ds = TopkDataset(case["path"], shuffle_shards=True, seed=7, **case["kwargs"])
            epochs = []
            for epoch in (0, 1):
                ds.set_epoch(epoch)
                loader = DataLoader(
                    ds,
                    batch_size=BATCH_SIZE,
                    num_workers=workers,
                    collate_fn=collate_topk,
                    multiprocessing_context=context,
                )
                lines, steps = [], 0
                for batch in loader:
                    lines += batch["line"].tolist()
                    steps += 1
                    in_step(1, f"{name}, {workers} workers, epoch {epoch}, step {steps}")
                in_step(0, f"the end of {name}, {workers} workers, epoch {epoch}")
                epochs.append({"lines": lines, "steps": steps})
            result["datasets"][f"{name}/{workers}{'/' + context if context else ''}"] = epochs
    batches = [torch.full((2, 4 + i), 10 + i) for i in range(ONLINE_BATCHES)]
    for name, kwargs in (("pad", {}), ("drop", {"drop_last": True})):
        got = []
        for batch in OnlineTeacher(batches, spec["teacher"], k=4, prefetch=2, **kwargs):
            got.append({"batch": int(batch["input_ids"][0, 0]) - 10, "lines": batch["line"].tolist()})
            in_step(1, f"online {name}, batch {len(got)}")
        in_step(0, f"the end of online {name}")
        result["online"][name] = got
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ a teacher


@contextmanager
def echo_teacher() -> Iterator[tuple[str, list[int]]]:
    """A teacher on loopback, in a thread, that scores exactly the tokens it is sent (the stand-in's
    top-k, ``tests/standin.py``): its URL, and the first token of every request it answers."""
    import pyarrow as pa

    from teacher_farm.schemas import ARROW_STREAM, FINGERPRINT_HEADER
    from teacher_farm.schemas.arrow import results_to_table
    from teacher_farm.schemas.wire import Info, Versions
    from tests.helpers import free_port
    from tests.standin import score

    info = Info(
        model="echo",
        model_fingerprint="e" * 16,
        tokenizer_fingerprint="t" * 16,
        vocab_size=VOCAB,
        k_max=64,
        max_model_len=4096,
        max_input_tokens=4095,
        max_inputs_per_request=1024,
        adds_bos=True,
        versions=Versions(teacher_farm="-", schema_version=1, vllm="-"),
        scoring="pooled",
    )
    seen: list[int] = []

    def answer(body: bytes) -> bytes:
        req = json.loads(body)
        seen.append(req["inputs"][0]["token_ids"][0])
        table = results_to_table(
            [score(x["id"], np.asarray(x["token_ids"], np.int32), req["k"], VOCAB) for x in req["inputs"]],
            req["k"],
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(
                    (int(h.split(":", 1)[1]) for h in head[1:] if h.lower().startswith("content-length:")), 0
                )
                body = await reader.readexactly(length) if length else b""
                if head[0].startswith("GET /v1/info"):
                    payload, ctype = info.model_dump_json().encode(), "application/json"
                else:
                    payload, ctype = answer(body), ARROW_STREAM
                writer.write(
                    f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n"
                    f"{FINGERPRINT_HEADER}: {info.fingerprint}\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    port = free_port()
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), asyncio.Event()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        started.set()
        async with server:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "the echo teacher did not start"
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


# ------------------------------------------------------------------------------------ the launch


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    from tests.helpers import UNEVEN, write_cache, write_window_cache

    root = tmp_path_factory.mktemp("torchrun")
    uneven = write_cache(root / "uneven", UNEVEN)  # row groups of 3, 3, 1 and 3, 1 rows: 11 rows
    demo = write_cache(root / "demo", {0: [6, 3, 5]})  # the demo's shape: one shard, one row group
    lines = write_window_cache(root / "windows", [30, 4, 17, 9, 40, 3, 12, 25, 6])
    return {
        "uneven": (uneven.path, sorted(uneven.rows)),
        "demo": (demo.path, sorted(demo.rows)),
        "windows": (root / "windows", sorted(lines)),
        "root": root,
    }


@pytest.fixture(scope="module")
def ranks(caches) -> list[dict]:
    """Launch two ranks with ``torchrun`` over every case; what each rank saw."""
    from tests.helpers import free_port

    spec = {
        "datasets": {
            "uneven": {"path": str(caches["uneven"][0]), "kwargs": {}, "spawn": True},
            "uneven-drop": {"path": str(caches["uneven"][0]), "kwargs": {"drop_last": True}},
            "demo": {"path": str(caches["demo"][0]), "kwargs": {}},
            "windows": {"path": str(caches["windows"][0]), "kwargs": {"join_windows": True}},
        }
    }
    out = caches["root"] / "ranks"
    out.mkdir()
    with echo_teacher() as (url, requests):
        spec["teacher"] = url
        (out / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
                __file__,
                "--spec",
                str(out / "spec.json"),
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(
                f"torchrun hung: not done within {LAUNCH_TIMEOUT_S} s (a rank waiting on a collective "
                f"the other never joined?)\n{output[-6000:]}"
            )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-6000:]}"
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    return [*results, {"requests": list(requests)}]


def shares(ranks: list[dict], case: str) -> Iterator[tuple[str, int, list[list[int]], list[int]]]:
    """(run, epoch, each rank's lines, each rank's steps) for every run of ``case``."""
    for run in ranks[0]["datasets"]:
        if run.split("/")[0] == case:
            for epoch in (0, 1):
                per_rank = [r["datasets"][run][epoch] for r in ranks[:2]]
                yield run, epoch, [p["lines"] for p in per_rank], [p["steps"] for p in per_rank]


# ------------------------------------------------------------------------------------ the tests


def test_ranks_share_the_cache_padded_to_equal_steps(ranks, caches):
    rows = caches["uneven"][1]  # 11 rows: 6 a rank, one of them read twice
    orders = {}
    for run, epoch, lines, steps in shares(ranks, "uneven"):
        assert [len(x) for x in lines] == [6, 6], run
        assert steps[0] == steps[1] == (3 if run == "uneven/0" else 4), (
            run
        )  # 2 workers: 3 + 3 rows, 2 + 2 batches
        every = lines[0] + lines[1]
        assert sorted(set(every)) == rows, f"{run}, epoch {epoch}: rows left out"
        assert len(set(lines[0]) & set(lines[1])) == 1, (
            f"{run}, epoch {epoch}: ranks overlap beyond the padding"
        )
        orders.setdefault(run, []).append(every)
    assert set(orders) == {"uneven/0", "uneven/2", "uneven/2/spawn"}
    for run, (first, second) in orders.items():
        assert first != second, f"{run}: the same order in both epochs"
    # Workers only split a rank's share: the same rows per rank however many there are.
    for epoch in (0, 1):
        per_run = {
            run: [sorted(x) for x in lines] for run, e, lines, _ in shares(ranks, "uneven") if e == epoch
        }
        assert per_run["uneven/0"] == per_run["uneven/2"] == per_run["uneven/2/spawn"]


def test_ranks_share_the_cache_with_the_last_row_dropped(ranks, caches):
    rows = caches["uneven"][1]
    dropped = []
    for run, epoch, lines, steps in shares(ranks, "uneven-drop"):
        assert [len(x) for x in lines] == [5, 5] and steps[0] == steps[1], run
        every = lines[0] + lines[1]
        assert len(set(every)) == 10 and set(every) <= set(rows), f"{run}, epoch {epoch}: ranks overlap"
        dropped.append(set(rows) - set(every))
    assert all(len(d) == 1 for d in dropped)


def test_a_cache_of_one_row_group_feeds_both_ranks(ranks, caches):
    """The demo's shape, where one rank used to read every row and the other none."""
    for run, _epoch, lines, steps in shares(ranks, "demo"):
        assert [len(x) for x in lines] == [2, 2] and steps[0] == steps[1] >= 1, run
        assert sorted(set(lines[0] + lines[1])) == caches["demo"][1], run


def test_joined_windows_are_dealt_as_whole_lines(ranks, caches):
    lines_of_cache = caches["windows"][1]  # 9 lines in 19 windows: 5 lines a rank
    for run, _epoch, lines, steps in shares(ranks, "windows"):
        assert [len(x) for x in lines] == [5, 5] and steps[0] == steps[1], run
        assert sorted(set(lines[0] + lines[1])) == lines_of_cache, run
        assert len(set(lines[0]) & set(lines[1])) == 1, run


def test_the_online_teacher_gives_each_rank_its_own_batches(ranks):
    got = {name: [[b["batch"] for b in r["online"][name]] for r in ranks[:2]] for name in ("pad", "drop")}
    # 7 batches, i to rank i % 2: rank 1 repeats the last round's batch; drop_last leaves it out.
    assert got["pad"] == [[0, 2, 4, 6], [1, 3, 5, 6]]
    assert got["drop"] == [[0, 2, 4], [1, 3, 5]]
    for r in ranks[:2]:
        for b in r["online"]["pad"] + r["online"]["drop"]:
            assert b["lines"] == [
                2 * b["batch"],
                2 * b["batch"] + 1,
            ]  # sequences counted over every rank's batches
    # The teacher scored each rank's own batches, the padding once more, nothing else.
    assert Counter(t - 10 for t in ranks[2]["requests"]) == Counter([*range(7), 6, *range(6)])


# ------------------------------------------------------------------------------------ in process


def test_online_ranks_take_turns_without_a_process_group():
    from teacher_farm.training import OnlineTeacher

    batches = [torch.full((2, 4 + i), 10 + i) for i in range(ONLINE_BATCHES)]
    with echo_teacher() as (url, _):

        def taken(world: int, **kwargs) -> list[list[int]]:
            return [
                [
                    int(b["input_ids"][0, 0]) - 10
                    for b in OnlineTeacher(batches, url, k=4, rank=r, world_size=world, **kwargs)
                ]
                for r in range(world)
            ]

        assert taken(1) == [list(range(7))]
        assert taken(3) == [[0, 3, 6], [1, 4, 6], [2, 5, 6]]
        assert taken(3, drop_last=True) == [[0, 3], [1, 4], [2, 5]]
        assert taken(8) == [[0], [1], [2], [3], [4], [5], [6], [0]]
        assert taken(8, drop_last=True) == [[]] * 8


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of the torchrun tests")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank_main(json.loads(args.spec.read_text()), args.out)
