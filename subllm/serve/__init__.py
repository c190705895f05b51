"""`subllm serve`: an OpenAI-compatible HTTP server with continuous batching on the SUBLLM KV cache.

    batcher.py   requests joining and leaving one running batch cache between decode steps
    protocol.py  the /v1/completions request checks and the OpenAI wire format (bodies, errors)
    metrics.py   counters and gauges, rendered as Prometheus text
    tokens.py    /tokenize and /detokenize
    logprobs.py  logprobs / echo in OpenAI's format (prompt tokens from a full forward)
    body.py      request bodies under limits: size (413), time (408), JSON depth, lone surrogates
    connections.py  the connection cap and header timeout (a uvicorn h11 protocol class)
    app.py       the ASGI app (Starlette): routes, SSE streaming, disconnects
    subllm/cli/serve.py  the `subllm serve` command (uvicorn, graceful SIGTERM)

The HTTP stack (starlette, uvicorn) is imported only by app.py, connections.py and the command.
"""
