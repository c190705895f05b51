"""The ASGI app of `subllm serve` (Starlette): /v1/completions and /v1/chat/completions (JSON or
server-sent events), /v1/models, /tokenize, /detokenize, /version, /health, /metrics. Every error
is answered in OpenAI's format. The two generation routes differ only in how a body is parsed
(protocol.py, chat.py) and in the shape of what they answer (`TextShape`, `ChatShape`).

The handlers never touch the model: they read the body under its limits (body.py), parse and
tokenize it on a small thread pool (never on the event loop), hand one `Request` per prompt to the
batcher thread and relay its events, which arrive through `loop.call_soon_threadsafe`. A client
that disconnects - mid-stream, while waiting in the queue, or while waiting for a JSON answer -
cancels its requests: a waiting one leaves the queue at once, a running one leaves the batch
before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from subllm.serve.access import APIKeyMiddleware
from subllm.serve.batcher import Batcher
from subllm.serve.body import decode_json, read_body
from subllm.serve.chat import ChatShape, parse_chat
from subllm.serve.metrics import ServeMetrics
from subllm.serve.protocol import (
    APIError,
    TextShape,
    add_usage,
    error_body,
    models_body,
    parse_completion,
)
from subllm.serve.request import QueueFull, Request, Unavailable
from subllm.serve.tokens import detokenize, tokenize

RETRY_AFTER_S = {429: "1", 503: "5"}


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server before the batcher sees it."""

    max_body_bytes: int = 4 * 2**20  # --max-body-bytes: larger bodies get 413, unread
    body_timeout: float = 30.0  # seconds for the whole body to arrive (408)
    tokenizer_threads: int = 2  # JSON parsing and tokenization, off the event loop


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S[e.status]} if e.status in RETRY_AFTER_S else {}
    if e.status in (408, 413):  # the body was not read to its end: this connection cannot go on
        headers["Connection"] = "close"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def build_app(
    batcher: Batcher,
    model_name: str,
    metrics: ServeMetrics | None = None,
    limits: Limits | None = None,
    api_key: str | None = None,
) -> Starlette:
    """The app; its lifespan starts the batcher thread and stops it (after uvicorn has let the
    in-flight responses finish). `api_key`: required as a Bearer token (access.py)."""
    cfg = batcher.model.config
    metrics = metrics or batcher.metrics or ServeMetrics(0, model_name)
    limits = limits or Limits()
    created = int(time.time())
    # parsing + tokenization; its threads start on first use
    pool = ThreadPoolExecutor(limits.tokenizer_threads, thread_name_prefix="subllm-tokenize")

    def generation_route(parse_body, shape):
        """POST handler: parse (off the event loop), queue one Request per prompt, answer."""

        def parse(raw: bytes):
            body = decode_json(raw)
            return parse_body(body, batcher.tokenizer, cfg.vocab_size, cfg.max_seq_len, model_name)

        async def handler(request: HTTPRequest) -> Response:
            return await generate(request, parse, shape)

        return handler

    async def generate(request: HTTPRequest, parse, shape) -> Response:
        try:
            raw = await read_body(request, limits.max_body_bytes, limits.body_timeout)
            loop = asyncio.get_running_loop()
            c = await loop.run_in_executor(pool, parse, raw)
            events: asyncio.Queue = asyncio.Queue()

            def sink(i: int):
                return lambda kind, p: loop.call_soon_threadsafe(events.put_nowait, (i, kind, p))

            pairs = enumerate(zip(c.prompts, c.texts))
            reqs = [Request(ids, c.settings, sink(i), text) for i, (ids, text) in pairs]
            try:
                batcher.submit(reqs)
            except QueueFull as e:
                raise APIError(429, str(e)) from None
            except Unavailable as e:
                raise APIError(503, str(e)) from None
        except APIError as e:
            metrics.add_rejected(e.status)
            return error_response(e)
        head = (f"{shape.prefix}-{uuid.uuid4().hex}", model_name, int(time.time()))  # id, model, created
        if c.stream:
            return StreamingResponse(
                _sse(batcher, reqs, events, shape, head, c.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(request, batcher, reqs, events, shape, head)

    def token_route(fn, *args):
        async def handler(request: HTTPRequest) -> Response:
            try:
                raw = await read_body(request, limits.max_body_bytes, limits.body_timeout)
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(
                    pool, lambda: fn(decode_json(raw), batcher.tokenizer, *args, model_name)
                )
            except APIError as e:
                metrics.add_rejected(e.status)
                return error_response(e)
            return JSONResponse(out)

        return handler

    async def version(request: HTTPRequest) -> Response:
        from subllm import __version__

        return JSONResponse({"version": __version__})

    async def models(request: HTTPRequest) -> Response:
        return JSONResponse(models_body(model_name, cfg.max_seq_len, created))

    async def health(request: HTTPRequest) -> Response:
        if not batcher.alive or batcher.draining:
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(
            {
                "status": "ok",
                "running": len(batcher.running),
                "prefilling": len(batcher.prefilling),
                "waiting": len(batcher.waiting),
                "prefix_cache": None if batcher.prefix_store is None else batcher.prefix_store.stats(),
            }  # fmt: skip
        )

    async def prometheus(request: HTTPRequest) -> Response:
        prefix = None if batcher.prefix_store is None else batcher.prefix_store.stats()
        return PlainTextResponse(
            metrics.render(queue_depth=len(batcher.waiting), prefix=prefix),
            media_type="text/plain; version=0.0.4",
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
        pool.shutdown(wait=False, cancel_futures=True)

    return Starlette(
        routes=[
            Route("/v1/completions", generation_route(parse_completion, TextShape()), methods=["POST"]),
            Route("/v1/chat/completions", generation_route(parse_chat, ChatShape()), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/tokenize", token_route(tokenize, cfg.max_seq_len), methods=["POST"]),
            Route("/detokenize", token_route(detokenize, cfg.vocab_size), methods=["POST"]),
            Route("/version", version, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
        middleware=[Middleware(APIKeyMiddleware, key=api_key, metrics=metrics)] if api_key else [],
    )


def _event(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _cancel(batcher: Batcher, reqs: list[Request]) -> None:
    for r in reqs:
        if not r.done:
            batcher.cancel(r)


async def _sse(batcher: Batcher, reqs: list[Request], events: asyncio.Queue, shape, head: tuple,
               include_usage: bool):  # fmt: skip
    """Server-sent events: the shape's opening chunk per prompt (chat: the role), one chunk per
    text delta (`index` says which prompt), a chunk with each prompt's finish reason, the usage
    chunk when asked for (every other chunk then says "usage": null), then [DONE]; an error ends
    the stream with an error event and [DONE]. A disconnect cancels this generator: the requests
    leave the queue or the batch."""
    usage, left = None, len(reqs)
    try:
        for i in range(len(reqs)):
            first = shape.start(*head, i, include_usage)
            if first is not None:
                yield _event(first)
        while left:
            i, kind, payload = await events.get()
            if kind == "delta":
                yield _event(shape.delta(*head, i, payload, include_usage))
            elif kind == "done":
                yield _event(shape.end(*head, i, payload["finish_reason"], include_usage))
                usage, left = add_usage(usage, payload["usage"]), left - 1
            else:
                yield _event(APIError(payload["status"], payload["message"]).body())
                break
        else:
            if include_usage:
                yield _event(shape.usage(*head, usage))
        yield _event("[DONE]")
    finally:
        _cancel(batcher, reqs)


async def _collect(http: HTTPRequest, batcher: Batcher, reqs: list[Request], events: asyncio.Queue,
                   shape, head: tuple) -> Response:  # fmt: skip
    """The whole completion as one JSON body (one choice per prompt); a client that disconnects
    first cancels it; an error in any prompt answers the request with that error."""

    async def gather():
        texts: list[list[str]] = [[] for _ in reqs]
        final: list[dict] = [{} for _ in reqs]
        usage, left = None, len(reqs)
        while left:
            i, kind, payload = await events.get()
            if kind == "delta":
                texts[i].append(payload)
            elif kind == "done":
                final[i], usage, left = payload, add_usage(usage, payload["usage"]), left - 1
            else:
                raise APIError(payload["status"], payload["message"])
        return shape.body(*head, ["".join(t) for t in texts], final, usage)

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
        except APIError as e:
            return error_response(e)
    finally:
        for t in (result, gone):
            t.cancel()
        _cancel(batcher, reqs)
