"""One-invocation throughput benchmark of the ways to build a top-k teacher cache.

    python benchmarks/harness.py [--docs 96 --doc-tokens 500 --ks 16,64 --vocab 4096 --hidden 512 ...]

Paths, all on the same model, documents and machine:
  (c) ceiling:  the engine in process, prefill only (no logprobs)
  (e) flat:     the engine in process with vLLM's flat prompt logprobs turned into numpy (no storage)
  (p) pooled:   the engine in process with teacher-farm's in-worker reduction (no HTTP, no storage)
  (a) ours:     ``teacher-farm serve`` (pooled backend) + ``teacher-farm cache`` into Parquet, end to end
  (l) ours, prompt-logprobs: the same with ``serve --scoring prompt-logprobs``
  (b) openai:   vLLM's OpenAI server (/v1/completions + prompt_logprobs) + a JSON client writing Parquet
  (d) seed:     HF transformers, batch 1, full log_softmax + topk, pyarrow (the seed script; on the GPU
                when there is one)

Every timed path is first warmed up, untimed, on the first documents; ``--repeat N`` times each path
and k N times and reports the median run beside all of them. Paths e, p, a, l and b run at every k
of ``--ks``. ``--corpus realistic`` draws log-normal document
lengths (median ~400 tokens, a tail up to the max length) instead of uniform ones. For a and l the
table also gives the steady-state rate: tokens/s between 10% and 90% of the tokens, from the client's
progress log. Prints a Markdown table: tokens/s, the ratio to (c), wire and Parquet bytes/token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import free_port, stop_group  # noqa: E402


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def doc_lengths(kind: str, docs: int, doc_tokens: int, max_len: int, seed: int = 0) -> list[int]:
    """Uniform ``doc_tokens``, or log-normal (median ``doc_tokens``, sigma 1) cut to 16..max_len."""
    if kind == "uniform":
        return [doc_tokens] * docs
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(doc_tokens), 1.0, size=docs), 16, max_len - 2).astype(int).tolist()


def make_corpus(work: Path, model: Path, lengths: list[int]) -> tuple[Path, list[list[int]]]:
    """Documents of about the given token lengths, cut from the sample corpus."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(x)["text"] for x in (ROOT / "examples" / "sample.jsonl").read_text().splitlines()]
    stream = " ".join(texts * 50)
    ids = tok(stream, add_special_tokens=False)["input_ids"]
    while len(ids) < sum(lengths):
        ids = ids + ids
    out, token_ids = work / "corpus.jsonl", []
    starts = np.cumsum([0, *lengths])
    with open(out, "w", encoding="utf-8") as f:
        for i in range(len(lengths)):
            chunk = ids[starts[i] : starts[i + 1] - 1]
            text = tok.decode(chunk)
            f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
            token_ids.append(tok(text, add_special_tokens=True)["input_ids"])
    return out, token_ids


def engine_flags(a) -> list[str]:
    """The same engine settings for every path."""
    flags = [
        "--dtype",
        a.dtype,
        "--max-model-len",
        str(a.max_model_len),
        "--gpu-memory-utilization",
        str(a.gpu_memory_utilization),
    ]
    if a.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    if a.enforce_eager:
        flags.append("--enforce-eager")
    return flags


class OursServer:
    """``teacher-farm serve`` on loopback with one scoring backend, reused for every k."""

    def __init__(self, a, model: Path, work: Path, scoring: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(work / f"ours-{scoring}-server.log", "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "teacher_farm.cli",
                "serve",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--k-max",
                str(max(a.ks)),
                "--scoring",
                scoring,
                *engine_flags(a),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_health(self.url + "/health", self.proc)

    def close(self) -> None:
        stop_group(self.proc)


def run_ours(a, server: OursServer, corpus: Path, work: Path, k: int, tag: str = "cache") -> dict:
    out = work / f"ours-{tag}-{server.port}-{k}"
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "teacher_farm.cli",
            "cache",
            "--server",
            server.url,
            "--input",
            str(corpus),
            "--out",
            str(out),
            "--k",
            str(k),
            "--logprob-dtype",
            a.logprob_dtype,
            "--concurrency",
            str(a.concurrency),
            "--log-every",
            "0.2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["shards"].values())
    parquet = sum(s["bytes"] for s in manifest["shards"].values())
    return {
        "tokens": tokens,
        "seconds": seconds,
        "parquet": parquet,
        "wire": _wire_from(proc.stdout),
        "steady": steady_rate(proc.stderr, tokens),
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median duration (the lower middle one of an even count), with every duration."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [r["seconds"] for r in runs]}


def steady_rate(log: str, total: int, lo: float = 0.1, hi: float = 0.9) -> float | None:
    """Tokens/s between ``lo`` and ``hi`` of ``total`` tokens, from the client's JSON progress lines."""
    points = [(0.0, 0)]
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == "progress" and "elapsed_s" in entry:
            points.append((entry["elapsed_s"], entry["tokens"]))
    if len(points) < 3:
        return None
    t, n = np.array(points, dtype=float).T
    t_lo, t_hi = np.interp([lo * total, hi * total], n, t, right=np.nan)
    if not np.isfinite(t_hi) or t_hi <= t_lo:
        return None
    return (hi - lo) * total / (t_hi - t_lo)


def _wire_from(stdout: str) -> int | None:
    """The answer bytes the client received, from its summary line."""
    for part in stdout.split(";"):
        if "wire bytes" in part:
            return int(part.split("wire bytes")[0].strip().split()[-1].replace(",", ""))
    return None


def run_openai(a, model: Path, token_ids: list[list[int]], work: Path, k: int) -> dict:
    """vLLM's own server, prompt_logprobs over JSON, a straightforward client writing Parquet."""
    import httpx
    import pyarrow as pa
    import pyarrow.parquet as pq

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "openai-server.log", "wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-enable-prefix-caching",
            "--max-logprobs",
            str(max(a.ks)),
            *engine_flags(a),
        ],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_health(url + "/health", server)
        wire = 0

        async def one(client, ids):
            nonlocal wire
            r = await client.post(
                "/v1/completions",
                json={
                    "model": str(model),
                    "prompt": ids,
                    "max_tokens": 1,
                    "temperature": 0,
                    "prompt_logprobs": k,
                    "logprobs": k,
                    "return_tokens_as_token_ids": True,
                },
            )
            r.raise_for_status()
            wire += len(r.content)
            choice = r.json()["choices"][0]
            n = len(ids)
            topk_ids = np.zeros((n, k), np.int32)
            topk_lps = np.zeros((n, k), np.float32)
            tgt = np.zeros(n - 1, np.float32)
            for i, pos in enumerate(choice["prompt_logprobs"][1:]):
                ranked = sorted((v["rank"], int(t), v["logprob"]) for t, v in pos.items())
                top = [x for x in ranked if x[0] <= k][:k]
                topk_ids[i] = [t for _, t, _ in top]
                topk_lps[i] = [lp for _, _, lp in top]
                tgt[i] = pos[str(ids[i + 1])]["logprob"]
            last = sorted(
                ((lp, int(t.split(":")[-1])) for t, lp in choice["logprobs"]["top_logprobs"][0].items()),
                reverse=True,
            )[:k]
            topk_lps[-1] = [lp for lp, _ in last]
            topk_ids[-1] = [t for _, t in last]
            return ids, topk_ids, topk_lps, tgt

        async def main():
            sem = asyncio.Semaphore(a.concurrency)
            async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

                async def bounded(ids):
                    async with sem:
                        return await one(client, ids)

                return await asyncio.gather(*(bounded(ids) for ids in token_ids))

        started = time.perf_counter()
        results = asyncio.run(main())
        table = pa.table(
            {
                "input_ids": [r[0] for r in results],
                "topk_ids": [r[1].tolist() for r in results],
                "topk_logprobs": [r[2].tolist() for r in results],
                "target_logprobs": [r[3].tolist() for r in results],
            }
        )
        path = work / "openai.parquet"
        pq.write_table(table, path, compression="zstd")
        seconds = time.perf_counter() - started
        tokens = sum(len(x) for x in token_ids)
        return {"tokens": tokens, "seconds": seconds, "parquet": path.stat().st_size, "wire": wire}
    finally:
        stop_group(server)


#: Documents run once at each k, untimed, before every timed path.
WARM_DOCS = 32

IN_PROCESS = r"""
import asyncio, json, sys, time
import numpy as np
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.v1.engine.async_llm import AsyncLLM

WARM_DOCS = %d

async def main(args, token_ids, ks, pooled, repeat):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    seconds = {}
    for k in ks:
        if pooled:
            from vllm import PoolingParams
            from teacher_farm.schemas.scoring import PackedLayout, Scoring
            from teacher_farm.server.packed import unpack
            params = PoolingParams(task="token_classify",
                                   extra_kwargs=Scoring(k=k).pooler_kwargs(draw_seed=0))
        elif k:
            params = SamplingParams(max_tokens=1, temperature=0, detokenize=False, prompt_logprobs=k,
                                    logprobs=k, flat_logprobs=True)
        else:
            params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
        async def one(i, ids):
            if pooled:
                async for out in llm.encode(TokensPrompt(prompt_token_ids=ids), params, f"c{k}-{i}"):
                    pass
                unpack(out.outputs.data.numpy(), PackedLayout(k, 0))
                return
            async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, f"c{k}-{i}"):
                pass
            if k:
                pl = out.prompt_logprobs
                np.asarray(pl.token_ids, np.int32).reshape(len(ids) - 1, k + 1)
                np.asarray(pl.logprobs, np.float32).reshape(len(ids) - 1, k + 1)
                np.asarray(pl.ranks, np.int32).reshape(len(ids) - 1, k + 1)
        # Warm-up at this k: compiled kernels, allocator pools and batch shapes settle before timing.
        await asyncio.gather(*(one(f"w{i}", ids) for i, ids in enumerate(token_ids[:WARM_DOCS])))
        for r in range(repeat):
            started = time.perf_counter()
            await asyncio.gather(*(one(f"{r}-{i}", ids) for i, ids in enumerate(token_ids)))
            seconds.setdefault(k, []).append(time.perf_counter() - started)
    json.dump(seconds, open(sys.argv[2], "w"))
    llm.shutdown()

if __name__ == "__main__":
    spec = json.load(open(sys.argv[1]))
    asyncio.run(main(spec["args"], spec["token_ids"], spec["ks"], spec["pooled"], spec["repeat"]))
"""


def run_in_process(
    a, model: Path, token_ids: list[list[int]], work: Path, ks: list[int], pooled: bool = False
) -> dict[int, dict]:
    """One engine in process, each k in turn: prefill only (k=0: the ceiling), flat prompt logprobs,
    or pooled."""
    args = {
        "model": str(model),
        "dtype": a.dtype,
        "max_model_len": a.max_model_len,
        "enable_prefix_caching": False,
        "disable_log_stats": True,
        "enforce_eager": a.enforce_eager,
        "max_logprobs": max(a.ks),
        "gpu_memory_utilization": a.gpu_memory_utilization,
    }
    if a.max_num_batched_tokens:
        args["max_num_batched_tokens"] = a.max_num_batched_tokens
    if pooled:
        from teacher_farm.server.engine import choose_backend, engine_defaults

        args = engine_defaults(args, max(a.ks), choose_backend("pooled", str(model)))
    (work / "in_process.py").write_text(IN_PROCESS % WARM_DOCS)
    (work / "in_process.json").write_text(
        json.dumps({"args": args, "token_ids": token_ids, "ks": ks, "pooled": pooled, "repeat": a.repeat})
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(work / "in_process.py"),
            str(work / "in_process.json"),
            str(work / "in_process.out"),
        ],
        cwd=work,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    seconds = json.loads((work / "in_process.out").read_text())
    tokens = sum(len(x) for x in token_ids)
    return {
        int(k): median_run([{"tokens": tokens, "seconds": s, "parquet": None, "wire": None} for s in v])
        for k, v in seconds.items()
    }


def run_seed(a, model: Path, token_ids: list[list[int]], work: Path, k: int) -> dict:
    """The seed script's loop: batch 1, full-vocabulary log_softmax, topk, pyarrow (on the GPU if any)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else "auto"
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    rows = []
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in token_ids:
            logits = lm(torch.tensor([ids], device=device)).logits[0].float()
            lps = torch.log_softmax(logits, dim=-1)
            values, idx = torch.topk(lps, k, dim=-1)
            rows.append({"input_ids": ids, "topk_ids": idx.int().tolist(), "topk_logprobs": values.tolist()})
    path = work / "seed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd")
    seconds = time.perf_counter() - started
    return {
        "tokens": sum(len(x) for x in token_ids),
        "seconds": seconds,
        "parquet": path.stat().st_size,
        "wire": None,
    }


CLAIM = re.compile(r"^([a-z])(\.steady)?/([a-z])(\.steady)?@(\d+)>=([0-9.]+)$")


def rates_of(rows: list[tuple[str, dict]]) -> dict[str, float]:
    """``{"p@16": tokens/s, "a.steady@16": ..., "c": ...}`` from the table's rows."""
    rates = {}
    for name, r in rows:
        m = re.match(r"^\((\w)\).*?(?:k=(\d+))?$", name)
        if not m:
            continue
        key = m.group(1) + (f"@{m.group(2)}" if m.group(2) else "")
        rates[key] = r["tokens"] / r["seconds"]
        if r.get("steady"):
            rates[key.replace("@", ".steady@", 1) if "@" in key else key + ".steady"] = r["steady"]
    return rates


def _rate(rates: dict[str, float], path: str, steady: str | None, k: str) -> float | None:
    base = path + (steady or "")
    return rates.get(base) if path == "c" else rates.get(f"{base}@{k}")


def check_claims(rates: dict[str, float], claims: list[str]) -> tuple[list[str], bool]:
    """One line per claim ``X/Y@K>=R`` (path X's rate over path Y's at k = K, at least R; ``X.steady``
    for X's steady-state rate; the ceiling ``c`` has no k) and whether every claim held."""
    lines, ok = [], True
    for claim in claims:
        m = CLAIM.match(claim.replace(" ", ""))
        if not m:
            raise SystemExit(
                f"--claim {claim!r}: write it as X/Y@K>=R, e.g. p/e@16>=1.2 or a.steady/p@64>=0.9"
            )
        x, xs, y, ys, k, least = m.groups()
        num, den = _rate(rates, x, xs, k), _rate(rates, y, ys, k)
        if num is None or den is None:
            lines.append(f"claim {claim}: NOT MEASURED (run the paths it names at k={k})")
            ok = False
            continue
        held = num / den >= float(least)
        ok &= held
        lines.append(f"claim {claim}: measured {num / den:.2f} {'ok' if held else 'BELOW THE CLAIM'}")
    return lines, ok


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def model_header(model: Path) -> str:
    """What the model is, read from its config (not from the flags)."""
    cfg = json.loads((model / "config.json").read_text())
    return (
        f"{(cfg.get('architectures') or ['?'])[0]}: vocabulary {cfg.get('vocab_size')}, hidden "
        f"{cfg.get('hidden_size')}, {cfg.get('num_hidden_layers')} layers, "
        f"{cfg.get('num_attention_heads')} heads"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "bench-out")
    p.add_argument("--model", type=Path, help="an existing model; default: make a random Llama")
    p.add_argument("--docs", type=int, default=96)
    p.add_argument(
        "--doc-tokens", type=int, default=500, help="tokens per document (the median with --corpus realistic)"
    )
    p.add_argument("--corpus", choices=["uniform", "realistic"], default="uniform")
    p.add_argument("--ks", default="16", help="comma-separated k values (default 16)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--logprob-dtype", default="float16")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument(
        "--repeat", type=int, default=1, help="timed runs per path and k; the table gives the median run"
    )
    p.add_argument("--paths", default="c,e,p,a,l,b,d", help="which of c,e,p,a,l,b,d to run")
    p.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="X/Y@K>=R",
        help="a ratio the docs claim, checked after the run (exit 1 below it): path X over path Y at k=K "
        "at least R, e.g. p/e@16>=1.2; X.steady for X's steady-state rate (repeatable)",
    )
    a = p.parse_args()
    check_claims({}, [c for c in a.claim if not CLAIM.match(c.replace(" ", ""))])  # bad ones before the run
    a.ks = [int(k) for k in a.ks.split(",")]
    if a.gpu_memory_utilization is None:
        import torch

        # On a CPU build of vLLM this is the share of the NUMA node's RAM for the KV cache.
        a.gpu_memory_utilization = 0.85 if torch.cuda.is_available() else 0.3

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    model = a.model
    if model is None:
        from teacher_farm.server.tinymodel import make_tiny_model

        model = make_tiny_model(
            a.work / "model",
            [ROOT / "examples" / "sample.jsonl"],
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            num_layers=a.layers,
            num_heads=max(1, a.hidden // 64),
        )
    lengths = doc_lengths(a.corpus, a.docs, a.doc_tokens, a.max_model_len)
    corpus, token_ids = make_corpus(a.work, model, lengths)
    paths = a.paths.split(",")
    warm_corpus = a.work / "warm.jsonl"
    warm_corpus.write_text(
        "".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:WARM_DOCS]), encoding="utf-8"
    )
    rows: list[tuple[str, dict]] = []

    def run(name: str, fn) -> None:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append((name, fn()))

    flat_ks = ([0] if "c" in paths else []) + (a.ks if "e" in paths else [])
    if flat_ks:
        print("running (c)/(e) in process ...", file=sys.stderr, flush=True)
        for k, r in run_in_process(a, model, token_ids, a.work, flat_ks).items():
            rows.append(
                (
                    "(c) engine prefill only, in process (ceiling)"
                    if k == 0
                    else f"(e) vLLM in process, flat prompt logprobs, k={k}",
                    r,
                )
            )
    if "p" in paths:
        print("running (p) in process ...", file=sys.stderr, flush=True)
        for k, r in run_in_process(a, model, token_ids, a.work, a.ks, pooled=True).items():
            rows.append((f"(p) in process, pooled reduction, k={k}", r))
    for key, scoring in (("a", "pooled"), ("l", "prompt-logprobs")):
        if key not in paths:
            continue
        server = OursServer(a, model, a.work, scoring)
        try:
            # The same warm-up as in process: the first documents once, at the largest k, untimed.
            run_ours(a, server, warm_corpus, a.work, max(a.ks), tag="warm")
            for k in a.ks:
                run(
                    f"({key}) teacher-farm serve ({scoring}) + cache into Parquet, k={k}",
                    lambda server=server, k=k: median_run(
                        [run_ours(a, server, corpus, a.work, k, tag=f"cache{r}") for r in range(a.repeat)]
                    ),
                )
        finally:
            server.close()
    for k in a.ks:
        if "b" in paths:
            run(
                f"(b) vLLM OpenAI server + JSON client into Parquet, k={k}",
                lambda k=k: run_openai(a, model, token_ids, a.work, k),
            )
    if "d" in paths:
        run(
            f"(d) seed script: HF transformers, batch 1, k={a.ks[0]}",
            lambda: run_seed(a, model, token_ids, a.work, a.ks[0]),
        )

    ceiling = next((r for name, r in rows if name.startswith("(c)")), None)
    base = ceiling["tokens"] / ceiling["seconds"] if ceiling else None
    import torch

    where = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{cpu_model()}, {os.cpu_count()} cores"
    )
    print(
        f"\n{len(lengths)} docs, {a.corpus} lengths (median {int(np.median(lengths))}, max {max(lengths)}, "
        f"{sum(lengths):,} tokens); {model_header(model)}; {a.dtype}; {where}; {time.strftime('%Y-%m-%d')}\n"
    )
    print(
        "| path | tokens/s | vs ceiling | steady tokens/s | runs (tokens/s) "
        "| wire B/token | Parquet B/token |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        tps = r["tokens"] / r["seconds"]

        def fmt(v: float, r: dict = r) -> str:
            return f"{v / r['tokens']:.1f}" if v else "-"

        steady = f"{r['steady']:,.0f}" if r.get("steady") else "-"
        ratio = f"{tps / base:.2f}" if base else "-"
        runs = ", ".join(f"{r['tokens'] / x:,.0f}" for x in r.get("runs", [r["seconds"]]))
        print(
            f"| {name} | {tps:,.0f} | {ratio} | {steady} | {runs} | {fmt(r['wire'])} | {fmt(r['parquet'])} |"
        )
    if a.claim:
        lines, ok = check_claims(rates_of(rows), a.claim)
        print("\n" + "\n".join(lines))
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
