"""How many tokens/s one ``teacher-farm cache`` process sustains when the teachers cost nothing.

    python benchmarks/client_throughput.py [--seconds 20] [--tokens-per-line 2048] [--k 16] \
        [--logprob-dtype float16]

A stand-in teacher runs in a child process on loopback: a bare HTTP/1.1 server that answers
``/v1/info`` and ``/v1/topk`` at once, with the Arrow wire a teacher-farm server sends (a zstd IPC
stream; one row of ``--tokens-per-line`` tokens per input, realistic top-k ids and logprobs built
once). The client is the real command (``teacher_farm.cli.main(["cache", ...])``) in this
process: reading JSONL, batching, HTTP, Arrow decoding, Parquet shards, manifest. Prints the
client's tokens/s and its resident memory over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from teacher_farm.schemas.arrow import ScoredSequence, cast_logprobs, results_to_table  # noqa: E402
from tests.helpers import free_port  # noqa: E402

VOCAB = 128_256


def answer_row(tokens: int, k: int, rng: np.random.Generator) -> ScoredSequence:
    """One scored sequence shaped like a real teacher's: sorted logprobs, ids spread over the vocabulary."""
    # Finite logprobs (the client refuses an answer holding -inf): probabilities kept above 1e-30.
    probs = np.maximum(rng.dirichlet(np.full(k + 1, 0.3), size=tokens)[:, :k], 1e-30)
    lps = np.sort(np.log(probs).astype(np.float32), axis=1)[:, ::-1]
    return ScoredSequence(
        None,
        rng.integers(0, VOCAB, tokens, dtype=np.int32),
        rng.integers(0, VOCAB, (tokens, k), dtype=np.int32),
        np.ascontiguousarray(lps),
        np.log(np.maximum(rng.random(tokens - 1, dtype=np.float32), 1e-30)),
        rng.integers(1, 50, tokens - 1, dtype=np.int32),
    )


def answer_table(rows: int, tokens: int, k: int, dtype: str) -> pa.Table:
    rng = np.random.default_rng(rows)
    return cast_logprobs(results_to_table([answer_row(tokens, k, rng) for _ in range(rows)], k), dtype)


def arrow_answer(table: pa.Table, ids: list) -> bytes:
    """``table`` as an answer to inputs of ``ids`` (the client checks that the rows are the inputs it
    sent)."""
    table = table.set_column(0, "id", pa.array(ids, pa.string()))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def serve(port: int, tokens: int, ready: mp.Event) -> None:
    """The stand-in teacher: answers from a cache of prebuilt bodies, one per (inputs, k, dtype)."""
    info = orjson.dumps(
        {
            "model": "stand-in",
            "model_fingerprint": "0" * 16,
            "tokenizer_fingerprint": "0" * 16,
            "vocab_size": VOCAB,
            "k_max": 64,
            "max_model_len": 1 << 20,
            "max_input_tokens": (1 << 20) - 1,
            "max_inputs_per_request": 4096,
            "adds_bos": True,
            "versions": {"teacher_farm": "-", "schema_version": 2, "vllm": "-"},
        }
    )
    bodies: dict[tuple, pa.Table] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *headers = head.decode("latin-1").split("\r\n")
                length = next(
                    (int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0
                )
                body = await reader.readexactly(length) if length else b""
                if request_line.startswith("GET /v1/info"):
                    payload, ctype = info, b"application/json"
                else:
                    req = orjson.loads(body)
                    key = (len(req["inputs"]), req["k"], req.get("logprob_dtype", "float32"))
                    if key not in bodies:
                        bodies[key] = answer_table(key[0], tokens, key[1], key[2])
                    payload = arrow_answer(bodies[key], [x.get("id") for x in req["inputs"]])
                    ctype = b"application/vnd.apache.arrow.stream"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: "
                    + ctype
                    + b"\r\nX-Teacher-Fingerprint: "
                    + b"0" * 16
                    + b"/"
                    + b"0" * 16
                    + b"\r\nContent-Length: "
                    + str(len(payload)).encode()
                    + b"\r\n\r\n"
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="about how long the client runs")
    p.add_argument("--tokens-per-line", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--logprob-dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--target-rate", type=float, default=500_000, help="tokens/s the corpus is sized for")
    p.add_argument("--work", type=Path, default=ROOT / "bench-out" / "throughput")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    lines = max(64, int(a.seconds * a.target_rate / a.tokens_per_line))
    corpus = a.work / "corpus.jsonl"
    with open(corpus, "wb") as f:
        for i in range(lines):
            f.write(
                orjson.dumps(
                    {"id": f"doc-{i}", "text": "lorem ipsum dolor sit amet " * (a.tokens_per_line // 6)}
                )
                + b"\n"
            )

    port = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    teacher = ctx.Process(target=serve, args=(port, a.tokens_per_line, ready), daemon=True)
    teacher.start()
    ready.wait(60)

    from teacher_farm.cli import cache_main

    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(0.5):
            samples.append((time.monotonic() - t0, rss_mib(), pa.total_allocated_bytes() / 2**20))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cache_main(
            [
                "--server",
                f"http://127.0.0.1:{port}",
                "--input",
                str(corpus),
                "--out",
                str(a.work / "cache"),
                "--k",
                str(a.k),
                "--logprob-dtype",
                a.logprob_dtype,
                "--max-length",
                str(1 << 19),
            ]
        )
    seconds = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    teacher.terminate()
    manifest = json.loads((a.work / "cache" / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["shards"].values())
    parquet = sum(s["bytes"] for s in manifest["shards"].values())
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    rss = [r for _, r, _ in samples]
    result = {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "client_cpu_s": round(cpu, 1),
        "parquet_bytes_per_token": round(parquet / tokens, 1),
        "rss_mib_first_quarter_max": round(max(rss[: max(1, len(rss) // 4)]), 0) if rss else None,
        "rss_mib_max": round(max(rss), 0) if rss else None,
        "k": a.k,
        "logprob_dtype": a.logprob_dtype,
        "tokens_per_line": a.tokens_per_line,
        "lines": lines,
    }
    shutil.rmtree(a.work / "cache", ignore_errors=True)
    if a.json:
        print(json.dumps(result))
        return
    print(out.getvalue().strip())
    print(
        f"client: {tokens:,} tokens in {seconds:.1f} s = {tokens / seconds:,.0f} tokens/s "
        f"(CPU {cpu:.1f} s; {parquet / tokens:.1f} Parquet bytes/token)"
    )
    print(
        "RSS over the run (s -> MiB, of which Arrow): "
        + ", ".join(f"{t:.0f}->{r:.0f} ({a:.0f})" for t, r, a in samples[:: max(1, len(samples) // 16)])
    )


if __name__ == "__main__":
    main()
