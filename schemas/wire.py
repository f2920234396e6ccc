"""Request and response models of the HTTP API (pydantic)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from teacher_farm.schemas.scoring import Scoring, ScoringBackend


class ChatMessage(BaseModel):
    """One turn of a chat record."""

    model_config = ConfigDict(extra="forbid")

    role: StrictStr
    content: StrictStr


class TopkInput(BaseModel):
    """One sequence to score: ``text`` or chat ``messages`` (tokenized by the teacher), or ``token_ids``."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    text: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    token_ids: list[Annotated[int, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> TopkInput:
        if sum(x is not None for x in (self.text, self.messages, self.token_ids)) != 1:
            raise ValueError("give exactly one of 'text', 'messages' or 'token_ids'")
        if self.text is not None and not self.text:
            raise ValueError("'text' is empty")
        if self.token_ids is not None and not self.token_ids:
            raise ValueError("'token_ids' is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty")
        return self


class TopkRequest(BaseModel):
    """Body of ``POST /v1/topk``: the scoring options, the inputs and how to answer.

    The body carries the options as its own fields (``k``, ``temperature``, ...); the request holds them
    as one ``Scoring``, validated once, which is what the server hands on. In Python, give either
    ``scoring=`` or those fields.
    """

    model_config = ConfigDict(extra="forbid")

    scoring: Scoring = Field(default_factory=Scoring)
    inputs: list[TopkInput] = Field(min_length=1)
    max_length: int | None = Field(
        None, ge=1, description="truncate each input to this many tokens (after special tokens)"
    )
    logprob_dtype: Literal["float32", "float16"] = Field(
        "float32", description="logprob precision of an Arrow answer (float16 halves its logprob bytes)"
    )

    @model_validator(mode="before")
    @classmethod
    def _options_are_the_bodys_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict) or isinstance(data.get("scoring"), Scoring):
            return data
        if "scoring" in data:
            raise ValueError("Extra inputs are not permitted: 'scoring' (the options are the body's fields)")
        options = {name: data[name] for name in Scoring.model_fields if name in data}
        rest = {name: value for name, value in data.items() if name not in Scoring.model_fields}
        return {**rest, "scoring": options}

    @staticmethod
    def body_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
        """Where in the body a validation error lies: the options' errors name the body's own fields."""
        return loc[1:] if loc[:1] == ("scoring",) else loc


class Versions(BaseModel):
    teacher_farm: str
    schema_version: int
    vllm: str


class Info(BaseModel):
    """Answer of ``GET /v1/info``: what a client must know to trust and resume a cache."""

    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    k_max: int
    max_model_len: int
    max_input_tokens: int
    max_inputs_per_request: int
    #: Tokens (after truncation) one ``/v1/topk`` request may hold; larger gets 413. A server older
    #: than this field held 262,144 (its default), which a client then assumes.
    max_tokens_per_request: int = 262_144
    #: Bytes one answer may hold (estimated before scoring); larger gets 413. 0: not stated.
    max_answer_bytes: int = 0
    #: Bytes of a request's body the server reads; larger gets 413. 0: not stated.
    max_body_bytes: int = 0
    #: Turns one chat record may hold; more gets 413. 0: not stated.
    max_chat_turns: int = 0
    adds_bos: bool
    versions: Versions
    #: How the server computes the answers (``schemas.scoring.ScoringBackend``).
    scoring: ScoringBackend = "prompt-logprobs"
    #: Why: asked for, the architecture, or the pooled backend's failed start-up self-test (with the
    #: vLLM release) that made ``--scoring auto`` fall back to prompt logprobs.
    scoring_reason: str = ""
    #: Largest ``samples`` a request may ask for (0: no sampled targets).
    max_samples: int = 0
    #: The pooled reduction's kernels, chosen by timing them in the worker at start-up: the way of
    #: each step, the shape timed and the milliseconds behind the choice (``server/kernels.py``).
    kernels: dict[str, Any] = Field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """What identifies the teacher's answers: model and tokenizer."""
        return f"{self.model_fingerprint}/{self.tokenizer_fingerprint}"
