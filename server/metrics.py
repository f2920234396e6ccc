"""Prometheus series of the service, all named ``teacher_farm_*``."""

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

TOKENS_SCORED = Counter("teacher_farm_tokens_scored", "Tokens whose top-k distribution was returned")
SEQUENCES_SCORED = Counter("teacher_farm_sequences_scored", "Input sequences scored")
REQUEST_LATENCY = Histogram(
    "teacher_farm_request_seconds",
    "Engine time of a /v1/topk request",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUED_TOKENS = Gauge("teacher_farm_queued_tokens", "Tokens admitted and not yet answered")
REQUESTS_IN_FLIGHT = Gauge(
    "teacher_farm_requests_in_flight",
    "Scoring requests admitted and not yet answered",
)
ANSWER_BYTES_IN_FLIGHT = Gauge(
    "teacher_farm_answer_bytes_in_flight",
    "Estimated bytes of the answers admitted and not yet sent",
)
REQUESTS_ABORTED = Counter(
    "teacher_farm_requests_aborted",
    "Scoring requests whose client disconnected (their engine work aborted)",
)
ENGINE_REQUESTS = Gauge(
    "teacher_farm_engine_requests",
    "Requests the vLLM engine holds unfinished (read at each scrape)",
)
# vLLM's own series (vllm:num_requests_running, ...) are off: the engine runs with disable_log_stats.
ENGINE_UP = Gauge(
    "teacher_farm_engine_up",
    "1 while the engine takes requests (GET /health answers 200); 0 while loading, draining or once dead",
)
ERRORS = Counter("teacher_farm_errors", "Requests answered with an error", ["kind"])


def exposition() -> tuple[bytes, str]:
    """The body and media type of ``/metrics``: our series and whatever else is registered (vLLM's)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
