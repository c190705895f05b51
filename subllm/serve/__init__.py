"""`subllm serve`: an OpenAI-compatible HTTP server with continuous batching on the SUBLLM KV cache.

    batcher.py   requests joining and leaving one running batch cache between decode steps
    protocol.py  the /v1/completions request checks and the OpenAI wire format (bodies, errors)
    metrics.py   counters and gauges, rendered as Prometheus text
    app.py       the ASGI app (Starlette): routes, SSE streaming, disconnects
    cli.py       the `subllm serve` command (uvicorn, graceful SIGTERM)

The HTTP stack (starlette, uvicorn) is imported only by app.py and cli.py.
"""
