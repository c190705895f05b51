"""Connection limits of `subllm serve`: a cap on open connections and a header timeout, as a
uvicorn h11 protocol class (uvicorn itself has neither; its keep-alive timeout restarts with every
byte, so a client that trickles a header keeps its connection forever).

- `max_connections`: a connection past the cap gets one 503 with Retry-After and is closed at
  once, so half-open connections can never exhaust the process's file descriptors.
- `header_timeout`: a connection must deliver a whole request head (request line and headers)
  within this many seconds of opening, and again of each response finishing; otherwise it is
  closed (nothing is logged per connection). Bodies have their own limit (body.py).
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
BODY = (
    b'{"error": {"message": "too many open connections (--max-connections); retry later", '
    b'"type": "service_unavailable", "param": null, "code": null}}'
)


def limited_protocol(max_connections: int, header_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class with these limits, for `uvicorn.Config(http=...)`."""

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(REFUSED % (len(BODY), BODY))
                transport.close()
                return
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _header_timed_out(self) -> None:
            # still no complete request head since the timer was armed: give the slot back
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return LimitedH11Protocol
