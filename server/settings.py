"""Every server setting in one place, from flags or ``TEACHER_FARM_*`` environment variables."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from teacher_farm.schemas.scoring import DEFAULT_K_MAX, DEFAULT_MAX_SAMPLES, ScoringChoice


class ServerSettings(BaseSettings):
    """Limits and switches of the HTTP service (the engine's own arguments travel separately)."""

    model_config = SettingsConfigDict(env_prefix="TEACHER_FARM_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = 8000
    api_key: SecretStr | None = Field(None, description="bearer token required on all but /health")
    k_max: int = Field(DEFAULT_K_MAX, ge=1, le=4096, description="largest k a request may ask for")
    scoring: ScoringChoice = Field(
        "auto",
        description="pooled: the reduction inside the vLLM worker (where the architecture can be "
        "wrapped, which auto prefers); prompt-logprobs: vLLM's API (top-k at temperature 1 only)",
    )
    slice_rows: int | None = Field(
        None,
        ge=1,
        description="positions whose fp32 logits the worker holds at once (pooled; default 1024 on "
        "a GPU, 256 on a CPU): the peak is about slice_rows x vocabulary x 15 bytes",
    )
    max_samples: int = Field(
        DEFAULT_MAX_SAMPLES, ge=1, le=4096, description="largest 'samples' a request may ask for (pooled)"
    )
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="larger request bodies get 413")
    max_inputs_per_request: int = Field(1024, ge=1)
    max_tokens_per_request: int = Field(262_144, ge=1, description="after truncation; larger gets 413")
    max_queued_tokens: int = Field(
        2_097_152, ge=1, description="tokens admitted but not yet answered; beyond it new requests get 429"
    )
    max_answer_bytes: int = Field(
        8 * 2**30,
        ge=2**20,
        description="estimated memory of one request's answer (its arrays and their "
        "encoding); larger gets 413 saying how to stay under it (fewer inputs, smaller k or samples, Arrow)",
    )
    max_answer_bytes_in_flight: int = Field(
        16 * 2**30,
        ge=2**20,
        description="estimated answer memory of all requests admitted and not yet sent; "
        "beyond it new requests get 429 (with max_queued_tokens, what bounds the server's own memory)",
    )
    max_chat_turns: int = Field(1024, ge=1, description="messages in one chat record; more gets 413")
    max_connections: int = Field(
        512,
        ge=1,
        description="open connections (and requests) at once; beyond it new requests get 503",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection whose request line and headers are not in by then is closed",
    )
    body_timeout_s: float = Field(120.0, gt=0, description="a request body not all in by then gets 408")
    keep_alive_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 429 and 503")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vLLM AsyncEngineArgs")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: Any) -> Any:
        # An empty TEACHER_FARM_API_KEY would otherwise demand "Bearer " with nothing after it.
        return None if value == "" else value


_settings: ServerSettings | None = None


def configure(settings: ServerSettings) -> None:
    """Install the settings the process runs with (the ``serve`` command does this)."""
    global _settings
    _settings = settings


def get_settings() -> ServerSettings:
    """The process-wide settings (a FastAPI dependency that tests may override)."""
    global _settings
    if _settings is None:
        _settings = ServerSettings()
    return _settings
