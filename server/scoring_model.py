"""The teacher's own causal LM as a vLLM pooling model whose pooler is the cache's reduction.

vLLM turns a causal LM into an embedding or classification model by subclassing it and adding a
pooler (``vllm/model_executor/models/adapters.py``). We do the same, with two differences: the LM
head stays (the pooler calls the model's own ``compute_logits``, so a vocabulary-sharded,
tensor-parallel head and any logit scaling keep working), and the pooler reduces every scheduled
chunk as it comes (``server/reduce.py``) instead of caching hidden states until the prompt ends.
Only small packed rows cross from the worker to the engine, for every position including the last.

``register`` is a ``vllm.general_plugins`` entry point, so every vLLM process (engine core and
workers alike) knows ``<Name>ForTeacherScoring`` for each ``<Name>ForCausalLM`` it supports; the
classes are made on first use. Each request's ``Scoring`` (and its draw seed) travels in
``PoolingParams.extra_kwargs``; worker-wide settings (``teacher_farm_slice_rows``, and the largest
k and sample count a request may ask for) in the model config, set through ``hf_overrides``.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any, Final

import torch

from teacher_farm.memory import keep_freed_memory
from teacher_farm.schemas.scoring import DEFAULT_K_MAX, PackedLayout, Scoring
from teacher_farm.server import kernels, vllm_seam
from teacher_farm.server.reduce import reduce_rows
from teacher_farm.server.vllm_seam import Pooler, PoolingParamsUpdate, batched_count_greater_than

CAUSAL_SUFFIX = "ForCausalLM"
SCORING_SUFFIX = "ForTeacherScoring"

#: Rows whose fp32 logits exist at once in the worker: the reduction's memory bound.
DEFAULT_SLICE_ROWS = 1024

#: The ``PoolingParams.extra_kwargs`` key of a request that draws at its last position only.
DRAWS_AT_LAST: Final = "draws_at_last"

#: The pooling task our requests name (a token-wise task: one output row per prompt position).
TASK: Final = vllm_seam.TASK


def scoring_arch(causal_arch: str) -> str:
    """``LlamaForCausalLM`` -> ``LlamaForTeacherScoring``."""
    return causal_arch.removesuffix(CAUSAL_SUFFIX) + SCORING_SUFFIX


def causal_arch(scoring: str) -> str:
    """``LlamaForTeacherScoring`` -> ``LlamaForCausalLM``."""
    return scoring.removesuffix(SCORING_SUFFIX) + CAUSAL_SUFFIX


def register() -> None:
    """Register a scoring architecture beside every causal LM vLLM supports (lazily imported)."""
    known = vllm_seam.supported_archs()
    for arch in sorted(known):
        if arch.endswith(CAUSAL_SUFFIX) and scoring_arch(arch) not in known:
            vllm_seam.register_model(scoring_arch(arch), f"{__name__}:{scoring_arch(arch)}")


def __getattr__(name: str) -> Any:
    # vLLM imports "teacher_farm.server.scoring_model:<Name>ForTeacherScoring" on demand.
    if not name.endswith(SCORING_SUFFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    arch = causal_arch(name)
    if arch not in vllm_seam.supported_archs():
        raise AttributeError(f"vLLM has no causal LM {arch!r} to score with")
    cls = as_scoring_model(vllm_seam.load_model_class(arch))
    globals()[name] = cls
    return cls


def as_scoring_model(cls: type) -> type:
    """Subclass a vLLM causal LM: same layers and weights, plus the reduction as its pooler."""

    class ModelForTeacherScoring(cls, vllm_seam.VllmModelForPooling):
        is_pooling_model = True
        default_tok_pooling_type = vllm_seam.TOKEN_POOLING

        def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            hf_config = vllm_config.model_config.hf_config
            self.pooler = ReductionPooler(
                self.compute_logits,
                slice_rows=int(getattr(hf_config, "teacher_farm_slice_rows", DEFAULT_SLICE_ROWS)),
                worst_case=Scoring.worst_case(
                    int(getattr(hf_config, "teacher_farm_k_max", DEFAULT_K_MAX)),
                    int(getattr(hf_config, "teacher_farm_max_samples", 0)),
                ),
                # vLLM's executor keeps the output of tensor-parallel rank 0 only (of the last
                # pipeline stage); every rank holds the gathered logits, the others need not reduce them.
                reduces=vllm_seam.tensor_parallel_rank() == 0,
                kernel_report=getattr(hf_config, "teacher_farm_kernel_report", None),
            )

    ModelForTeacherScoring.__name__ = ModelForTeacherScoring.__qualname__ = scoring_arch(cls.__name__)
    return ModelForTeacherScoring


class ReductionPooler(Pooler):
    """Reduces each scheduled chunk to packed rows; hands a request its rows when its prompt ends."""

    def __init__(
        self,
        compute_logits: Any,
        slice_rows: int,
        worst_case: Scoring,
        reduces: bool = True,
        kernel_report: str | None = None,
    ) -> None:
        super().__init__()
        # A bound method, not the model: a module holding its parent would form a cycle.
        self._compute_logits = compute_logits
        self.slice_rows = slice_rows
        # vLLM's start-up profiling runs the pooler with requests that carry no settings: make them
        # the largest a request may ask for, so the profile counts the reduction's peak memory.
        self.worst_case = worst_case.pooler_kwargs(draw_seed=0)
        self.k_max = worst_case.k
        # False on a rank whose rows vLLM discards: it still computes the logits (their gather is a
        # collective every rank joins) and hands back zeros of the same shape.
        self.reduces = reduces
        # Where the kernels chosen on the first chunk are reported for the server (``server/kernels.py``).
        self.kernel_report = kernel_report
        self.kernels: kernels.Kernels | None = None
        if reduces and vllm_seam.on_cpu():
            # Every slice allocates and frees the same blocks of megabytes; with glibc's defaults they
            # are faulted in anew each time (``teacher_farm/memory.py``), in whichever engine hosts
            # this model, ours or not.
            keep_freed_memory()

    def extra_repr(self) -> str:
        return f"slice_rows={self.slice_rows}, reduces={self.reduces}"

    def get_supported_tasks(self) -> Set[str]:
        return {TASK}

    def get_pooling_updates(self, task: str) -> PoolingParamsUpdate:
        # The prompt's token ids give every position its target (the next token).
        return PoolingParamsUpdate(requires_token_ids=True)

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: Any) -> list[torch.Tensor | None]:
        cursor = pooling_metadata.get_pooling_cursor()
        sizes = cursor.num_scheduled_tokens_cpu.to(torch.int64)
        requests = len(sizes)
        asked = [
            Scoring.from_pooler_kwargs(p.extra_kwargs or self.worst_case)
            for p in pooling_metadata.pooling_params
        ]
        layouts = [scoring.layout for scoring, _ in asked]
        ns = [layout.samples for layout in layouts]
        wide = PackedLayout(
            max(layout.k for layout in layouts),
            max(ns),
            entropy=any(layout.entropy for layout in layouts),
        )

        # Per row (one scheduled position): its request, its position in the prompt, its target.
        row_req = torch.repeat_interleave(torch.arange(requests), sizes)
        first_row = torch.cumsum(sizes, 0) - sizes
        chunk_start = cursor.seq_lens_cpu.to(torch.int64) - sizes
        positions = chunk_start[row_req] + torch.arange(len(row_req)) - first_row[row_req]
        prompt_lens = cursor.prompt_lens_cpu.to(torch.int64)
        # The last position has no next token: any id will do, its target columns are dropped.
        token_ids = pooling_metadata.prompt_token_ids_cpu
        next_pos = torch.minimum(positions + 1, prompt_lens[row_req] - 1).clamp_(max=token_ids.shape[1] - 1)
        targets = token_ids[row_req, next_pos]
        seeds = torch.tensor([seed for _, seed in asked], dtype=torch.int64)[row_req]
        temperatures = [scoring.temperature for scoring, _ in asked]

        device = hidden_states.device
        targets, seeds, positions_d = (t.to(device, non_blocking=True) for t in (targets, seeds, positions))
        # At T = 1 everywhere (the common case) the division is skipped altogether.
        inv_t = None
        if any(t != 1.0 for t in temperatures):
            inv_t = torch.tensor([1.0 / t for t in temperatures])[row_req].to(device, non_blocking=True)
        # Where requests ask for different sample counts, each row's draws beyond its own are
        # masked before sorting, so a request's draws never depend on its batch neighbours. A request
        # that draws at its last position only (``DRAWS_AT_LAST``: the one token a completion
        # generates) draws nothing elsewhere.
        at_last = [bool((p.extra_kwargs or {}).get(DRAWS_AT_LAST)) for p in pooling_metadata.pooling_params]
        row_n = None
        if wide.samples and (any(at_last) or any(req_n != wide.samples for req_n in ns)):
            row_n = torch.tensor(ns, dtype=torch.int64)[row_req]
            if any(at_last):
                last_row = positions == prompt_lens[row_req] - 1
                row_n = torch.where(torch.tensor(at_last)[row_req] & ~last_row, 0, row_n)
            row_n = row_n.to(device, non_blocking=True)
        rows = hidden_states.shape[0]
        out = torch.empty((rows, wide.width), dtype=torch.int32, device=device)
        for a in range(0, rows, self.slice_rows):
            b = min(a + self.slice_rows, rows)
            logits = self._compute_logits(hidden_states[a:b])
            if logits is None or not self.reduces:  # a rank whose rows are discarded
                out[a:b].zero_()
                continue
            if self.kernels is None:
                # Once, on the first chunk (vLLM's start-up profiling run): the ways of each step timed
                # on this device at this vocabulary, up to the largest k a request may ask for.
                self.kernels = kernels.select(
                    logits.shape[1],
                    self.k_max,
                    logits.device,
                    slice_rows=self.slice_rows,
                    report=self.kernel_report,
                    counts={"compiled": _count_at_least},
                )
            out[a:b] = reduce_rows(
                logits,
                targets[a:b],
                wide,
                None if inv_t is None else inv_t[a:b],
                seeds[a:b],
                positions_d[a:b],
                row_samples=None if row_n is None else row_n[a:b],
                count=self.kernels.count_at_least,
            )
            del logits

        finished = cursor.is_finished().tolist()
        results: list[Any] = []
        for chunk, state, layout, done in zip(
            torch.split(out, sizes.tolist()), pooling_metadata.pooling_states, layouts, finished
        ):
            if layout != wide:
                chunk = chunk[:, torch.tensor(wide.columns_of(layout), dtype=torch.int64, device=device)]
            # Reduced chunks are small; keep them until the prompt's last chunk is done.
            vllm_seam.keep_rows(state, chunk)
            results.append(vllm_seam.take_rows(state) if done else None)
        return results


def _count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """vLLM's compiled rank kernel, with a symbolic row count (as its sampler marks it): one compile."""
    torch._dynamo.decorators.mark_unbacked(x, 0)
    torch._dynamo.decorators.mark_unbacked(values, 0)
    return batched_count_greater_than(x, values)
