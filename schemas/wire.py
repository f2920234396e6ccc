"""Request and response models of the HTTP API (pydantic)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator


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
    """Body of ``POST /v1/topk``."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(16, ge=1, description="how many most likely next tokens to return per position")
    inputs: list[TopkInput] = Field(min_length=1)
    max_length: int | None = Field(
        None, ge=1, description="truncate each input to this many tokens (after special tokens)"
    )
    logprob_dtype: Literal["float32", "float16"] = Field(
        "float32", description="logprob precision of an Arrow answer (float16 halves its logprob bytes)"
    )
    temperature: float = Field(
        1.0, gt=0, le=1000, description="logprobs (and draws) are those of softmax(logits / temperature)"
    )
    targets: Literal["topk", "sampled", "both"] = Field(
        "topk", description="the top-k per position, tokens sampled from the teacher, or both"
    )
    samples: int = Field(64, ge=1, le=4096, description="draws per position, with sampled targets")
    seed: int = Field(0, ge=0, lt=2**32, description="same seed and input, same draws")


class TopkResult(BaseModel):
    """The teacher's top-k distribution at every position of one input."""

    id: str | None
    input_ids: list[int]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    target_logprobs: list[float]
    target_ranks: list[int]
    sample_ids: list[list[int]] | None = None
    sample_counts: list[list[int]] | None = None
    sample_logprobs: list[list[float]] | None = None


class TopkResponse(BaseModel):
    """JSON answer of ``POST /v1/topk``."""

    model: str
    k: int
    results: list[TopkResult]


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
    adds_bos: bool
    versions: Versions
    #: How the server computes the answers: "pooled" (reduced in the vLLM worker: any k up to
    #: k_max, temperature, sampled targets) or "prompt-logprobs" (vLLM's API: top-k at T=1 only).
    scoring: Literal["pooled", "prompt-logprobs"] = "prompt-logprobs"
    #: Why: asked for, the architecture, or the pooled backend's failed start-up self-test (with the
    #: vLLM release) that made ``--scoring auto`` fall back to prompt logprobs.
    scoring_reason: str = ""
    #: Largest ``samples`` a request may ask for (0: no sampled targets).
    max_samples: int = 0

    @property
    def fingerprint(self) -> str:
        """What identifies the teacher's answers: model and tokenizer."""
        return f"{self.model_fingerprint}/{self.tokenizer_fingerprint}"


class ErrorBody(BaseModel):
    """Every error answer: a message a person can act on."""

    error: str
    detail: object | None = None


def scoring_refusal(
    teacher: Any, *, k: int, temperature: float, targets: str, samples: int,
) -> tuple[str, str] | None:
    """Why a teacher cannot answer with these options, and the ``serve`` flag that would allow it; or None.

    ``teacher`` is anything with ``k_max``, ``scoring`` and ``max_samples`` (``Info``, the server's
    own facts). The server refuses a request with the reason; the client, before a run, adds the flag.
    """
    if targets != "sampled" and k > teacher.k_max:
        return f"k={k} is over the server's k_max={teacher.k_max}", f"--k-max {k}"
    if teacher.scoring != "pooled" and (temperature != 1.0 or targets != "topk"):
        return (
            "temperature and sampled targets need the pooled scoring backend; the server scores through "
            "vLLM's prompt logprobs (top-k at temperature 1 only)", "--scoring pooled",
        )
    if targets != "topk" and samples > teacher.max_samples:
        return f"samples={samples} is over the server's max_samples={teacher.max_samples}", f"--max-samples {samples}"
    return None
