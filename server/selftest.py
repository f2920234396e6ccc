"""The pooled backend's start-up self-test, on the installed vLLM, before the engine starts.

``check_pooler`` drives ``ReductionPooler`` the way vLLM's model runner does (``PoolingMetadata``
with ``PoolingParams`` carrying our settings, ``PoolingStates`` kept per request across steps, the
cursor built by vLLM's own ``build_pooling_cursor``) over a few chunked steps of a small synthetic
model, and compares every request's rows bit for bit with ``reduce_rows`` on its whole prompt alone.
A vLLM release that changes what a pooler is handed (how chunks are cut, when a request counts as
finished, what the states keep) fails here in seconds, instead of in a cache's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from teacher_farm.schemas.errors import SelfTestFailed
from teacher_farm.schemas.scoring import Scoring

VOCAB = 512
HIDDEN = 16
#: Below every step's token count, so that slices cut across requests.
SLICE_ROWS = 7


@dataclass(frozen=True)
class Case:
    """One synthetic request: its prompt's length and what it asks (the seed is its draw seed)."""

    name: str
    length: int
    scoring: Scoring

    @property
    def settings(self) -> dict[str, Any]:
        return self.scoring.pooler_kwargs(draw_seed=self.scoring.seed)


CASES = (
    Case("a prompt split over three steps", 23, Scoring(k=8)),
    Case(
        "a prompt done in one step, sampled at T=0.7, with its entropy",
        9,
        Scoring(k=4, temperature=0.7, targets="both", samples=16, seed=5, positions="entropy:0.5"),
    ),
    Case(
        "a request joining late, sampled targets only at T=1.3",
        14,
        Scoring(temperature=1.3, targets="sampled", samples=32, seed=123),
    ),
    Case(
        "a one-token prompt beside requests with more samples",
        1,
        Scoring(k=16, targets="both", samples=4, seed=7),
    ),
)

#: Per step, (case index, tokens scheduled): mixed k, samples, temperature and seed in one step.
STEPS = (
    ((0, 10), (1, 9)),
    ((0, 8), (2, 6)),
    ((2, 8), (0, 5), (3, 1)),
)


def synthetic_logits() -> tuple[list[torch.Tensor], list[list[int]], object]:
    """Per case, hidden states and prompt ids, and a ``compute_logits`` that is a fixed linear map.

    Hidden states and weights are multiples of 1/16 and each column adds its own multiple of 2^-17
    (below 2^-8, the products' grid): every logit is exact in fp32 whatever order a matrix product
    sums in, so a request's logits do not depend on its batch, and no two logits of a row tie.
    """
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-63, 64, (HIDDEN, VOCAB), generator=g).float() / 16
    offset = torch.arange(VOCAB, dtype=torch.float32) * 2.0**-17
    hidden = [torch.randint(-15, 16, (c.length, HIDDEN), generator=g).float() / 16 for c in CASES]
    prompts = [torch.randint(0, VOCAB, (c.length,), generator=g).tolist() for c in CASES]

    def compute_logits(h: torch.Tensor) -> torch.Tensor:
        return h @ weight + offset

    return hidden, prompts, compute_logits


def _alone(case: Case, hidden: torch.Tensor, prompt: list[int], compute_logits) -> torch.Tensor:
    """``reduce_rows`` on the case's whole prompt, alone."""
    from teacher_farm.server.reduce import reduce_rows

    n = case.length
    # The last position has no next token; the pooler fills its unused target columns with the last token.
    targets = torch.tensor(prompt[1:] + prompt[-1:], dtype=torch.int64)
    scoring = case.scoring
    inv_t = None if scoring.temperature == 1.0 else torch.full((n,), 1.0 / scoring.temperature)
    return reduce_rows(
        compute_logits(hidden),
        targets,
        scoring.layout,
        inv_t,
        torch.full((n,), scoring.seed, dtype=torch.int64),
        torch.arange(n),
    )


#: Runs one step: (case, tokens scheduled) per request, the tokens each computed before, the step's hidden
#: states; returns what the pooler handed each request (its rows, or None before its prompt ends).
Step = Callable[[list[tuple[int, int]], list[int], torch.Tensor], list[Any]]


def v1_steps(pooler: Any, params: list[Any], prompts: list[list[int]]) -> Step:
    """Steps as vLLM's (V1) model runner runs them: the pooler called on each step's ``PoolingMetadata``."""
    from teacher_farm.server import vllm_seam

    for p in params:
        pooler.get_pooling_updates(vllm_seam.TASK).apply(p)
    states = [vllm_seam.PoolingStates() for _ in params]

    def step(scheduled: list[tuple[int, int]], computed: list[int], chunk: torch.Tensor) -> list[Any]:
        ids = [i for i, _ in scheduled]
        metadata = vllm_seam.pooling_metadata(
            [prompts[i] for i in ids],
            [params[i] for i in ids],
            [states[i] for i in ids],
            [n for _, n in scheduled],
            computed,
            pad_id=VOCAB,
        )
        return pooler(hidden_states=chunk, pooling_metadata=metadata)

    return step


def check_pooler(steps: Callable[[Any, list[Any], list[list[int]]], Step] = v1_steps) -> None:
    """Raise ``SelfTestFailed`` naming the case and the vLLM release unless the pooler's rows are exact.

    ``steps(pooler, params, prompts)`` sets up the requests and returns the ``Step`` that runs the pooler
    the way a model runner does (default: ``v1_steps``).
    """
    from teacher_farm.server import vllm_seam

    version = vllm_seam.version_string()
    try:
        from vllm import PoolingParams

        from teacher_farm.server.scoring_model import ReductionPooler
    except Exception as exc:  # noqa: BLE001 - whatever moved, the reason is one line
        raise SelfTestFailed(
            f"the pooled scoring model does not load on vLLM {version}: {first_line(exc)}"
        ) from exc

    def fail(what: str) -> SelfTestFailed:
        return SelfTestFailed(f"pooled scoring self-test on vLLM {version}: {what}")

    hidden, prompts, compute_logits = synthetic_logits()
    worst_case = Scoring.worst_case(max(c.scoring.topk for c in CASES), max(c.scoring.draws for c in CASES))
    pooler = ReductionPooler(compute_logits, slice_rows=SLICE_ROWS, worst_case=worst_case)
    done = [0] * len(CASES)
    results: dict[int, torch.Tensor] = {}
    try:
        params = [PoolingParams(task=vllm_seam.TASK, extra_kwargs=case.settings) for case in CASES]
        run_step = steps(pooler, params, prompts)
    except Exception as exc:  # noqa: BLE001
        raise fail(f"vLLM's pooling structures: {first_line(exc)}") from exc
    # The worker compiles vLLM's rank kernel for its own device; here it runs eagerly, so that this
    # check costs seconds (and no compiler), while still using the kernel's own definition.
    with torch.compiler.set_stance("force_eager"):
        for step, scheduled in enumerate(STEPS, 1):
            try:
                chunk = torch.cat([hidden[i][done[i] : done[i] + n] for i, n in scheduled])
                out = run_step(list(scheduled), [done[i] for i, _ in scheduled], chunk)
            except Exception as exc:  # noqa: BLE001
                raise fail(f"step {step}: the pooler raised {first_line(exc)}") from exc
            for (i, n), rows in zip(scheduled, out):
                done[i] += n
                finished = done[i] == CASES[i].length
                if (rows is not None) != finished:
                    state = "rows before" if rows is not None else "no rows at"
                    raise fail(f"{CASES[i].name}: {state} the end of its prompt (step {step})")
                if finished:
                    results[i] = rows
    for i, case in enumerate(CASES):
        expected = _alone(case, hidden[i], prompts[i], compute_logits)
        got = results.get(i)
        if got is None or got.shape != expected.shape or not torch.equal(got, expected):
            shape = None if got is None else tuple(got.shape)
            raise fail(
                f"{case.name}: rows {shape} differ from reduce_rows on the whole prompt "
                f"{tuple(expected.shape)}"
            )


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a log line or a one-line error needs of an exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
