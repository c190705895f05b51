"""Graceful shutdown of `subllm serve` (SIGTERM or Ctrl-C), as a uvicorn `Server` subclass.

On the first signal the server keeps listening and the batcher drains: new requests get 503 with
Retry-After (so do /health probes, which takes the server out of a load balancer), while requests
already accepted run on. When none is left - or after `shutdown_timeout` seconds, when every
request still waiting or running is ended with an error (an error event and [DONE] in a stream, a
503 JSON error otherwise) - uvicorn shuts down, giving the handlers `flush_timeout` seconds to
write those last bytes, and the process exits 0. A second signal ends the drain at once.
"""

from __future__ import annotations

import signal
import time

import uvicorn

CUT = "the server is shutting down and this request did not finish within --shutdown-timeout"


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, batcher, shutdown_timeout: float):
        super().__init__(config)
        self.batcher, self.shutdown_timeout = batcher, shutdown_timeout
        self.deadline: float | None = None  # set by the first signal
        self.cut = False

    def handle_exit(self, sig, frame) -> None:  # never recorded for re-raising: the exit code stays 0
        if self.deadline is None:
            self.batcher.drain()
            self.deadline = time.monotonic() + self.shutdown_timeout
        else:  # a second signal: cut the drain short (a third SIGINT: uvicorn's forced exit)
            if self.deadline <= time.monotonic() and sig == signal.SIGINT:
                self.force_exit = True
            self.deadline = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self.deadline is not None and not self.should_exit:
            if not self.batcher.busy:
                self.should_exit = True
            elif time.monotonic() >= self.deadline and not self.cut:
                self.cut = True
                self.batcher.abort(CUT, 503)
        return await super().on_tick(counter)
