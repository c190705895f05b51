"""`subllm serve` shutdown (issue 21 item 3): on SIGTERM the server keeps accepting connections and
answers new requests 503 + Retry-After while the accepted ones finish; past --shutdown-timeout
they end with an error event and [DONE] (streams) or a 503 JSON error; the process exits 0."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, tiny_checkpoint

from subllm.cli.serve import load_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_shutdown") / "tiny"
    tiny_checkpoint(path)
    return path


def slow_server(ckpt, drain_timeout: float):
    """A live server whose decode steps take >= 5 ms (so a 300-token stream outlives the checks)."""
    batcher, app = load_server(ckpt, 4, 8, "fp32", "tiny")
    step = batcher.step
    batcher.step = lambda admit=None: (time.sleep(0.005), step(admit))
    return batcher, LiveServer(app, batcher=batcher, drain_timeout=drain_timeout)


LONG = {"prompt": [5, 6], "ignore_eos": True, "temperature": 0}


def sse_data(lines) -> list[str]:
    return [x[6:] for x in lines if x.startswith("data: ")]


@contextlib.contextmanager
def sigterm_with_two_running(ckpt, drain_timeout: float, stream_tokens: int, json_tokens: int):
    """A slow server running a streamed and a JSON request when SIGTERM arrives: yields (batcher,
    server, the stream's remaining lines, the JSON request's response list, its thread)."""
    batcher, s = slow_server(ckpt, drain_timeout)
    with s, httpx.Client(timeout=60) as client:
        got = []
        body = {**LONG, "max_tokens": json_tokens}
        j = threading.Thread(target=lambda: got.append(client.post(s.url + "/v1/completions", json=body)))
        stream = {**LONG, "max_tokens": stream_tokens, "stream": True}
        with client.stream("POST", s.url + "/v1/completions", json=stream) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            j.start()
            while len(batcher.running) < 2:
                time.sleep(0.01)
            s.server.handle_exit(signal.SIGTERM, None)  # what the signal calls
            yield batcher, s, lines, got, j


def test_drain_503s_new_requests_and_lets_accepted_ones_finish(ckpt):
    with sigterm_with_two_running(ckpt, 60, 300, 40) as (batcher, s, lines, got, j):
        # still listening: new requests and probes get 503 + Retry-After, in OpenAI's format
        new = httpx.post(s.url + "/v1/completions", json={**LONG, "max_tokens": 2})
        assert new.status_code == 503 and new.headers["Retry-After"] == "5"
        assert new.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(s.url + "/health").status_code == 503
        assert batcher.running  # the accepted requests still run
        rest = sse_data(lines)
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        words = sum(len(json.loads(x)["choices"][0]["text"].split()) for x in rest[:-1])
        assert words >= 290  # the whole text
        j.join(60)
        assert got[0].status_code == 200 and got[0].json()["usage"]["completion_tokens"] == 40
        s.thread.join(30)  # then the server stops by itself
        assert not s.thread.is_alive() and not batcher.alive


def test_past_the_shutdown_timeout_requests_end_with_an_error(ckpt):
    with sigterm_with_two_running(ckpt, 0.3, 400, 400) as (batcher, s, lines, got, j):
        rest = sse_data(lines)
        assert rest[-1] == "[DONE]"  # a clean end of the stream: an error event, then [DONE]
        err = json.loads(rest[-2])["error"]
        assert err["type"] == "service_unavailable" and "--shutdown-timeout" in err["message"]
        j.join(60)
        assert got[0].status_code == 503 and got[0].headers["content-type"] == "application/json"
        assert "--shutdown-timeout" in got[0].json()["error"]["message"]
        s.thread.join(30)
        assert not s.thread.is_alive() and not batcher.alive
    assert batcher.cache is None and not batcher.running and batcher.metrics.requests["error"] == 2


def test_sigterm_lets_the_stream_finish_then_exits_0(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "subllm", "serve", "--checkpoint", str(ckpt), "--port", "0",
           "--dtype", "fp32", "--threads", "1", "--model-name", "tiny"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "listening on http://" in line, line
        url = line.rsplit(" ", 1)[1].strip()
        body = {**LONG, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = sse_data(lines)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
