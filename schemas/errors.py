"""The one exception hierarchy of teacher-farm.

    TeacherFarmError
    ├── InputError            a request or input line is invalid (never retried)
    │   ├── MalformedBody     the body is not JSON at all
    │   └── RequestTooLarge   over a size or token limit
    ├── AuthError             missing or wrong API key
    ├── RequestTimeout        the request's body did not arrive in time (a stalled connection)
    ├── ClientGone            the client closed its connection before the answer: its work was aborted
    ├── ServerBusy            the server's queue is full (retry after ``retry_after`` s)
    ├── EngineNotReady        the engine is still loading (retry)
    │   └── EngineDead        the engine died; the server exits for its supervisor to restart it
    ├── TransportError        a server could not be reached or answered 5xx (retry)
    │   └── ServerUnreachable nothing listens at the URL: connection refused (retry, briefly at start)
    ├── ServerRejected        the server answered 4xx: the inputs it names are bad
    ├── CacheMismatch         a resumed output directory was made with other settings
    ├── OutputLocked          another process writes into the same output directory (and part)
    ├── OutputWriteError      the output cannot be written (a full disk, a read-only directory)
    ├── SelfTestFailed        the pooled backend does not work on the installed vLLM
    └── TeacherBuildError     a pretrained teacher could not be fetched or built (make-smollm2)

``ServerBusy``, ``EngineNotReady`` (with ``EngineDead``) and ``TransportError`` (with
``ServerUnreachable``) derive from ``RetryableError`` too: only they are retried. A 503 answer
names ``EngineDead`` in its body's ``kind``, so that a client tells a dead engine (try another server)
from one still loading (wait).
"""

from __future__ import annotations


class TeacherFarmError(Exception):
    """Base class of every error teacher-farm raises on purpose."""


class InputError(TeacherFarmError):
    """A request or an input line is malformed; the message says what to fix."""


class MalformedBody(InputError):
    """A request body that is not valid JSON."""


class RequestTooLarge(InputError):
    """A request exceeds the body size, input count or token limits."""


class AuthError(TeacherFarmError):
    """The API key is missing or wrong."""


class RequestTimeout(TeacherFarmError):
    """The request's body did not arrive within the server's time limit (408: it may be sent again)."""


class ClientGone(TeacherFarmError):
    """The client closed its connection while its request was scored: the engine's work for it was aborted."""


class RetryableError(TeacherFarmError):
    """A transient failure: the same request may succeed later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusy(RetryableError):
    """The server's queue is full."""


class EngineNotReady(RetryableError):
    """The engine is still loading."""


class EngineDead(EngineNotReady):
    """The engine died: this server answers nothing more until a supervisor restarts it (loading again)."""


class TransportError(RetryableError):
    """Connection refused or reset, timeout, or a 5xx answer."""


class ServerUnreachable(TransportError):
    """The connection was refused: no server (yet) at that address."""


class ServerRejected(TeacherFarmError):
    """The server refused a request as bad (4xx other than 401/429)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CacheMismatch(TeacherFarmError):
    """An existing output directory was made with a different model, tokenizer, k or option."""


class SelfTestFailed(TeacherFarmError):
    """The pooled backend failed its start-up check on the installed vLLM: its modules do not load, or
    its pooler, driven through vLLM's own pooling structures, does not give ``reduce_rows``'s rows."""


class OutputLocked(TeacherFarmError):
    """Another process is writing into the same output directory (and part of a split corpus)."""


class OutputWriteError(TeacherFarmError):
    """The output could not be written (a full disk, a read-only directory): the run stops cleanly."""


class TeacherBuildError(TeacherFarmError):
    """A pretrained teacher could not be fetched from the package registry, or its build failed its check."""
