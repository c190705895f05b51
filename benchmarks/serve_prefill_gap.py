"""The largest inter-token gap of a running stream while a long prompt is admitted (issue 21 item 6):
`subllm serve --prefill-chunk N` for each N given, one stream of greedy tokens running, then one
request with a long prompt; prints a table, then ONE JSON line.

    python benchmarks/serve_prefill_gap.py --checkpoint runs/real_smoke/subllm --chunks 0,512,128 \\
        --long-tokens 4096

Each server runs in its own process (`--threads 1`). The long prompt is token ids (100 + i % 5000),
so any vocabulary of 5,100+ ids takes it. Wall-clock numbers: they carry whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(
    checkpoint: str, chunk: int, long_tokens: int, stream_tokens: int, threads: int, prefill_dtype="same"
) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "subllm", "serve", "--checkpoint", checkpoint, "--port", str(port),
           "--threads", str(threads), "--prefill-chunk", str(chunk),
           "--prefill-dtype", prefill_dtype]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
            time.sleep(0.5)
        times: list[float] = []
        long: dict = {}

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": stream_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())

        def admit_long() -> None:
            while len(times) < 20:  # the stream runs
                time.sleep(0.01)
            long["sent"] = time.perf_counter()
            body = {"prompt": [100 + i % 5000 for i in range(long_tokens)], "max_tokens": 1}
            long["status"] = httpx.post(url + "/v1/completions", json=body, timeout=3600).status_code
            long["end"] = time.perf_counter()

        threads_ = [threading.Thread(target=stream), threading.Thread(target=admit_long)]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
    finally:
        proc.terminate()
        proc.wait(60)
    gaps = [b - a for a, b in zip(times, times[1:])]
    during = [b - a for a, b in zip(times, times[1:]) if b > long["sent"] and a < long["end"]]
    return {
        "prefill_chunk": chunk,
        "long_status": long["status"],
        "long_latency_s": round(long["end"] - long["sent"], 3),
        "median_gap_s": round(statistics.median(gaps), 4),
        "max_gap_during_long_s": round(max(during), 3),
        "stream_tokens_during_long": len(during),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--chunks", default="0,512,128", help="--prefill-chunk values (0: one pass)")
    p.add_argument("--long-tokens", type=int, default=4096)
    p.add_argument("--stream-tokens", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefill-dtype", default="same", help="servers' --prefill-dtype: same | auto | bf16")
    a = p.parse_args()
    rows = [
        measure(a.checkpoint, int(c), a.long_tokens, a.stream_tokens, a.threads, a.prefill_dtype)
        for c in a.chunks.split(",")
    ]
    print("| --prefill-chunk | long prompt latency (s) | median gap (s) | max gap while admitted (s) "
          "| tokens meanwhile |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prefill_chunk'] or 'off'} | {r['long_latency_s']:.2f} | {r['median_gap_s']:.3f} | "
              f"{r['max_gap_during_long_s']:.2f} | {r['stream_tokens_during_long']} |")  # fmt: skip
    out = {"checkpoint": a.checkpoint, "long_tokens": a.long_tokens, "prefill_dtype": a.prefill_dtype}
    print(json.dumps({**out, "rows": rows}))


if __name__ == "__main__":
    main()
