"""Connection limits uvicorn lacks: a cap on open connections and a deadline for each request's headers.

uvicorn closes an idle keep-alive connection only after a response, and any data (one byte of headers) stops that
timer: a client that opens sockets and sends nothing, or sends its headers a byte at a time, holds them forever,
until the process runs out of file descriptors and normal requests time out.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(max_connections: int, header_seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol closing connections over `max_connections` at once, and any connection whose next
    request's headers are not complete `header_seconds` after it opened or after its last response."""

    class GuardedH11Protocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()  # the descriptor is freed now, not when the client gives up
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(header_seconds, self._expire)

        def _expire(self) -> None:
            # IDLE: no complete request line and headers yet (h11 leaves it once it has parsed them).
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
