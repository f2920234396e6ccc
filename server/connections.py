"""Bounds on slow connections: what uvicorn leaves open.

uvicorn's keep-alive timer starts only after a first response, so a connection that sends nothing,
or half a request line, holds a file descriptor for ever; ``limit_concurrency`` alone then fills up
with them. ``HeaderTimeoutH11`` closes a connection whose next request's headers are not all in
within ``header_timeout_s`` of the connection (or of its last response). A body that trickles is
bounded by ``read_body``'s own deadline (``server/intake.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers are late."""

    header_timeout_s = 10.0
    _header_deadline: asyncio.TimerHandle | None  # set once armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        if not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(
                self.header_timeout_s, self._headers_late, self.cycle
            )

    def _disarm_header_deadline(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def _headers_late(self, cycle: Any) -> None:
        # The same cycle as when armed: no request's headers have come in since.
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def protocol(header_timeout_s: float) -> type[HeaderTimeoutH11]:
    """The protocol class uvicorn's ``http=`` takes, with this deadline."""
    return type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout_s": header_timeout_s})
