"""The teacher: vLLM's ``AsyncLLM`` in process, answering top-k prompt-logprob requests as numpy.

vLLM's flat prompt logprobs hold, for every position after the first, k+1 entries: the actual next
token first, then the top-k by rank. So one ``reshape(n - 1, k + 1)`` per array gives the top-k
*and* the target token's logprob and rank. The last position's distribution comes from the single
sampled token (``logprobs=k``, greedy so its first entry is deterministic), laid out the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from teacher_farm.schemas import SCHEMA_VERSION, __version__
from teacher_farm.schemas.arrow import ScoredSequence
from teacher_farm.schemas.errors import InputError, TeacherFarmError
from teacher_farm.schemas.wire import Info, TopkRequest, Versions
from teacher_farm.server.lifecycle import ENGINE_STOP_S, mark_engine_owner

log = logging.getLogger(__name__)

#: CPU builds of vLLM read ``gpu_memory_utilization`` as a share of the NUMA node's RAM.
CPU_MEMORY_UTILIZATION = 0.4


def engine_defaults(engine_args: dict[str, Any], k_max: int) -> dict[str, Any]:
    """vLLM engine arguments for scoring: ours first, then what the user passed wins."""
    from vllm.platforms import current_platform

    args: dict[str, Any] = {
        "max_logprobs": k_max,
        # Prompt-logprob requests skip the prefix cache anyway; don't pay for its bookkeeping.
        "enable_prefix_caching": False,
        "disable_log_stats": True,
    }
    if current_platform.is_cpu():
        args["gpu_memory_utilization"] = CPU_MEMORY_UTILIZATION
    args.update({k: v for k, v in engine_args.items() if v is not None})
    if args["max_logprobs"] < k_max:
        raise TeacherFarmError(f"max_logprobs={args['max_logprobs']} is below k_max={k_max}")
    return args


def _sha256_file_sample(path: Path, h: "hashlib._Hash", chunk: int = 1 << 20) -> None:
    """Hash a weights file's size, head and tail: cheap, and catches a different checkpoint."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))


def model_fingerprint(model: str, hf_config_json: str) -> str:
    """A short stable id of the teacher's weights and config."""
    h = hashlib.sha256(hf_config_json.encode())
    root = Path(model)
    if root.is_dir():
        for p in sorted(itertools.chain(root.glob("*.safetensors"), root.glob("*.bin"))):
            _sha256_file_sample(p, h)
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short stable id of what the tokenizer maps text to."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(
        [getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    )
    return hashlib.sha256((payload + special).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TeacherInfo:
    """What the engine knows about itself, served at ``/v1/info``."""

    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    k_max: int
    max_model_len: int
    adds_bos: bool

    @property
    def fingerprint(self) -> str:
        """Model and tokenizer, as the ``X-Teacher-Fingerprint`` header and ``Info.fingerprint`` say it."""
        return f"{self.model_fingerprint}/{self.tokenizer_fingerprint}"

    @property
    def max_input_tokens(self) -> int:
        # One slot stays free for the sampled token that carries the last position's distribution.
        return self.max_model_len - 1

    def to_wire(self, max_inputs_per_request: int) -> Info:
        import vllm

        return Info(
            model=self.model,
            model_fingerprint=self.model_fingerprint,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            vocab_size=self.vocab_size,
            k_max=self.k_max,
            max_model_len=self.max_model_len,
            max_input_tokens=self.max_input_tokens,
            max_inputs_per_request=max_inputs_per_request,
            adds_bos=self.adds_bos,
            versions=Versions(teacher_farm=__version__, schema_version=SCHEMA_VERSION, vllm=vllm.__version__),
        )


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


def to_scored(seq_id: str | None, input_ids: Sequence[int], output: Any, k: int) -> ScoredSequence:
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
    )


class Teacher:
    """A loaded teacher model: tokenizes text and scores token sequences."""

    def __init__(self, llm: Any, tokenizer: Any, info: TeacherInfo) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.info = info
        self._ids = itertools.count()

    @classmethod
    def load(cls, engine_args: dict[str, Any], k_max: int) -> Teacher:
        """Start vLLM (blocking: tens of seconds to minutes) and read the model's facts."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from transformers import AutoTokenizer

        args = engine_defaults(engine_args, k_max)
        log.info("starting vLLM engine: %s", args)
        mark_engine_owner()  # the engine's processes end with this one (server/lifecycle.py)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        mc = llm.model_config
        tokenizer = AutoTokenizer.from_pretrained(
            args.get("tokenizer") or args["model"], trust_remote_code=bool(args.get("trust_remote_code"))
        )
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        info = TeacherInfo(
            model=args.get("served_model_name") or args["model"],
            model_fingerprint=model_fingerprint(args["model"], mc.hf_config.to_json_string()),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            vocab_size=mc.get_vocab_size(),
            k_max=args["max_logprobs"],
            max_model_len=mc.max_model_len,
            adds_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        )
        return cls(llm, tokenizer, info)

    def tokenize(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        """Token ids as the teacher sees them (special tokens included), cut to ``max_length``."""
        enc = self.tokenizer(
            texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length
        )
        return enc["input_ids"]

    def prepare(self, req: TopkRequest) -> list[list[int]]:
        """Validate a request against this teacher and return every input's token ids.

        Text goes through the teacher's tokenizer (special tokens included); everything is cut to
        ``max_length``, and to what the engine can hold.
        """
        if req.k > self.info.k_max:
            raise InputError(f"k={req.k} is over this server's k_max={self.info.k_max}")
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
            if max(x.token_ids) >= vocab:
                raise InputError(
                    f"inputs.{i}.token_ids: token id {max(x.token_ids)} is outside the vocabulary (size {vocab})"
                )
            out.append(x.token_ids[:max_length])
        return out

    def render_chats(self, chats: list[list[dict]], max_length: int) -> list[list[int]]:
        """Token ids of chat records through the teacher's chat template, cut to ``max_length``."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError("the teacher's tokenizer has no chat template: send 'text' instead of 'messages'")
        ids = self.tokenizer.apply_chat_template(chats, tokenize=True, add_generation_prompt=False, return_dict=False)
        return [list(x[:max_length]) for x in ids]

    async def score_one(self, seq_id: str | None, input_ids: list[int], k: int) -> ScoredSequence:
        """The top-k distribution at every position of ``input_ids``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k,
            detokenize=False, flat_logprobs=True,
        )
        final = None
        async for final in self.llm.generate(TokensPrompt(prompt_token_ids=input_ids), params, f"tf-{next(self._ids)}"):
            pass
        return to_scored(seq_id, input_ids, final, k)

    async def score(self, ids: Sequence[str | None], token_ids: Sequence[list[int]], k: int) -> list[ScoredSequence]:
        """Score many sequences at once; the engine batches them."""
        return list(await asyncio.gather(*(self.score_one(i, t, k) for i, t in zip(ids, token_ids))))

    def shutdown(self) -> None:
        """Stop the engine's processes now, not at interpreter exit (when vLLM's own cleanup fails)."""
        if self.llm is not None:
            self.llm.shutdown(timeout=ENGINE_STOP_S)
            self.llm = None
