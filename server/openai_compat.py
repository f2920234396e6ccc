"""OpenAI-compatible endpoints, so lm-evaluation-harness can score against the farm.

``lm_eval --model local-completions --model_args base_url=http://host:8000/v1/completions,...``
sends loglikelihood requests as ``POST /v1/completions`` with ``echo=true``, ``max_tokens`` 0 or 1,
``logprobs`` N and ``temperature`` 0, and reads ``token_logprobs`` / ``top_logprobs`` of the prompt.
TRL's teacher client (trainers that reach a teacher as vLLM's server) sends ``prompt_logprobs`` K
with ``max_tokens`` 1 and its temperature T, and reads vLLM's ``prompt_logprobs``
(``server/prompt_logprobs.py``), here those of ``softmax(logits / T)``. Both are exactly
``/v1/topk``'s ``target_logprobs`` and top-k rows at T, so this module only reshapes one
``Teacher.prepare`` / ``Teacher.score`` answer into the completions format; the one generated token
is drawn at the last position by the same reduction (seeded by ``seed``), or its argmax at T = 0. It
scores prompts only: anything that asks for more than one generated token gets a 422.

``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` are shaped like vLLM's own,
so lm-eval's ``tokenizer_backend=remote`` works too; ``/tokenize`` also takes vLLM's chat form
(``messages``), which the cache client uses to window chat records longer than its max length.
``GET /v1/models`` and ``GET /v1/models/{id}`` let OpenAI clients discover the served model's name
(``client.models.list()``).

``logprobs``' per-token dicts are built here and only here, off the event loop; ``prompt_logprobs``
are written as JSON from the arrays.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from pydantic_core import ErrorDetails

from teacher_farm.schemas import __version__
from teacher_farm.schemas.arrow import ScoredSequence
from teacher_farm.schemas.errors import InputError, RequestTooLarge
from teacher_farm.schemas.scoring import MAX_TEMPERATURE, MIN_TEMPERATURE, Scoring
from teacher_farm.schemas.wire import ChatMessage, TopkInput, TopkRequest
from teacher_farm.server import metrics
from teacher_farm.server.intake import (
    AnswerResponse,
    check_numbers,
    completion_answer_bytes,
    json_chunks,
    loaded_engine,
    parse_body,
    read_body,
    score_admitted,
)
from teacher_farm.server.prompt_logprobs import MIN_LOGPROB, prompt_logprobs_json, token_table
from teacher_farm.server.settings import ServerSettings, get_settings

router = APIRouter()

#: When this server started (its routes were loaded): the ``created`` of its model card.
STARTED = int(time.time())


class CompletionRequest(BaseModel):
    """The fields of an OpenAI completions request that matter for scoring a prompt, with vLLM's
    ``prompt_logprobs`` (what TRL's distillation trainers ask a teacher for).

    Other sampling fields (``top_p``, ``stop``, ``user``, ...) are accepted and ignored: prompt
    logprobs do not depend on them, and the one optional generated token is drawn at ``temperature``
    (greedy at 0) from the full distribution.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16  # OpenAI's default: a request that leaves it out asks to generate
    echo: bool = False
    logprobs: int | None = None
    #: vLLM's extension: the actual token and the top N at every prompt position (-1: the vocabulary).
    prompt_logprobs: int | None = None
    temperature: float | None = None
    seed: int | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extension: tokens as "token_id:<id>"
    return_token_ids: bool | None = None  # vLLM's extension: prompt_token_ids and token_ids in the choice

    @model_validator(mode="before")
    @classmethod
    def _null_max_tokens(cls, data: Any) -> Any:
        # vLLM reads an explicit null as its default (``normalize_null_max_tokens``).
        if isinstance(data, dict) and "max_tokens" in data and data["max_tokens"] is None:
            return {k: v for k, v in data.items() if k != "max_tokens"}
        return data

    @property
    def draws(self) -> bool:
        """Whether the one generated token is drawn (temperature above 0), not the argmax."""
        return self.max_tokens == 1 and (self.temperature is None or self.temperature > 0)

    @property
    def scoring_temperature(self) -> float:
        """The T of every logprob of the answer: vLLM's default 1 when unset, and 1 when greedy
        (T = 0 asks for the argmax, not for a distribution at T = 0)."""
        return 1.0 if not self.temperature else self.temperature


class TokenizeRequest(BaseModel):
    """vLLM's ``TokenizeCompletionRequest``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: StrictStr
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """vLLM's ``TokenizeChatRequest``, for the chat records ``/v1/topk`` takes
    (string ``role`` and ``content``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    #: vLLM's default; ``/v1/topk`` renders records without it (``continue_final_message`` turns it off).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # on top of what the chat template adds
    return_token_strs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _one_ending(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("continue_final_message"):
            return data
        if data.get("add_generation_prompt"):
            raise ValueError("give add_generation_prompt or continue_final_message, not both")
        return {**data, "add_generation_prompt": False}


class DetokenizeRequest(BaseModel):
    """vLLM's ``DetokenizeRequest``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


def _completion_problems(errors: list[ErrorDetails]) -> list[str]:
    """Field-by-field messages, with one line for the whole ``prompt`` union."""
    problems, prompt_is_bad = [], False
    for e in errors:
        if e["loc"][:1] == ("prompt",) and len(e["loc"]) > 1:
            if not prompt_is_bad:
                problems.append(
                    "prompt: must be a string, a list of strings, a list of token ids or a list of "
                    "token-id lists"
                )
            prompt_is_bad = True
        else:
            problems.append(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}")
    return problems


def check_completion(req: CompletionRequest, k_max: int) -> None:
    """Refuse what this server cannot answer faithfully, saying what to send instead."""
    if req.max_tokens is None or req.max_tokens not in (0, 1):
        given = (
            f"max_tokens={req.max_tokens}"
            if "max_tokens" in req.model_fields_set
            else ("max_tokens is not set (OpenAI's default is 16)")
        )
        raise InputError(
            f"{given}: this server scores prompts only; send max_tokens=0 or 1 with echo=true and "
            "logprobs=N (as lm-eval's loglikelihood requests do) or with prompt_logprobs=N (as TRL's)"
        )
    if req.max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
        raise InputError(
            "echo=false with max_tokens=0 asks for nothing: this server scores prompts only; "
            "send echo=true or prompt_logprobs=N to get the prompt's logprobs"
        )
    if (
        req.temperature is not None
        and req.temperature != 0
        and not (MIN_TEMPERATURE <= req.temperature <= MAX_TEMPERATURE)
    ):
        raise InputError(
            f"temperature={req.temperature}: send 0 (greedy) or a temperature from {MIN_TEMPERATURE} "
            f"to {MAX_TEMPERATURE:g}"
        )
    if req.prompt_logprobs is not None:
        if req.prompt_logprobs == -1:
            raise InputError(
                f"prompt_logprobs=-1 asks for the whole vocabulary at every position; this server answers "
                f"up to its k_max={k_max}: send prompt_logprobs={k_max} or less"
            )
        if req.prompt_logprobs < 0:
            raise InputError(f"prompt_logprobs={req.prompt_logprobs} must be 0 or more (or -1)")
        if req.prompt_logprobs > k_max:
            raise InputError(
                f"prompt_logprobs={req.prompt_logprobs} is over this server's k_max={k_max} "
                "(serve --k-max raises it)"
            )
    if req.stream:
        raise InputError("stream=true is not supported: this server scores prompts only")
    if req.n != 1 or req.best_of not in (None, 1):
        raise InputError("n and best_of must be 1: this server scores prompts only")
    if req.logprobs is not None and req.logprobs < 0:
        raise InputError(f"logprobs={req.logprobs} must be 0 or more")
    if req.logprobs is not None and req.logprobs > k_max:
        raise InputError(f"logprobs={req.logprobs} is over this server's k_max={k_max}")


def _prompts(req: CompletionRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    """The prompts as texts or as token-id lists (exactly one of the two is set)."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise InputError("prompt is empty")
    if isinstance(p[0], str):
        for i, text in enumerate(p):
            if not text:
                raise InputError(f"prompt.{i} is an empty string")
        return p, None
    if isinstance(p[0], int):
        p = [p]
    for i, ids in enumerate(p):
        if not ids:
            raise InputError(f"prompt.{i} is an empty list of token ids")
    return None, p


def _check_token_ids(token_ids: list[list[int]], vocab: int, limit: int) -> None:
    for i, ids in enumerate(token_ids):
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except OverflowError:  # an id beyond 2**63 is no int64, let alone a token
            raise InputError(f"prompt.{i}: a token id is outside the vocabulary (size {vocab})") from None
        if arr.min() < 0 or arr.max() >= vocab:
            bad = int(arr[(arr < 0) | (arr >= vocab)][0])
            raise InputError(f"prompt.{i}: token id {bad} is outside the vocabulary (size {vocab})")
        if arr.size > limit:
            raise InputError(
                f"prompt.{i} has {arr.size} tokens; this server scores at most {limit} per prompt "
                f"(max_model_len {limit + 1}, one slot kept for the next token): send shorter prompts, "
                f"e.g. lm-eval's max_length={limit + 1}"
            )


class _Strings:
    """Token strings for ids, decoded once per distinct id of a request."""

    def __init__(self, tokenizer: Any, ids: np.ndarray, as_token_ids: bool) -> None:
        self.uniq = np.unique(ids)
        if as_token_ids:
            strs = [f"token_id:{i}" for i in self.uniq.tolist()]
        else:
            strs = tokenizer.batch_decode(self.uniq[:, None].tolist(), skip_special_tokens=False)
        self.table = np.asarray(strs, dtype=object)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.table[np.searchsorted(self.uniq, ids)]


def _top_dicts(keys: np.ndarray, lps: list[list[float]]) -> list[dict[str, float] | None]:
    """One ``{token: logprob}`` per row, most likely first; a key two ids decode to keeps its best."""
    # None-able: an echoed answer puts None before them, for the first token (nothing predicts it).
    out: list[dict[str, float] | None] = []
    for row_keys, row_lps in zip(keys.tolist(), lps):
        d = dict(zip(row_keys, row_lps))
        if len(d) < len(row_keys):  # e.g. byte tokens that each decode to "�"
            d = {}
            for key, lp in zip(row_keys, row_lps):
                d.setdefault(key, lp)
        out.append(d)
    return out


def generated_token(req: CompletionRequest, s: ScoredSequence) -> tuple[int, float]:
    """The one generated token and its logprob: drawn at the last position at T, or its argmax."""
    if req.draws:
        assert s.sample_ids is not None and s.sample_logprobs is not None  # the request drew one
        return int(s.sample_ids[-1]), float(s.sample_logprobs[-1])
    return int(s.topk_ids[-1, 0]), float(s.topk_logprobs[-1, 0])


def completion_choices(
    req: CompletionRequest,
    tokenizer: Any,
    texts: list[str] | None,
    scored: list[ScoredSequence],
    vocab_size: int = 0,
) -> list[dict[str, Any]]:
    """The ``choices`` of a completions answer, one per prompt, with vLLM's keys."""
    n_top = req.logprobs or 0
    gen = req.max_tokens == 1
    nexts = [generated_token(req, s) for s in scored] if gen else []
    parts = [s.input_ids for s in scored] + [s.topk_ids[:, :n_top].reshape(-1) for s in scored]
    parts += [np.asarray([i for i, _ in nexts], dtype=np.int64)]
    strings = _Strings(tokenizer, np.concatenate(parts), req.return_tokens_as_token_ids)
    table = None
    if req.prompt_logprobs is not None:
        table = token_table(tokenizer, vocab_size or len(tokenizer))

    choices = []
    for index, s in enumerate(scored):
        n = len(s.input_ids)
        # Position i predicts token i + 1: rows 0..n-2 carry the prompt's tokens 1..n-1, row n-1
        # the greedy next token.
        rows = slice(0, n - 1 + gen) if req.echo else slice(n - 1, n - 1 + gen)
        top_ids = s.topk_ids[rows, :n_top]
        top_lps = np.maximum(s.topk_logprobs[rows, :n_top], MIN_LOGPROB).tolist()
        token_ids = s.input_ids.tolist() if req.echo else []
        token_lps: list[float | None] = (
            [None, *np.maximum(s.target_logprobs, MIN_LOGPROB).tolist()] if req.echo else []
        )
        tops: list[dict[str, float] | None] = _top_dicts(strings(top_ids), top_lps)
        if req.echo:
            tops.insert(0, None)
        text = ""
        if req.echo:
            text = (
                texts[index] if texts is not None else tokenizer.decode(token_ids, skip_special_tokens=False)
            )
        if gen:
            next_id, next_lp = nexts[index]
            token_ids.append(next_id)
            token_lps.append(max(next_lp, MIN_LOGPROB))
            text += tokenizer.decode([next_id], skip_special_tokens=False)

        tokens = strings(np.asarray(token_ids, dtype=np.int64)).tolist() if token_ids else []
        offsets = np.zeros(len(tokens), dtype=np.int64)
        if tokens:
            np.cumsum([len(t) for t in tokens[:-1]], out=offsets[1:])
        choices.append(
            {
                "index": index,
                "text": text,
                "logprobs": None
                if req.logprobs is None
                else {  # vLLM's CompletionLogProbs, in its order
                    "text_offset": offsets.tolist(),
                    "token_logprobs": token_lps,
                    "tokens": tokens,
                    "top_logprobs": tops,
                },
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": (nexts[index][:1] if gen else ()) if req.return_token_ids else None,
                "prompt_logprobs": None
                if table is None
                else orjson.Fragment(prompt_logprobs_json(s, req.prompt_logprobs or 0, table)),
                "prompt_token_ids": s.input_ids if req.return_token_ids else None,
                "routed_experts": None,
                "weight_versions": None,
            }
        )
    return choices


def completion_scoring(req: CompletionRequest) -> Scoring:
    """What the pooled reduction computes for a completions request: the widest top-k it asks for, at
    its temperature, with one token drawn (at the last position only) where it generates one at T > 0."""
    k = max(req.logprobs or 0, req.prompt_logprobs or 0, 1)
    if not req.draws:
        return Scoring(k=k, temperature=req.scoring_temperature)
    seed = secrets.randbelow(2**32) if req.seed is None else req.seed % 2**32
    return Scoring(k=k, temperature=req.scoring_temperature, targets="both", samples=1, seed=seed)


@router.post("/v1/completions")
async def completions(
    request: Request, engine: Any = Depends(loaded_engine), settings: ServerSettings = Depends(get_settings)
) -> Response:
    """OpenAI completions for scoring: the prompt's logprobs (``echo`` with ``logprobs``, lm-eval's form;
    ``prompt_logprobs``, vLLM's, which TRL's teacher client asks for) and at most one generated token.

    Admitted by the size of its answer too (its ``top_logprobs`` dicts), built and encoded in a thread.
    """
    body = await read_body(request, settings.max_body_bytes)
    await asyncio.to_thread(check_numbers, body, settings.max_tokens_per_request)
    req = parse_body(CompletionRequest, body, _completion_problems)
    del body
    check_completion(req, engine.info.k_max)
    texts, prompt_ids = _prompts(req)  # exactly one is set
    count = len(texts) if texts is not None else len(prompt_ids or [])
    if count > settings.max_inputs_per_request:
        raise RequestTooLarge(
            f"{count} prompts in one request; the limit is {settings.max_inputs_per_request}"
        )
    token_ids: list[list[int]] = (
        await asyncio.to_thread(engine.tokenize, texts, None) if texts is not None else prompt_ids or []
    )
    await asyncio.to_thread(_check_token_ids, token_ids, engine.info.vocab_size, engine.info.max_input_tokens)

    # The one scoring path: the same request model, limits, admission and engine call as /v1/topk.
    topk_req = TopkRequest(
        scoring=completion_scoring(req), inputs=[TopkInput(token_ids=ids) for ids in token_ids]
    )
    del token_ids
    entries = max(req.logprobs or 0, (req.prompt_logprobs or 0) + 1)
    scored, total, release = await score_admitted(
        request,
        engine,
        topk_req,
        settings,
        lambda tokens: completion_answer_bytes(entries, tokens, count),
        "send fewer or shorter prompts, or a smaller logprobs or prompt_logprobs",
        draws_at_last=req.draws,
    )
    try:
        choices = await asyncio.to_thread(
            completion_choices, req, engine.tokenizer, texts, scored, engine.info.vocab_size
        )
        del scored
        generated = count if req.max_tokens == 1 else 0
        # vLLM's CompletionResponse, key for key (its optional fields unset).
        answer = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.info.model,
            "choices": choices,
            "service_tier": None,
            # As vLLM's ("vllm-<version>-<config hash>"): this server's release and teacher.
            "system_fingerprint": f"teacher-farm-{__version__}-{engine.info.model_fingerprint[:8]}",
            "usage": {
                "prompt_tokens": total,
                "total_tokens": total + generated,
                "completion_tokens": generated,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
        del choices
        chunks = await asyncio.to_thread(json_chunks, answer)
    except BaseException:
        release()
        raise
    return AnswerResponse(chunks, "application/json", {}, release, settings.body_timeout_s)


def chat_ids(engine: Any, req: TokenizeChatRequest) -> list[int]:
    """A chat record's token ids in full, rendered by the same call as ``/v1/topk``'s ``messages``."""
    return engine.render_chats(
        [[m.model_dump() for m in req.messages]],
        None,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        add_special_tokens=req.add_special_tokens,
    )[0]


@router.post("/tokenize")
async def tokenize(
    request: Request, engine: Any = Depends(loaded_engine), settings: ServerSettings = Depends(get_settings)
) -> Response:
    """vLLM's ``/tokenize``: a completion ``prompt`` or chat ``messages`` in; ``{"tokens", "count",
    "max_model_len"}``.

    ``{"messages": [...], "add_generation_prompt": false}`` gives exactly the ids ``/v1/topk``
    scores for that chat record, untruncated: what the client windows a long chat record by.
    """
    body = await read_body(request, settings.max_body_bytes)
    if _is_chat(body):
        chat = parse_body(TokenizeChatRequest, body)
        if len(chat.messages) > settings.max_chat_turns:
            raise RequestTooLarge(
                f"messages: {len(chat.messages)} turns in one chat record; this server's limit is "
                f"{settings.max_chat_turns} (max_chat_turns): split the conversation"
            )
        ids = await asyncio.to_thread(chat_ids, engine, chat)
        token_strs = chat.return_token_strs
    else:
        req = parse_body(TokenizeRequest, body)
        ids = await asyncio.to_thread(
            lambda: engine.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        )
        token_strs = req.return_token_strs
    del body
    if len(ids) > settings.max_tokens_per_request:
        raise RequestTooLarge(
            f"the text is {len(ids)} tokens; this server tokenizes at most {settings.max_tokens_per_request} "
            "(max_tokens_per_request) at once: send it in parts"
        )

    def answer() -> list[bytes]:
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.info.max_model_len, "tokens": ids}
        out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids) if token_strs else None
        return json_chunks(out)

    chunks = await asyncio.to_thread(answer)
    return AnswerResponse(chunks, "application/json", {}, lambda: None, settings.body_timeout_s)


def _is_chat(body: bytes) -> bool:
    """Whether a ``/tokenize`` body is vLLM's chat form (it has ``messages``); anything unparsable is not."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and "messages" in data


@router.post("/detokenize")
async def detokenize(
    request: Request, engine: Any = Depends(loaded_engine), settings: ServerSettings = Depends(get_settings)
) -> Response:
    """vLLM's ``/detokenize``: ``{"prompt": text}``."""
    body = await read_body(request, settings.max_body_bytes)
    await asyncio.to_thread(check_numbers, body, settings.max_tokens_per_request)
    req = parse_body(DetokenizeRequest, body)
    if len(req.tokens) > settings.max_tokens_per_request:
        raise RequestTooLarge(
            f"tokens: {len(req.tokens)} ids; this server detokenizes at most "
            f"{settings.max_tokens_per_request} (max_tokens_per_request) at once: send them in parts"
        )
    if req.tokens and max(req.tokens) >= engine.info.vocab_size:
        raise InputError(
            f"tokens: token id {max(req.tokens)} is outside the vocabulary (size {engine.info.vocab_size})"
        )
    text = await asyncio.to_thread(engine.tokenizer.decode, req.tokens, skip_special_tokens=False)
    return JSONResponse({"prompt": text})


def _jsonable(obj: Any) -> Any:
    """``AddedToken`` and friends as plain JSON, as vLLM's ``TokenizerInfo`` does."""
    if hasattr(obj, "content"):
        return obj.content
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def tokenizer_info(tokenizer: Any, max_model_len: int) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info`` (the tokenizer's ``init_kwargs``, less file paths), plus the ids."""
    config = dict(getattr(tokenizer, "init_kwargs", None) or {})
    for path_field in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path"):
        config.pop(path_field, None)
    config = _jsonable(config)
    config["tokenizer_class"] = type(tokenizer).__name__
    for name in ("bos", "eos", "pad", "unk"):
        config[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
        config[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
    config["vocab_size"] = len(tokenizer)
    config["model_max_length"] = _jsonable(getattr(tokenizer, "model_max_length", None))
    config["max_model_len"] = max_model_len
    template = getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    return config


@router.get("/tokenizer_info")
async def get_tokenizer_info(engine: Any = Depends(loaded_engine)) -> Response:
    """What a remote-tokenizer client (lm-eval's ``tokenizer_backend=remote``) needs."""
    return JSONResponse(tokenizer_info(engine.tokenizer, engine.info.max_model_len))


class ModelCard(BaseModel):
    """One model of ``GET /v1/models``: OpenAI's ``Model``, plus the fields vLLM adds."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "teacher-farm"
    root: str
    parent: str | None = None
    max_model_len: int
    # vLLM fills in a permissive ``model_permission``; this server has no permissions to describe.
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    """OpenAI's list of models: this server serves one."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_card(engine: Any) -> ModelCard:
    """The served model's card: its name, and as ``root`` the checkpoint the engine loaded."""
    config = getattr(getattr(engine, "llm", None), "model_config", None)
    return ModelCard(
        id=engine.info.model,
        created=STARTED,
        root=getattr(config, "model", None) or engine.info.model,
        max_model_len=engine.info.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(engine: Any = Depends(loaded_engine)) -> ModelList:
    """OpenAI's model list (``client.models.list()``): the one model this server scores with."""
    return ModelList(data=[model_card(engine)])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"description": "no model of that name is served here"}},
)
async def retrieve_model(model_id: str, engine: Any = Depends(loaded_engine)) -> ModelCard | Response:
    """OpenAI's model retrieval (``client.models.retrieve(id)``);
    404 for a name this server does not serve."""
    card = model_card(engine)
    if model_id == card.id:
        return card
    metrics.ERRORS.labels(kind="ModelNotFound").inc()
    # OpenAI's own error shape (the other routes answer {"error": message, "kind"}): the openai client
    # shows ``error.message`` and ``error.code`` only when ``error`` is an object.
    message = f"the model `{model_id}` does not exist here: this server serves `{card.id}` (GET /v1/models)"
    error = {"message": message, "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    return JSONResponse({"error": error, "kind": "ModelNotFound"}, status_code=404)
