"""What a cache asks of its teacher: one frozen type from the command's flags to the vLLM pooler.

``Scoring`` holds k, the temperature, the kind of targets, the draws per position and their seed,
with their defaults and limits. The client builds it from the flags (``teacher-farm cache``), the
online teacher from its arguments, ``verify`` from the cache's identity; it travels as the
``/v1/topk`` body's fields (a ``TopkRequest`` holds one beside its inputs), and the server hands it
to the pooler through ``PoolingParams.extra_kwargs`` (``pooler_kwargs``/``from_pooler_kwargs``).
It knows whether a teacher can answer it (``refusal``) and the packed rows the worker's reduction
hands back for it (``layout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

Targets = Literal["topk", "sampled", "both"]

#: The largest k a server answers by default (``serve --k-max``).
DEFAULT_K_MAX = 256
#: The most draws per position a server answers by default (``serve --max-samples``).
DEFAULT_MAX_SAMPLES = 256
#: The lowest temperature: logits / T must stay finite in fp32 (a T like 1e-40 turns them into inf, then NaN).
MIN_TEMPERATURE = 0.01
#: The highest temperature.
MAX_TEMPERATURE = 1000.0

#: How a teacher scores (``Info.scoring``): "pooled" reduces the logits inside the vLLM worker (any k up
#: to k_max, temperature, sampled targets); "prompt-logprobs" is vLLM's API (top-k at temperature 1 only).
ScoringBackend = Literal["pooled", "prompt-logprobs"]
#: What ``--scoring`` asks for: a backend, or "auto" (pooled where the architecture can be wrapped).
ScoringChoice = Literal["auto", ScoringBackend]
SCORING_CHOICES: tuple[str, ...] = get_args(ScoringChoice)


class Scoring(BaseModel):
    """The scoring options of one request, one cache or one online run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(default=16, ge=1, description="how many most likely next tokens to return per position")
    temperature: float = Field(
        default=1.0,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="logprobs (and draws) are those of softmax(logits / temperature)",
    )
    targets: Targets = Field(
        default="topk", description="the top-k per position, tokens sampled from the teacher, or both"
    )
    samples: int = Field(default=64, ge=1, le=4096, description="draws per position, with sampled targets")
    seed: int = Field(default=0, ge=0, lt=2**32, description="same seed and input, same draws")
    positions: str = Field(
        default="all",
        description="where targets are kept: all positions, 'entropy:F' (the share F of each sequence's "
        "positions where the teacher's entropy is highest) or 'assistant' (inside a chat's assistant turns)",
    )

    @field_validator("positions")
    @classmethod
    def _positions_rule(cls, value: str) -> str:
        if value in ("all", "assistant"):
            return value
        kind, _, share = value.partition(":")
        try:
            ok = kind == "entropy" and 0 < float(share) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("positions must be 'all', 'assistant' or 'entropy:F' with 0 < F <= 1")
        return f"entropy:{float(share):g}"

    @property
    def entropy_share(self) -> float | None:
        """F of an ``entropy:F`` rule, else None."""
        return float(self.positions.partition(":")[2]) if self.positions.startswith("entropy:") else None

    @property
    def topk(self) -> int:
        """Top-k entries each position carries (0 with sampled targets only)."""
        return 0 if self.targets == "sampled" else self.k

    @property
    def draws(self) -> int:
        """Draws each position carries (0 with top-k targets only)."""
        return 0 if self.targets == "topk" else self.samples

    @property
    def layout(self) -> PackedLayout:
        return PackedLayout(self.topk, self.draws, entropy=self.entropy_share is not None)

    def refusal(self, teacher: Any) -> tuple[str, str] | None:
        """Why ``teacher`` cannot answer this, and the ``serve`` flag that would allow it; or None.

        ``teacher`` is anything with ``k_max``, ``scoring`` and ``max_samples`` (the ``Info`` of
        ``/v1/info``). The server refuses a request with the reason; the client, before a run, adds the flag.
        """
        if self.topk > teacher.k_max:
            return f"k={self.k} is over the server's k_max={teacher.k_max}", f"--k-max {self.k}"
        if teacher.scoring != "pooled" and (self.temperature != 1.0 or self.targets != "topk"):
            return (
                "temperature and sampled targets need the pooled scoring backend; the server scores through "
                "vLLM's prompt logprobs (top-k at temperature 1 only)",
                "--scoring pooled",
            )
        if self.entropy_share is not None and teacher.scoring != "pooled":
            return (
                "positions by entropy need the pooled scoring backend (the entropy is computed beside the "
                "reduction, in the vLLM worker)",
                "--scoring pooled",
            )
        if self.draws > teacher.max_samples:
            return (
                f"samples={self.samples} is over the server's max_samples={teacher.max_samples}",
                f"--max-samples {self.samples}",
            )
        return None

    def wire_fields(self) -> dict[str, Any]:
        """The ``/v1/topk`` body's scoring fields (``positions`` only where it is not the default, for older
        servers)."""
        fields = self.model_dump()
        if fields["positions"] == "all":
            del fields["positions"]
        return fields

    def pooler_kwargs(self, draw_seed: int) -> dict[str, Any]:
        """What the pooler gets in ``PoolingParams.extra_kwargs``: these options and the request's draw
        seed."""
        return {**self.model_dump(), "draw_seed": draw_seed}

    @classmethod
    def from_pooler_kwargs(cls, kwargs: dict[str, Any]) -> tuple[Scoring, int]:
        """The options and the draw seed back, in the worker (no validation: the server checked them)."""
        fields = {name: kwargs[name] for name in cls.model_fields}
        return cls.model_construct(**fields), int(kwargs["draw_seed"])

    @classmethod
    def worst_case(cls, k_max: int, max_samples: int) -> Scoring:
        """The largest request a server answers: what vLLM's start-up profiling should run with."""
        if max_samples:
            return cls.model_construct(
                k=k_max, temperature=1.0, targets="both", samples=max_samples, seed=0, positions="entropy:1"
            )
        return cls.model_construct(
            k=k_max, temperature=1.0, targets="topk", samples=1, seed=0, positions="entropy:1"
        )


@dataclass(frozen=True)
class PackedLayout:
    """The int32 row the worker's reduction hands back per position (floats bit-cast, nothing rounded)::

    [ topk_ids (k) | topk_logprobs (k) | target_logprob | target_rank
      | sample_ids (N, ascending) | sample_logprobs (N) | entropy (with an entropy rule) ]
    """

    k: int
    samples: int
    entropy: bool = False

    @property
    def width(self) -> int:
        return 2 * self.k + 2 + 2 * self.samples + int(self.entropy)

    @property
    def topk_ids(self) -> slice:
        return slice(0, self.k)

    @property
    def topk_logprobs(self) -> slice:
        return slice(self.k, 2 * self.k)

    @property
    def target_logprob(self) -> int:
        return 2 * self.k

    @property
    def target_rank(self) -> int:
        return 2 * self.k + 1

    @property
    def sample_ids(self) -> slice:
        return slice(2 * self.k + 2, 2 * self.k + 2 + self.samples)

    @property
    def sample_logprobs(self) -> slice:
        return slice(2 * self.k + 2 + self.samples, 2 * self.k + 2 + 2 * self.samples)

    @property
    def entropy_column(self) -> int:
        """The column of the position's entropy (in nats, at the request's temperature); only with
        ``entropy``."""
        return 2 * self.k + 2 + 2 * self.samples

    def columns_of(self, narrower: PackedLayout) -> list[int]:
        """Column indices that turn rows of this layout into rows of ``narrower`` (fewer k or draws)."""
        if narrower.k > self.k or narrower.samples > self.samples or (narrower.entropy and not self.entropy):
            raise ValueError(f"{narrower} is not narrower than {self}")
        cols = [
            *range(self.topk_ids.start, self.topk_ids.start + narrower.k),
            *range(self.topk_logprobs.start, self.topk_logprobs.start + narrower.k),
            self.target_logprob,
            self.target_rank,
        ]
        cols += [
            *range(self.sample_ids.start, self.sample_ids.start + narrower.samples),
            *range(self.sample_logprobs.start, self.sample_logprobs.start + narrower.samples),
        ]
        return cols + ([self.entropy_column] if narrower.entropy else [])
