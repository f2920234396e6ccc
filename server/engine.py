"""The teacher: vLLM's ``AsyncLLM`` in process, answering scoring requests as numpy.

Two backends compute the answers. ``pooled`` (the default where the architecture allows) runs the
teacher as a pooling model whose pooler reduces the logits inside the vLLM worker
(``server/scoring_model.py``, ``server/reduce.py``): any k, a temperature, sampled targets, every
position including the last, handed back as one packed tensor per sequence. ``prompt-logprobs``
is vLLM's own API, for architectures that cannot be wrapped: top-k at temperature 1 only.

vLLM's flat prompt logprobs hold, for every position after the first, k+1 entries: the actual next
token first, then the top-k by rank. So one ``reshape(n - 1, k + 1)`` per array gives the top-k
*and* the target token's logprob and rank. The last position's distribution comes from the single
sampled token (``logprobs=k``, greedy so its first entry is deterministic), laid out the same way.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from teacher_farm.schemas import SCHEMA_VERSION, __version__
from teacher_farm.schemas.arrow import ScoredSequence
from teacher_farm.schemas.draws import draw_seed
from teacher_farm.schemas.errors import InputError, SelfTestFailed, TeacherFarmError
from teacher_farm.schemas.fingerprints import model_fingerprint, tokenizer_fingerprint
from teacher_farm.schemas.scoring import (
    DEFAULT_MAX_SAMPLES,
    SCORING_CHOICES,
    Scoring,
    ScoringBackend,
    ScoringChoice,
)
from teacher_farm.schemas.wire import Info, TopkRequest, Versions
from teacher_farm.server import vllm_seam
from teacher_farm.server.lifecycle import ENGINE_STOP_S, mark_engine_owner
from teacher_farm.server.packed import compact_samples, top_entropy, unpack

log = logging.getLogger(__name__)

#: CPU builds of vLLM read ``gpu_memory_utilization`` as a share of the NUMA node's RAM.
CPU_MEMORY_UTILIZATION = 0.4

#: Positions the pooled backend reduces at once. A GPU wants large slices; a CPU wants the slice's
#: logits to stay in its caches (measured with vocabulary 4096: 256 rows ran 1.5x faster than 4096).
SLICE_ROWS = {"gpu": 1024, "cpu": 256}


@dataclass(frozen=True)
class Backend:
    """How this server scores: ``pooled`` with the wrapped architecture, or ``prompt-logprobs``."""

    name: ScoringBackend
    arch: str | None = None
    #: Why it was chosen, for the log and ``/v1/info``.
    reason: str = ""


def choose_backend(
    requested: str, model: str, trust_remote_code: bool = False, hf_overrides: Any = None
) -> Backend:
    """``auto``: pooled where the checkpoint's causal-LM architecture can be wrapped and the pooler passes
    its self-test on the installed vLLM, else prompt-logprobs; ``pooled``: that, or ``SelfTestFailed``."""
    from transformers import AutoConfig

    if requested not in SCORING_CHOICES:
        raise InputError(f"--scoring must be one of {', '.join(SCORING_CHOICES)}, not {requested!r}")
    if requested == "prompt-logprobs":
        return Backend("prompt-logprobs", reason="asked for")
    try:
        from teacher_farm.server.scoring_model import CAUSAL_SUFFIX, register, scoring_arch

        register()  # this process may not have loaded vLLM's plugins yet
    except Exception as exc:  # noqa: BLE001 - a vLLM whose internals moved: the reason is one line
        from teacher_farm.server.selftest import first_line

        return _without_pooled(
            requested,
            SelfTestFailed(
                f"the pooled scoring model does not load on vLLM {vllm_seam.version_string()}: "
                f"{first_line(exc)}"
            ),
        )
    archs = list(
        getattr(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), "architectures", None)
        or []
    )
    if isinstance(hf_overrides, dict) and hf_overrides.get("architectures"):
        archs = list(hf_overrides["architectures"])
    known = vllm_seam.supported_archs()
    wrappable = [a for a in archs if a.endswith(CAUSAL_SUFFIX) and scoring_arch(a) in known]
    if not wrappable:
        why = f"architectures {archs or '(none)'} have no vLLM causal-LM class to wrap"
        if requested == "pooled":
            raise InputError(f"--scoring pooled: {why}; use --scoring prompt-logprobs")
        return Backend("prompt-logprobs", reason=why)
    failure = pooler_self_test()
    if failure is not None:
        return _without_pooled(requested, failure)
    arch = scoring_arch(wrappable[0])
    return Backend("pooled", arch, f"{wrappable[0]} is wrapped as {arch}; its pooler passed the self-test")


@functools.cache
def pooler_self_test() -> SelfTestFailed | None:
    """The pooled backend's start-up self-test (``server/selftest.py``), once per process:
    its failure or None."""
    from teacher_farm.server.selftest import check_pooler

    try:
        check_pooler()
    except SelfTestFailed as exc:
        return exc
    return None


def _without_pooled(requested: str, failure: SelfTestFailed) -> Backend:
    """``auto`` scores with prompt logprobs and says why; ``pooled`` stops, in one line."""
    if requested == "pooled":
        raise SelfTestFailed(f"--scoring pooled: {failure}; use --scoring prompt-logprobs") from failure
    log.warning("scoring with prompt logprobs, not pooled: %s", failure)
    return Backend("prompt-logprobs", reason=str(failure))


def kernel_report_path() -> Path:
    """Where this server's vLLM worker reports the reduction kernels it chose (one file per server)."""
    return Path(tempfile.gettempdir()) / f"teacher-farm-kernels-{os.getpid()}.json"


def read_kernel_report() -> dict[str, Any]:
    """The kernels the worker chose, or {} where it wrote none (prompt logprobs; a worker on another node)."""
    path = kernel_report_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    finally:
        path.unlink(missing_ok=True)


def engine_defaults(
    engine_args: dict[str, Any],
    k_max: int,
    backend: Backend | None = None,
    *,
    slice_rows: int | None = None,
    max_samples: int = 0,
) -> dict[str, Any]:
    """vLLM engine arguments for scoring: ours first, then what the user passed wins."""
    backend = backend or Backend("prompt-logprobs")
    args: dict[str, Any] = {
        # Every position is scored: a cached prefix would skip some. Don't pay for its bookkeeping.
        "enable_prefix_caching": False,
        "disable_log_stats": True,
    }
    if backend.name == "prompt-logprobs":
        args["max_logprobs"] = k_max
    if vllm_seam.on_cpu():
        args["gpu_memory_utilization"] = CPU_MEMORY_UTILIZATION
    args.update({k: v for k, v in engine_args.items() if v is not None})
    if slice_rows is None:
        slice_rows = SLICE_ROWS["cpu" if vllm_seam.on_cpu() else "gpu"]
    if backend.name == "pooled":
        user = args.get("hf_overrides")
        if user is not None and not isinstance(user, dict):
            raise InputError("--hf-overrides must be a JSON object with the pooled scoring backend")
        args["runner"] = vllm_seam.RUNNER
        if str(args.get("dtype") or "auto").lower() == "auto":
            # The dtype vLLM would generate in: its pooling runner's own choice differs.
            args["dtype"] = vllm_seam.generation_dtype(
                args["model"],
                bool(args.get("trust_remote_code")),
                args.get("revision"),
            )
        args["hf_overrides"] = {
            **(user or {}),
            "architectures": [backend.arch],
            "teacher_farm_slice_rows": slice_rows,
            "teacher_farm_k_max": k_max,
            "teacher_farm_max_samples": max_samples,
            # The worker writes the reduction kernels it chose here (server/kernels.py), for /v1/info.
            "teacher_farm_kernel_report": str(kernel_report_path()),
        }
    elif args["max_logprobs"] < k_max:
        raise TeacherFarmError(f"max_logprobs={args['max_logprobs']} is below k_max={k_max}")
    return args


def checkpoint_config_json(hf_config: Any) -> str:
    """The model's config as its checkpoint states it, without the pooled backend's overrides.

    Keeps the model fingerprint (and so a cache's identity) the same whichever backend scores.
    """
    text = hf_config.to_json_string()
    config = json.loads(text)
    if not any(key.startswith("teacher_farm_") for key in config):
        return text
    # Only the pooled backend sets these, so its module loaded (prompt logprobs may run without it).
    from teacher_farm.server.scoring_model import SCORING_SUFFIX, causal_arch

    config = {k: v for k, v in config.items() if not k.startswith("teacher_farm_")}
    config["architectures"] = [
        causal_arch(a) if a.endswith(SCORING_SUFFIX) else a for a in config.get("architectures") or []
    ]
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _flat_arrays(flat: Any, rows: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """token ids, logprobs and ranks of ``rows`` positions × (k+1) flat entries."""
    ids = np.asarray(flat.token_ids, dtype=np.int32)
    if ids.size != rows * (k + 1):
        raise TeacherFarmError(
            f"vLLM returned {ids.size} logprob entries for {rows} positions at k={k}; expected "
            f"{rows * (k + 1)} (is flat_logprobs supported by this vLLM?)"
        )
    lps = np.asarray(flat.logprobs, dtype=np.float32)
    ranks = np.asarray(flat.ranks, dtype=np.int32)
    return ids.reshape(rows, k + 1), lps.reshape(rows, k + 1), ranks.reshape(rows, k + 1)


def from_packed(
    seq_id: str | None,
    input_ids: Sequence[int],
    packed: np.ndarray,
    scoring: Scoring,
    selected: np.ndarray | None = None,
) -> ScoredSequence:
    """Turn the pooled backend's packed rows for one sequence into numpy arrays (no loop per position).

    ``selected`` marks the positions whose targets are kept (the ``assistant`` rule); with an
    ``entropy:F`` rule they are the share F of highest entropy, from the worker's entropy column.
    """
    n = len(input_ids)
    layout = scoring.layout
    if packed.shape[0] != n:
        raise TeacherFarmError(f"the engine returned {packed.shape[0]} rows for {n} tokens")
    u = unpack(packed, layout)
    if scoring.entropy_share is not None:
        assert u.entropy is not None  # an entropy rule's layout has the entropy column
        selected = top_entropy(u.entropy, scoring.entropy_share)
    sampled = {}
    if layout.samples:
        assert u.sample_ids is not None and u.sample_logprobs is not None  # the layout has them
        lengths, ids, counts, lps = compact_samples(u.sample_ids, u.sample_logprobs)
        sampled = {
            "sample_lengths": lengths,
            "sample_ids": ids,
            "sample_counts": counts,
            "sample_logprobs": lps,
        }
    return ScoredSequence(
        id=seq_id,
        input_ids=np.asarray(input_ids, dtype=np.int32),
        topk_ids=np.ascontiguousarray(u.topk_ids),
        topk_logprobs=np.ascontiguousarray(u.topk_logprobs),
        target_logprobs=np.ascontiguousarray(u.target_logprobs),
        target_ranks=np.ascontiguousarray(u.target_ranks),
        selected=selected,
        **sampled,
    )


def to_scored(
    seq_id: str | None,
    input_ids: Sequence[int],
    output: Any,
    k: int,
    selected: np.ndarray | None = None,
) -> ScoredSequence:
    """Turn one vLLM ``RequestOutput`` into numpy arrays, one step per array."""
    n = len(input_ids)
    last_ids, last_lps, _ = _flat_arrays(output.outputs[0].logprobs, 1, k)
    if n > 1:
        ids, lps, ranks = _flat_arrays(output.prompt_logprobs, n - 1, k)
        topk_ids = np.concatenate([ids[:, 1:], last_ids[:, 1:]])
        topk_lps = np.concatenate([lps[:, 1:], last_lps[:, 1:]])
        target_lps, target_ranks = lps[:, 0].copy(), ranks[:, 0].copy()
    else:
        topk_ids, topk_lps = last_ids[:, 1:], last_lps[:, 1:]
        target_lps, target_ranks = np.empty(0, np.float32), np.empty(0, np.int32)
    return ScoredSequence(
        id=seq_id,
        input_ids=np.asarray(input_ids, dtype=np.int32),
        topk_ids=np.ascontiguousarray(topk_ids),
        topk_logprobs=np.ascontiguousarray(topk_lps),
        target_logprobs=target_lps,
        target_ranks=target_ranks,
        selected=selected,
    )


def engine_dead(engine: Any) -> bool:
    """Whether the vLLM engine of ``engine`` died (it never recovers in this process)."""
    llm = getattr(engine, "llm", None)
    return llm is not None and bool(llm.errored)


def is_engine_dead_error(exc: BaseException) -> bool:
    """Whether ``exc`` is vLLM's ``EngineDeadError`` (without importing vLLM, which takes seconds)."""
    module = sys.modules.get("vllm.v1.engine.exceptions")
    return module is not None and isinstance(exc, module.EngineDeadError)


class Engine:
    """The loaded teacher: vLLM in process, its tokenizer, and its facts (``info``,
    as ``/v1/info`` serves them)."""

    def __init__(self, llm: Any, tokenizer: Any, info: Info) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.info = info
        self._ids = itertools.count()

    @classmethod
    def load(
        cls,
        engine_args: dict[str, Any],
        k_max: int,
        *,
        scoring: ScoringChoice = "auto",
        slice_rows: int | None = None,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> Engine:
        """Start vLLM (blocking: tens of seconds to minutes) and read the model's facts."""
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        backend = choose_backend(
            scoring,
            engine_args["model"],
            bool(engine_args.get("trust_remote_code")),
            engine_args.get("hf_overrides"),
        )
        log.info("scoring backend: %s (%s)", backend.name, backend.reason)
        pooled = backend.name == "pooled"
        args = engine_defaults(
            engine_args, k_max, backend, slice_rows=slice_rows, max_samples=max_samples if pooled else 0
        )
        log.info("starting vLLM engine: %s", args)
        mark_engine_owner()  # the engine's processes end with this one (server/lifecycle.py)
        kernel_report_path().unlink(missing_ok=True)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        mc = llm.model_config
        tokenizer = AutoTokenizer.from_pretrained(
            args.get("tokenizer") or args["model"], trust_remote_code=bool(args.get("trust_remote_code"))
        )
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        max_model_len = mc.max_model_len
        # ``--served-model-name`` takes a list (vLLM's flag): the first name is the one served.
        served = args.get("served_model_name")
        served = served[0] if isinstance(served, (list, tuple)) and served else served
        info = Info(
            model=served or args["model"],
            model_fingerprint=model_fingerprint(args["model"], checkpoint_config_json(mc.hf_config)),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            vocab_size=mc.get_vocab_size(),
            k_max=k_max if pooled else args["max_logprobs"],
            max_model_len=max_model_len,
            # One slot stays free for the sampled token that carries the last position's distribution
            # under prompt-logprobs; the pooled backend keeps the same limit, so that both backends
            # make the same cache (its identity records the effective max length).
            max_input_tokens=max_model_len - 1,
            # No limit of its own: the HTTP app states its own (``--max-inputs-per-request``).
            max_inputs_per_request=1 << 30,
            adds_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
            scoring=backend.name,
            max_samples=max_samples if pooled else 0,
            scoring_reason=backend.reason,
            versions=Versions(
                teacher_farm=__version__,
                schema_version=SCHEMA_VERSION,
                vllm=vllm_seam.version_string(),
            ),
        )
        return cls(llm, tokenizer, info)

    def tokenize(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        """Token ids as the teacher sees them (special tokens included), cut to ``max_length``."""
        enc = self.tokenizer(
            texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length
        )
        return enc["input_ids"]

    def check_options(self, scoring: Scoring) -> None:
        """Refuse what this teacher cannot answer."""
        refusal = scoring.refusal(self.info)
        if refusal is not None:
            raise InputError(refusal[0])

    def prepare(self, req: TopkRequest) -> list[list[int]]:
        """Validate a request against this teacher and return every input's token ids.

        Text goes through the teacher's tokenizer (special tokens included); everything is cut to
        ``max_length``, and to what the engine can hold.
        """
        self.check_options(req.scoring)
        limit = self.info.max_input_tokens
        max_length = min(req.max_length or limit, limit)
        out: list[list[int]] = []
        texts = [x.text for x in req.inputs if x.text is not None]
        encoded = iter(self.tokenize(texts, max_length) if texts else [])
        chats = [[m.model_dump() for m in x.messages] for x in req.inputs if x.messages is not None]
        rendered = iter(self.render_chats(chats, max_length) if chats else [])
        vocab = self.info.vocab_size
        for i, x in enumerate(req.inputs):
            if x.text is not None:
                out.append(next(encoded))
                continue
            if x.messages is not None:
                out.append(next(rendered))
                continue
            assert x.token_ids is not None  # an input gives exactly one of text, messages, token_ids
            if max(x.token_ids) >= vocab:
                raise InputError(
                    f"inputs.{i}.token_ids: token id {max(x.token_ids)} is outside the vocabulary "
                    f"(size {vocab})"
                )
            out.append(x.token_ids[:max_length])
        return out

    def selected_positions(self, req: TopkRequest, token_ids: list[list[int]]) -> list[np.ndarray | None]:
        """Per input, the positions whose targets the ``assistant`` rule keeps (None: every position).

        Chat records keep the positions whose next token lies in an assistant turn; text and token
        ids are not chats and keep every position.
        """
        from teacher_farm.server.chat import assistant_tokens, next_token_inside

        out: list[np.ndarray | None] = []
        for x, ids in zip(req.inputs, token_ids):
            if x.messages is None:
                out.append(None)
                continue
            full, inside = assistant_tokens(self.tokenizer, [m.model_dump() for m in x.messages])
            if full[: len(ids)] != list(ids):
                raise InputError("the chat's tokens differ between its rendering and its turns' rendering")
            out.append(next_token_inside(inside, len(ids)))
        return out

    def render_chats(
        self,
        chats: list[list[dict]],
        max_length: int | None,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
    ) -> list[list[int]]:
        """Token ids of chat records through the teacher's chat template, cut to ``max_length`` (None: in
        full).

        A record cut to L tokens is exactly the first L of its full rendering, so a client can window
        the full ids (``/tokenize`` with ``messages``) and keep the cut row as its first window.
        ``add_special_tokens`` adds the tokenizer's own special tokens on top of the template's (vLLM's
        ``/tokenize`` option); scoring never does.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(
                "the teacher's tokenizer has no chat template: send 'text' instead of 'messages'"
            )
        from jinja2 import TemplateError

        ending = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
        }
        try:
            if add_special_tokens:
                texts = self.tokenizer.apply_chat_template(chats, tokenize=False, **ending)
                ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
            else:
                ids = self.tokenizer.apply_chat_template(chats, tokenize=True, return_dict=False, **ending)
        except TemplateError as exc:
            # A template that refuses a record (roles that do not alternate, ...) refuses the request,
            # not the server.
            raise InputError(f"messages: the teacher's chat template refused them: {exc}") from exc
        return [list(x[:max_length]) for x in ids]

    async def score_one(
        self,
        seq_id: str | None,
        input_ids: list[int],
        scoring: Scoring,
        selected: np.ndarray | None = None,
        draws_at_last: bool = False,
    ) -> ScoredSequence:
        """The teacher's distribution at every position of ``input_ids``, reduced as ``scoring`` asks.

        ``selected`` marks the positions whose targets are kept (see ``selected_positions``);
        ``draws_at_last`` draws ``scoring``'s samples at the last position only (the other positions'
        draw columns then hold no draws: the one token a completion generates).
        """
        from vllm.inputs import TokensPrompt

        # vLLM marks its other keys typing.NotRequired, which mypy's Python 3.10 target lacks (it reads
        # them as required).
        prompt = TokensPrompt(prompt_token_ids=input_ids)  # type: ignore[typeddict-item]
        request_id = f"tf-{next(self._ids)}"
        if self.info.scoring == "pooled":
            from vllm import PoolingParams

            from teacher_farm.server.scoring_model import DRAWS_AT_LAST, TASK

            kwargs = scoring.pooler_kwargs(draw_seed(scoring.seed, input_ids))
            if draws_at_last:
                kwargs[DRAWS_AT_LAST] = True
            params = PoolingParams(task=TASK, extra_kwargs=kwargs)
            final: Any = None
            async for output in self.llm.encode(prompt, params, request_id):
                final = output  # the last output is the finished one
            return from_packed(seq_id, input_ids, final.outputs.data.numpy(), scoring, selected)

        from vllm import SamplingParams

        k = scoring.k
        sampling = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=k,
            logprobs=k,
            detokenize=False,
            flat_logprobs=True,
        )
        final = None
        async for output in self.llm.generate(prompt, sampling, request_id):
            final = output
        return to_scored(seq_id, input_ids, final, k, selected)

    async def score_request(
        self, req: TopkRequest, token_ids: list[list[int]], *, draws_at_last: bool = False
    ) -> list[ScoredSequence]:
        """Score a request's inputs (``prepare``'s token ids) as it asks, its position rule included
        (``draws_at_last``: see ``score_one``)."""
        selected = None
        if req.scoring.positions == "assistant":
            selected = await asyncio.to_thread(self.selected_positions, req, token_ids)
        return await self.score(
            [x.id for x in req.inputs], token_ids, req.scoring, selected, draws_at_last=draws_at_last
        )

    async def score(
        self,
        ids: Sequence[str | None],
        token_ids: Sequence[list[int]],
        scoring: Scoring,
        selected: Sequence[np.ndarray | None] | None = None,
        *,
        draws_at_last: bool = False,
    ) -> list[ScoredSequence]:
        """Score many sequences at once; the engine batches them."""
        selected = selected or [None] * len(token_ids)
        return list(
            await asyncio.gather(
                *(
                    self.score_one(i, t, scoring, s, draws_at_last)
                    for i, t, s in zip(ids, token_ids, selected)
                )
            )
        )

    async def warm_up(self) -> None:
        """Score one two-token prompt before serving: the pooled worker chooses its reduction kernels on
        its first chunk (``server/kernels.py``; vLLM's CPU build runs no profiling pass that would), and
        ``info`` then shows the choice."""
        if self.info.scoring != "pooled":
            return
        await self.score([None], [[0, 1]], Scoring(k=1))
        report = read_kernel_report()
        if report:
            self.info = self.info.model_copy(update={"kernels": report})

    def shutdown(self) -> None:
        """Stop the engine's processes now, not at interpreter exit (when vLLM's own cleanup fails)."""
        if self.llm is not None:
            self.llm.shutdown(timeout=ENGINE_STOP_S)
            self.llm = None
        # An in-process teacher never warms up, so its worker's report would stay behind.
        kernel_report_path().unlink(missing_ok=True)
