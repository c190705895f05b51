"""The ASGI app of `subllm serve` (Starlette): /v1/completions (JSON or server-sent events),
/v1/models, /health, /metrics. Every error is answered in OpenAI's format.

The handlers never touch the model: they check the request (protocol.py), hand a `Request` to the
batcher thread and relay its events, which arrive through `loop.call_soon_threadsafe`. A client
that disconnects - mid-stream or while waiting for a JSON answer - cancels its request, and the
batcher drops its row before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from subllm.serve.batcher import Batcher, QueueFull, Request, Unavailable
from subllm.serve.metrics import ServeMetrics
from subllm.serve.protocol import (
    APIError,
    completion_body,
    error_body,
    models_body,
    parse_completion,
    usage_chunk,
)

RETRY_AFTER_S = {429: "1", 503: "5"}


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S[e.status]} if e.status in RETRY_AFTER_S else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def build_app(batcher: Batcher, model_name: str, metrics: ServeMetrics | None = None) -> Starlette:
    """The app; its lifespan starts the batcher thread and stops it (after uvicorn has let the
    in-flight responses finish)."""
    cfg = batcher.model.config
    metrics = metrics or batcher.metrics or ServeMetrics(0, model_name)
    created = int(time.time())

    async def completions(request: HTTPRequest) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON ({e})") from None
            c = parse_completion(body, batcher.tokenizer, cfg.vocab_size, cfg.max_seq_len, model_name)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            req = Request(
                c.prompt, c.settings, lambda kind, p: loop.call_soon_threadsafe(events.put_nowait, (kind, p))
            )
            try:
                batcher.submit(req)
            except QueueFull as e:
                raise APIError(429, str(e)) from None
            except Unavailable as e:
                raise APIError(503, str(e)) from None
        except APIError as e:
            metrics.add_rejected(e.status)
            return error_response(e)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if c.stream:
            return StreamingResponse(
                _sse(req, events, cid, model_name, c.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(request, req, events, cid, model_name)

    async def models(request: HTTPRequest) -> Response:
        return JSONResponse(models_body(model_name, cfg.max_seq_len, created))

    async def health(request: HTTPRequest) -> Response:
        if not batcher.alive or batcher.draining:
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(
            {"status": "ok", "running": len(batcher.running), "waiting": len(batcher.waiting)}
        )

    async def prometheus(request: HTTPRequest) -> Response:
        return PlainTextResponse(
            metrics.render(queue_depth=len(batcher.waiting)), media_type="text/plain; version=0.0.4"
        )

    async def http_error(request: HTTPRequest, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(f"{exc.detail}: {request.method} {request.url.path}", kind), exc.status_code
        )

    async def server_error(request: HTTPRequest, exc: Exception) -> Response:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not batcher.alive:
            batcher.start()
        yield
        batcher.drain()
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


def _event(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _sse(req: Request, events: asyncio.Queue, cid: str, model: str, include_usage: bool):
    """Server-sent events: one chunk per text delta, a last chunk with the finish reason, the usage
    chunk when asked for, then [DONE]. A disconnect cancels this generator: the row is dropped."""
    try:
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                yield _event(completion_body(cid, model, payload, None, None))
            elif kind == "done":
                yield _event(completion_body(cid, model, "", payload["finish_reason"], None))
                if include_usage:
                    yield _event(usage_chunk(cid, model, payload["usage"]))
                break
            else:
                yield _event(error_body(payload, "server_error"))
                break
        yield _event("[DONE]")
    finally:
        if not req.done:
            req.cancel()


async def _collect(http: HTTPRequest, req: Request, events: asyncio.Queue, cid: str, model: str) -> Response:
    """The whole completion as one JSON body; a client that disconnects first cancels it."""

    async def gather():
        parts = []
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                parts.append(payload)
            elif kind == "done":
                return completion_body(cid, model, "".join(parts), payload["finish_reason"], payload["usage"])
            else:
                raise RuntimeError(payload)

    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass

    result, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        try:
            return JSONResponse(result.result())
        except RuntimeError as e:
            return JSONResponse(error_body(str(e), "server_error"), 500)
    finally:
        for t in (result, gone):
            t.cancel()
        if not req.done:
            req.cancel()
