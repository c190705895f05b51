"""`subllm serve`: an OpenAI-compatible HTTP server for a checkpoint folder, with continuous batching.

    subllm serve --checkpoint runs/demo/subllm --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "To be, or not", "max_tokens": 16, "temperature": 0}'

Endpoints: POST /v1/completions and /v1/chat/completions (stream=true for server-sent events; chat
needs a checkpoint with a chat template), POST /tokenize, /detokenize, GET /v1/models, /version,
/health, /metrics (Prometheus text). SIGTERM / Ctrl-C: the server keeps listening but answers new requests
503 + Retry-After; the requests already accepted finish (up to --shutdown-timeout seconds, then they
end with an error event / a JSON error), then the process exits 0 (subllm/serve/shutdown.py).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from pathlib import Path

import torch

from subllm.cli.generate import add_dtype_arguments
from subllm.errors import SubLLMError
from subllm.inference import int4_correction
from subllm.serve.prefill import DEFAULT_PREFILL_CHUNK
from subllm.serve.prefix_cache import DEFAULT_PREFIX_CACHE_MB

API_KEY_ENV = "SUBLLM_API_KEY"
FLUSH_TIMEOUT_S = 5.0  # after the drain: for the handlers to write their last events


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="folder with config.json, weights, tokenizer"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8000, help="port (0: any free port; the line printed says which)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        help="prompt tokens prefilled per decode step, so a long prompt does not stall running streams "
        f"(default {DEFAULT_PREFILL_CHUNK}; 0: each prompt in one pass)",
    )
    p.add_argument(
        "--prefill-batch",
        type=int,
        default=1,
        help="up to this many waiting one-pass prompts prefilled together (faster for short prompts "
        "on a CPU; outputs then equal a solo generate() only to float rounding; default 1: one at a time)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=DEFAULT_PREFIX_CACHE_MB,
        help="MiB of per-level K/V kept for prompt prefixes in blocks of --prefill-chunk tokens, so a "
        f"prompt starting with a cached prefix skips prefilling it (default {DEFAULT_PREFIX_CACHE_MB:g}; "
        "0: off; off with --prefill-chunk 0)",
    )
    add_dtype_arguments(p)
    p.add_argument("--model-name", default=None, help="the id in /v1/models (default: the folder name)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM: seconds the accepted requests get to finish (new ones get 503 meanwhile); "
        "then they end with an error (default 30)",
    )
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on the API routes (/health, /metrics, /version stay "
        "open); default: the environment variable SUBLLM_API_KEY, else no key",
    )
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="larger request bodies get 413 without being read (default 4 MiB)")  # fmt: skip
    g.add_argument("--max-connections", type=int, default=512,
                   help="open connections; one more gets 503 and is closed (default 512)")  # fmt: skip
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a whole request head (default 10)")  # fmt: skip
    g.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5)")  # fmt: skip
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body has to arrive, else 408 (default 30)")  # fmt: skip


def api_key(arg: str | None, environ) -> str | None:
    """--api-key, else $SUBLLM_API_KEY, else None (no key); an empty key is an error."""
    key = arg if arg is not None else environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise SubLLMError(f"the API key (--api-key or ${API_KEY_ENV}) is empty")
    return key


def load_server(
    checkpoint: Path,
    max_batch: int,
    max_queue: int,
    dtype: str,
    model_name: str | None,
    limits=None,
    api_key: str | None = None,
    notes=None,
    quantize: str = "none",
    *,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    prefix_cache_mb: float = 0,
    compile: bool = False,
    prefill_dtype: str = "same",
    kv_dtype: str = "same",
    prefill_batch: int = 1,
):
    """(batcher, app) for a checkpoint folder; the app's lifespan starts the batcher.
    `limits`: a subllm.serve.app.Limits (default: its defaults); `api_key`: see subllm/serve/access.py;
    `notes` (a list): receives the lines to print about the dtype choice (default: a calibration's
    messages go to stderr at once); `prefill_chunk`: prompt tokens per step (None: one pass;
    subllm/serve/prefill.py); `prefix_cache_mb`: the prefix store's budget (0: off;
    subllm/serve/prefix_cache.py); `compile`: decode through compiled graphs, compiled here for
    batch 1 and more (subllm/inference/compiled_decode.py); `prefill_dtype`: --prefill-dtype;
    `kv_dtype`: --kv-dtype (subllm/inference/engine.py set_kv_dtype); `prefill_batch`: --prefill-batch."""
    from subllm.data.tokenizer import load_tokenizer
    from subllm.model.subllm import SubLLM
    from subllm.serve.app import build_app
    from subllm.serve.batcher import Batcher
    from subllm.serve.metrics import ServeMetrics

    if not checkpoint.is_dir() or not (checkpoint / "config.json").is_file():
        raise SubLLMError(
            f"no checkpoint at {checkpoint} (expected a folder with config.json and model.safetensors)"
        )
    from subllm.inference import hugepages
    from subllm.inference.engine import set_kv_dtype
    from subllm.inference.quantize import apply_quantization

    model = set_kv_dtype(apply_quantization(SubLLM.from_pretrained(checkpoint).eval(), quantize), kv_dtype)
    hugepages.place(model)  # the weights each decode step streams, on huge pages
    tok = load_tokenizer(checkpoint)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    name = model_name or checkpoint.resolve().name
    metrics = ServeMetrics(len(model.subsamples), name)
    from subllm.dtype_calibration import choose_dtype

    # the first stderr line is the "listening on" banner (bench serve and scripts read it): the
    # calibration's messages wait in `notes` until after it
    log = notes.append if notes is not None else None
    choice = choose_dtype(dtype, model, "decode", "cpu", log=log)
    if notes is not None:
        notes.insert(0, f"subllm serve: dtype {choice.line}")
    if compile:
        from subllm.inference.compiled_decode import compile_and_warm

        dt = compile_and_warm(model, choice.dtype)
        if notes is not None:
            notes.append(f"subllm serve: decode step compiled in {dt:.0f} s")
    from subllm.cli.generate import resolve_prefill_dtype

    pre = resolve_prefill_dtype(prefill_dtype, model, choice.dtype, log=log)
    if pre and notes is not None:
        notes.append(f"subllm serve: prompts prefilled in {pre}, decode in {choice.dtype}")
    batcher = Batcher(
        model, tok, eos, max_batch, max_queue, choice.dtype, metrics, prefill_chunk=prefill_chunk,
        prefix_cache_mb=prefix_cache_mb, prefill_dtype=pre, prefill_batch=prefill_batch,
    )  # fmt: skip
    return batcher, build_app(batcher, name, metrics, limits, api_key)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - a dependency
        raise SubLLMError(f"subllm serve needs uvicorn and starlette: {e}") from None
    if args.threads is not None:
        if args.threads < 1:
            raise SubLLMError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if not 0 <= args.port < 65536:
        raise SubLLMError(f"--port must lie in [0, 65535], got {args.port}")
    from subllm.inference.quantize import describe
    from subllm.serve.app import Limits
    from subllm.serve.connections import limited_protocol
    from subllm.serve.shutdown import DrainingServer

    if args.prefill_chunk < 0:
        raise SubLLMError(
            f"--prefill-chunk must be >= 0 (0: each prompt in one pass), got {args.prefill_chunk}"
        )
    if args.prefill_batch < 1:
        raise SubLLMError(f"--prefill-batch must be >= 1 (1: one prompt at a time), got {args.prefill_batch}")
    if not args.prefix_cache_mb >= 0:
        raise SubLLMError(f"--prefix-cache-mb must be >= 0 (0: off), got {args.prefix_cache_mb}")
    if args.max_body_bytes < 1 or args.max_connections < 1:
        raise SubLLMError("--max-body-bytes and --max-connections must be >= 1")
    if min(args.header_timeout, args.keep_alive_timeout, args.body_timeout) <= 0:
        raise SubLLMError("--header-timeout, --keep-alive-timeout and --body-timeout must be > 0")
    limits = Limits(max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout)
    key = api_key(args.api_key, os.environ)
    notes: list[str] = []
    batcher, app = load_server(
        args.checkpoint,
        args.max_batch,
        args.max_queue,
        args.dtype,
        args.model_name,
        limits,
        key,
        notes,
        int4_correction.from_args(args),
        prefill_chunk=args.prefill_chunk or None,
        prefix_cache_mb=args.prefix_cache_mb,
        compile=args.compile,
        prefill_dtype=args.prefill_dtype,
        kv_dtype=args.kv_dtype,
        prefill_batch=args.prefill_batch,
    )
    # the model and tokenizer are ~376k objects the cyclic collector would walk on every full
    # collection - a 170 ms stall of every stream (SmolLM2, measured 2026-12-05): frozen, they are
    # skipped (refcounting still frees them)
    gc.freeze()
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise SubLLMError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    host, port = sock.getsockname()[:2]

    config = uvicorn.Config(
        app,
        http=limited_protocol(args.max_connections, args.header_timeout),
        timeout_keep_alive=args.keep_alive_timeout,
        lifespan="on",
        log_level=args.log_level,
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
    )
    print(
        f"subllm serve: {batcher.model.config.structure} from {args.checkpoint}, "
        f"{batcher.dtype}{'' if args.quantize == 'none' else ', ' + describe(batcher.model)}"
        f"{', compiled decode' if args.compile else ''}{', bf16 K/V' if args.kv_dtype == 'bf16' else ''}, "
        f"max batch {args.max_batch}, prefill chunk {args.prefill_chunk or 'off'}, "
        f"{f'prefill batch {batcher.prefilling.together}, ' if batcher.prefilling.together > 1 else ''}"
        f"prefix cache {f'{args.prefix_cache_mb:g} MiB' if batcher.prefix_store else 'off'}"
        f"{', API key required' if key else ''}; listening on http://{host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    for line in notes:
        print(line, file=sys.stderr, flush=True)
    DrainingServer(config, batcher, args.shutdown_timeout).run(sockets=[sock])
    print("subllm serve: stopped", file=sys.stderr, flush=True)
    return 0
