"""Prometheus series of the service, all named ``teacher_farm_*``."""

from prometheus_client import Counter, Gauge, Histogram, make_asgi_app

TOKENS_SCORED = Counter("teacher_farm_tokens_scored", "Tokens whose top-k distribution was returned")
SEQUENCES_SCORED = Counter("teacher_farm_sequences_scored", "Input sequences scored")
REQUEST_LATENCY = Histogram(
    "teacher_farm_request_seconds", "Engine time of a /v1/topk request",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUED_TOKENS = Gauge("teacher_farm_queued_tokens", "Tokens admitted and not yet answered")
ERRORS = Counter("teacher_farm_errors", "Requests answered with an error", ["kind"])


def asgi_app():
    """The ``/metrics`` endpoint."""
    return make_asgi_app()
