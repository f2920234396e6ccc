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
        "auto", description="pooled: the reduction inside the vLLM worker (where the architecture can be "
        "wrapped, which auto prefers); prompt-logprobs: vLLM's API (top-k at temperature 1 only)",
    )
    slice_rows: int | None = Field(
        None, ge=1, description="positions whose fp32 logits the worker holds at once (pooled; default 1024 on "
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
