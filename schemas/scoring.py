"""What a cache asks of its teacher: one frozen type from the command's flags to the vLLM pooler.

``Scoring`` holds k, the temperature, the kind of targets, the draws per position and their seed,
with their defaults and limits. The client builds it from the flags (``teacher-farm cache``), the
online teacher from its arguments, ``verify`` from the cache's identity; it travels as the
``/v1/topk`` body's fields (``TopkRequest`` is a ``Scoring`` with inputs), and the server hands it
to the pooler through ``PoolingParams.extra_kwargs`` (``pooler_kwargs``/``from_pooler_kwargs``).
It knows whether a teacher can answer it (``refusal``) and the packed rows the worker's reduction
hands back for it (``layout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Targets = Literal["topk", "sampled", "both"]

#: The largest k a server answers by default (``serve --k-max``).
DEFAULT_K_MAX = 256
#: The most draws per position a server answers by default (``serve --max-samples``).
DEFAULT_MAX_SAMPLES = 256


class Scoring(BaseModel):
    """The scoring options of one request, one cache or one online run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(16, ge=1, description="how many most likely next tokens to return per position")
    temperature: float = Field(
        1.0, gt=0, le=1000, description="logprobs (and draws) are those of softmax(logits / temperature)"
    )
    targets: Targets = Field("topk", description="the top-k per position, tokens sampled from the teacher, or both")
    samples: int = Field(64, ge=1, le=4096, description="draws per position, with sampled targets")
    seed: int = Field(0, ge=0, lt=2**32, description="same seed and input, same draws")

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
        return PackedLayout(self.topk, self.draws)

    def scoring(self) -> Scoring:
        """Just the scoring options (of a ``TopkRequest``, say)."""
        return Scoring(**{name: getattr(self, name) for name in Scoring.model_fields})

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
                "vLLM's prompt logprobs (top-k at temperature 1 only)", "--scoring pooled",
            )
        if self.draws > teacher.max_samples:
            return (f"samples={self.samples} is over the server's max_samples={teacher.max_samples}",
                    f"--max-samples {self.samples}")
        return None

    def pooler_kwargs(self, draw_seed: int) -> dict[str, Any]:
        """What the pooler gets in ``PoolingParams.extra_kwargs``: these options and the request's draw seed."""
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
            return cls.model_construct(k=k_max, temperature=1.0, targets="both", samples=max_samples, seed=0)
        return cls.model_construct(k=k_max, temperature=1.0, targets="topk", samples=1, seed=0)


@dataclass(frozen=True)
class PackedLayout:
    """The int32 row the worker's reduction hands back per position (floats bit-cast, nothing rounded)::

        [ topk_ids (k) | topk_logprobs (k) | target_logprob | target_rank
          | sample_ids (N, ascending) | sample_logprobs (N) ]
    """

    k: int
    samples: int

    @property
    def width(self) -> int:
        return 2 * self.k + 2 + 2 * self.samples

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
        return slice(2 * self.k + 2 + self.samples, self.width)

    def columns_of(self, narrower: PackedLayout) -> list[int]:
        """Column indices that turn rows of this layout into rows of ``narrower`` (fewer k or draws)."""
        if narrower.k > self.k or narrower.samples > self.samples:
            raise ValueError(f"{narrower} is not narrower than {self}")
        cols = [*range(self.topk_ids.start, self.topk_ids.start + narrower.k),
                *range(self.topk_logprobs.start, self.topk_logprobs.start + narrower.k),
                self.target_logprob, self.target_rank]
        cols += [*range(self.sample_ids.start, self.sample_ids.start + narrower.samples),
                 *range(self.sample_logprobs.start, self.sample_logprobs.start + narrower.samples)]
        return cols
