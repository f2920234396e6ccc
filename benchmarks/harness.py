"""One-invocation throughput benchmark of the ways to build a top-k teacher cache.

    python benchmarks/harness.py [--docs 96 --doc-tokens 500 --k 16 --vocab 4096 --hidden 512 ...]

Paths, all on the same model, documents and machine:
  (a) ours:     ``teacher-farm serve`` + ``teacher-farm cache`` into Parquet, end to end
  (b) openai:   vLLM's OpenAI server (/v1/completions + prompt_logprobs) + a JSON client writing Parquet
  (c) ceiling:  the engine in process, prefill only (no logprobs)
  (e) flat:     the engine in process with flat prompt logprobs turned into numpy (no storage)
  (d) seed:     HF transformers, batch 1, full log_softmax + topk, pyarrow (the seed script)

Prints tokens/s, the ratio to (c), wire bytes/token and Parquet bytes/token, as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_corpus(work: Path, model: Path, docs: int, doc_tokens: int) -> tuple[Path, list[list[int]]]:
    """Documents of about ``doc_tokens`` tokens each, cut from the sample corpus."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(x)["text"] for x in (ROOT / "examples" / "sample.jsonl").read_text().splitlines()]
    stream = " ".join(texts * 50)
    ids = tok(stream, add_special_tokens=False)["input_ids"]
    out, token_ids = work / "corpus.jsonl", []
    with open(out, "w", encoding="utf-8") as f:
        for i in range(docs):
            chunk = ids[i * doc_tokens: (i + 1) * doc_tokens - 1]
            text = tok.decode(chunk)
            f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
            token_ids.append(tok(text, add_special_tokens=True)["input_ids"])
    return out, token_ids


def engine_flags(a) -> list[str]:
    """The same engine settings for every path."""
    flags = ["--dtype", "float32", "--max-model-len", str(a.max_model_len),
             "--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    if a.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    if a.enforce_eager:
        flags.append("--enforce-eager")
    return flags


def run_ours(a, model: Path, corpus: Path, work: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "ours-server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "teacher_farm.client.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--k-max", str(max(64, a.k)), *engine_flags(a)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_health(url + "/health", server)
        out = work / "ours-cache"
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "teacher_farm.client.cli", "cache", "--server", url, "--input", str(corpus), "--out", str(out),
             "--k", str(a.k), "--logprob-dtype", a.logprob_dtype, "--concurrency", str(a.concurrency)],
            cwd=ROOT, capture_output=True, text=True,
        )
        seconds = time.perf_counter() - started
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        manifest = json.loads((out / "manifest.json").read_text())
        tokens = sum(s["tokens"] for s in manifest["shards"].values())
        parquet = sum(s["bytes"] for s in manifest["shards"].values())
        return {"tokens": tokens, "seconds": seconds, "parquet": parquet, "wire": _wire_from(proc.stdout)}
    finally:
        stop(server)


def _wire_from(stdout: str) -> int | None:
    """The answer bytes the client received, from its summary line."""
    for part in stdout.split(";"):
        if "wire bytes" in part:
            return int(part.split("wire bytes")[0].strip().split()[-1].replace(",", ""))
    return None


def run_openai(a, model: Path, token_ids: list[list[int]], work: Path) -> dict:
    """vLLM's own server, prompt_logprobs over JSON, a straightforward client writing Parquet."""
    import httpx
    import pyarrow as pa
    import pyarrow.parquet as pq

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "openai-server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--no-enable-prefix-caching", "--max-logprobs", str(max(64, a.k)), *engine_flags(a)],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_health(url + "/health", server)
        wire = 0

        async def one(client, ids):
            nonlocal wire
            r = await client.post("/v1/completions", json={
                "model": str(model), "prompt": ids, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": a.k, "logprobs": a.k, "return_tokens_as_token_ids": True,
            })
            r.raise_for_status()
            wire += len(r.content)
            choice = r.json()["choices"][0]
            n = len(ids)
            topk_ids = np.zeros((n, a.k), np.int32)
            topk_lps = np.zeros((n, a.k), np.float32)
            tgt = np.zeros(n - 1, np.float32)
            for i, pos in enumerate(choice["prompt_logprobs"][1:]):
                ranked = sorted((v["rank"], int(t), v["logprob"]) for t, v in pos.items())
                top = [x for x in ranked if x[0] <= a.k][: a.k]
                topk_ids[i] = [t for _, t, _ in top]
                topk_lps[i] = [lp for _, _, lp in top]
                tgt[i] = pos[str(ids[i + 1])]["logprob"]
            last = sorted(((lp, int(t.split(":")[-1])) for t, lp in choice["logprobs"]["top_logprobs"][0].items()),
                          reverse=True)[: a.k]
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
        table = pa.table({
            "input_ids": [r[0] for r in results],
            "topk_ids": [r[1].tolist() for r in results],
            "topk_logprobs": [r[2].tolist() for r in results],
            "target_logprobs": [r[3].tolist() for r in results],
        })
        path = work / "openai.parquet"
        pq.write_table(table, path, compression="zstd")
        seconds = time.perf_counter() - started
        tokens = sum(len(x) for x in token_ids)
        return {"tokens": tokens, "seconds": seconds, "parquet": path.stat().st_size, "wire": wire}
    finally:
        stop(server)


CEILING = r'''
import asyncio, json, sys, time
import numpy as np
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.v1.engine.async_llm import AsyncLLM

async def main(args, token_ids, k):
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    if k:
        params = SamplingParams(max_tokens=1, temperature=0, detokenize=False, prompt_logprobs=k, logprobs=k,
                                flat_logprobs=True)
    else:
        params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
    async def one(i, ids):
        async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, f"c{i}"):
            pass
        if k:
            pl = out.prompt_logprobs
            np.asarray(pl.token_ids, np.int32).reshape(len(ids) - 1, k + 1)
            np.asarray(pl.logprobs, np.float32).reshape(len(ids) - 1, k + 1)
            np.asarray(pl.ranks, np.int32).reshape(len(ids) - 1, k + 1)
    await one(-1, token_ids[0][:16])  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(one(i, ids) for i, ids in enumerate(token_ids)))
    seconds = time.perf_counter() - started
    json.dump({"seconds": seconds}, open(sys.argv[2], "w"))
    llm.shutdown()

if __name__ == "__main__":
    spec = json.load(open(sys.argv[1]))
    asyncio.run(main(spec["args"], spec["token_ids"], spec["k"]))
'''


def run_in_process(a, model: Path, token_ids: list[list[int]], work: Path, k: int = 0) -> dict:
    """The engine in process: prefill only (k=0, nothing can be faster) or flat prompt logprobs."""
    args = {"model": str(model), "dtype": "float32", "max_model_len": a.max_model_len,
            "enable_prefix_caching": False, "disable_log_stats": True, "enforce_eager": a.enforce_eager,
            "max_logprobs": max(64, a.k), "gpu_memory_utilization": a.gpu_memory_utilization}
    if a.max_num_batched_tokens:
        args["max_num_batched_tokens"] = a.max_num_batched_tokens
    (work / "ceiling.py").write_text(CEILING)
    (work / "ceiling.json").write_text(json.dumps({"args": args, "token_ids": token_ids, "k": k}))
    proc = subprocess.run([sys.executable, str(work / "ceiling.py"), str(work / "ceiling.json"), str(work / "ceiling.out")],
                          cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    seconds = json.loads((work / "ceiling.out").read_text())["seconds"]
    return {"tokens": sum(len(x) for x in token_ids), "seconds": seconds, "parquet": None, "wire": None}


def run_seed(a, model: Path, token_ids: list[list[int]], work: Path) -> dict:
    """The seed script's loop: batch 1, full-vocabulary log_softmax, topk, pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    rows = []
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in token_ids:
            logits = lm(torch.tensor([ids])).logits[0].float()
            lps = torch.log_softmax(logits, dim=-1)
            values, idx = torch.topk(lps, a.k, dim=-1)
            rows.append({"input_ids": ids, "topk_ids": idx.int().tolist(), "topk_logprobs": values.tolist()})
    path = work / "seed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd")
    seconds = time.perf_counter() - started
    return {"tokens": sum(len(x) for x in token_ids), "seconds": seconds, "parquet": path.stat().st_size, "wire": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "bench-out")
    p.add_argument("--model", type=Path, help="an existing model; default: make a random Llama")
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--doc-tokens", type=int, default=500)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--logprob-dtype", default="float16")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--paths", default="c,e,a,b,d", help="which of a,b,c,d,e to run")
    a = p.parse_args()
    if a.gpu_memory_utilization is None:
        import torch

        # On a CPU build of vLLM this is the share of the NUMA node's RAM for the KV cache.
        a.gpu_memory_utilization = 0.85 if torch.cuda.is_available() else 0.3

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    model = a.model
    if model is None:
        from teacher_farm.server.tinymodel import make_tiny_model

        model = make_tiny_model(a.work / "model", [ROOT / "examples" / "sample.jsonl"], vocab_size=a.vocab,
                                hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 64)
    corpus, token_ids = make_corpus(a.work, model, a.docs, a.doc_tokens)
    runners = {"c": ("(c) engine prefill only, in process (ceiling)", lambda: run_in_process(a, model, token_ids, a.work)),
               "e": (f"(e) engine in process, flat prompt logprobs k={a.k}, numpy", lambda: run_in_process(a, model, token_ids, a.work, a.k)),
               "a": ("(a) teacher-farm serve + cache, into Parquet", lambda: run_ours(a, model, corpus, a.work)),
               "b": ("(b) vLLM OpenAI server + JSON client, into Parquet", lambda: run_openai(a, model, token_ids, a.work)),
               "d": ("(d) seed script: HF transformers, batch 1", lambda: run_seed(a, model, token_ids, a.work))}
    results = {}
    for key in "ceabd":
        if key in a.paths.split(","):
            name, fn = runners[key]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[key] = (name, fn())
    ceiling = results.get("c", (None, None))[1]
    base = ceiling["tokens"] / ceiling["seconds"] if ceiling else None
    print(f"\n{a.docs} docs x ~{a.doc_tokens} tokens, k={a.k}, vocab {a.vocab}, hidden {a.hidden}, {a.layers} layers, "
          f"fp32; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| path | tokens/s | vs ceiling | wire B/token | Parquet B/token |")
    print("|---|---|---|---|---|")
    for key in "ceabd":
        if key not in results:
            continue
        name, r = results[key]
        tps = r["tokens"] / r["seconds"]
        fmt = lambda v: f"{v / r['tokens']:.1f}" if v else "-"
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f} | {fmt(r['wire'])} | {fmt(r['parquet'])} |" if base else
              f"| {name} | {tps:,.0f} | - | {fmt(r['wire'])} | {fmt(r['parquet'])} |")


if __name__ == "__main__":
    main()
