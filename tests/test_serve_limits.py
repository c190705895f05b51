"""`subllm serve` isolation and limits (issue 21 item 1): one poisoned request among running rows
fails alone (the others equal their solo `generate()`), a tiny temperature is greedy, abandoned
waiting requests leave the queue, a body over --max-body-bytes is refused with 413 before it is
read (Content-Length and chunked), tokenization runs off the event loop, and the connection cap
and header timeout hold."""

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import EOS, LiveServer, prompts, solo, tiny_checkpoint

import subllm.serve.batcher as batcher_mod
from subllm.cli.serve import load_server
from subllm.serve.app import Limits
from subllm.serve.batcher import Batcher
from subllm.serve.request import Request, Settings


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_limits") / "tiny"
    model, tok = tiny_checkpoint(path)
    return path, model, tok


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


# ---- isolation --------------------------------------------------------------------------------
CASES = [  # (generate() keyword arguments, ignore_eos)
    (dict(temperature=0.0), True),
    (dict(temperature=1.0, seed=11), True),
    (dict(temperature=0.8, top_k=20, top_p=0.9, seed=3), True),
    (dict(temperature=0.0, repetition_penalty=1.3), True),
]


@torch.no_grad()
def test_poisoned_rows_fail_alone(ckpt, monkeypatch):
    """Three poisons among four healthy rows: settings that give no distribution (the issue's
    repetition_penalty=1e-308, set past the protocol's checks), a sampler that raises at the
    row's 4th token, and a decode step that raises (after writing to the cache) whenever the row
    at fault is in it. The healthy rows equal solo generate(); every poison gets an error event."""
    _, model, tok = ckpt
    b = Batcher(model, tok, EOS, max_batch=8, max_queue=8)
    events: dict[int, list] = {}

    def make(i, p, settings):
        return Request(p, settings, lambda kind, x, i=i: events.setdefault(i, []).append((kind, x)))

    ps = prompts(7, seed=21)
    healthy = [make(i, ps[i], Settings(max_tokens=12, ignore_eos=True, **CASES[i][0])) for i in range(4)]
    bad_penalty = make(4, ps[4], Settings(max_tokens=12, temperature=1.0, repetition_penalty=1e-308, seed=1))
    bad_sampler = make(5, ps[5], Settings(max_tokens=12, temperature=1.0, seed=2, ignore_eos=True))
    bad_decode = make(6, ps[6], Settings(max_tokens=12, temperature=0.0, ignore_eos=True))

    real_next, real_decode = batcher_mod.next_tokens, batcher_mod.decode_step

    def next_tokens(scores, temperature, top_k, top_p, gen):
        if gen is bad_sampler.gen and len(bad_sampler.tokens) >= 3:
            raise RuntimeError("poisoned sampler")
        return real_next(scores, temperature, top_k, top_p, gen)

    def decode_step(model_, cache, tokens, rows=None):
        rows = list(range(cache.batch_size)) if rows is None else rows
        out = real_decode(model_, cache, tokens, rows)  # the cache is written before the failure
        if any(b.running[r] is bad_decode for r in rows) and len(bad_decode.tokens) >= 5:
            raise RuntimeError("poisoned decode")
        return out

    monkeypatch.setattr(batcher_mod, "next_tokens", next_tokens)
    monkeypatch.setattr(batcher_mod, "decode_step", decode_step)
    b.submit([healthy[0], healthy[1], bad_sampler, bad_decode])
    b.step(b._pop_admissible())
    b.step()
    b.submit([bad_penalty, healthy[2], healthy[3]])  # join running rows
    for _ in range(30):
        b.step(b._pop_admissible())
    assert not b.running and b.cache is None and not b.waiting
    for i in (4, 5, 6):
        kind, payload = events[i][-1]
        assert kind == "error" and payload["status"] == 500, (kind, payload)
    assert "poisoned sampler" in events[5][-1][1]["message"]
    assert "poisoned decode" in events[6][-1][1]["message"]
    assert len(bad_decode.tokens) == 5 and len(bad_sampler.tokens) == 3
    for i in range(len(healthy)):
        text = "".join(x for k, x in events[i] if k == "delta")
        want, n = solo(model, tok, ps[i], 12, ignore_eos=True, **CASES[i][0])
        assert text == want and events[i][-1][0] == "done", i
        assert events[i][-1][1]["usage"]["completion_tokens"] == n == 12


def test_tiny_temperature_is_greedy_over_http(ckpt):
    _, model, tok = ckpt
    batcher, app = load_server(ckpt[0], 4, 8, "fp32", "tiny")
    p = prompts(1, seed=3)[0]
    want, _ = solo(model, tok, p, 10, temperature=0)
    with LiveServer(app) as s:
        for t in (1e-300, 5e-324, 3e-38, 0.99e-5):
            body = {"prompt": p, "max_tokens": 10, "temperature": t}  # unseeded: greedy or it differs
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (t, r.text)


# ---- the queue --------------------------------------------------------------------------------
def test_abandoned_waiting_requests_leave_the_queue(ckpt):
    """--max-queue 4 and one running row: four clients give up while waiting (two JSON, two
    streams); their slots come back at once, so a fifth client is queued, not refused."""
    batcher, app = load_server(ckpt[0], max_batch=1, max_queue=4, dtype="fp32", model_name="tiny")
    step = batcher.step
    batcher.step = lambda admit=None: (time.sleep(0.005), step(admit))  # A stays running meanwhile
    long = {"prompt": [5, 6], "max_tokens": 500, "ignore_eos": True, "temperature": 0}
    with LiveServer(app) as s, httpx.Client(timeout=30) as client:
        with client.stream("POST", s.url + "/v1/completions", json={**long, "stream": True}) as a:
            lines = a.iter_lines()  # (held: a dropped iterator closes the stream)
            assert next(lines).startswith("data: ")  # A holds the only row
            socks = []
            for i in range(4):
                body = json.dumps({**long, "stream": i % 2 == 0}).encode()
                sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                socks.append(sock)
            wait_until(lambda: len(batcher.waiting) == 4)
            for sock in socks:  # the clients give up
                sock.close()
            wait_until(lambda: not batcher.waiting)  # every abandoned request left the queue
            assert len(batcher.running) == 1  # A still runs
            got = []
            short = {**long, "max_tokens": 3}
            url = s.url + "/v1/completions"
            e = threading.Thread(target=lambda: got.append(client.post(url, json=short)))
            e.start()
            wait_until(lambda: len(batcher.waiting) == 1)  # queued, not refused
        e.join(30)  # A closed: E runs
        assert got[0].status_code == 200 and got[0].json()["usage"]["completion_tokens"] == 3
        assert batcher.metrics.requests["cancelled"] == 5 and not batcher.metrics.rejected


# ---- bodies -----------------------------------------------------------------------------------
def raw_request(port: int, head: bytes, body_parts=(), timeout=10.0) -> bytes:
    """Send a request head and some body bytes, then read what the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_body_limit_413_without_reading_the_body(ckpt):
    batcher, app = load_server(ckpt[0], 4, 8, "fp32", "tiny", Limits(max_body_bytes=1000))
    with LiveServer(app) as s:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        # a 1 GB Content-Length: refused from the header, no byte of the body sent
        out = raw_request(s.port, head + b"Content-Length: 1000000000\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in out, out[:300]
        # chunked, never ending: refused at the chunk that crosses the limit, then closed
        chunk = b"258\r\n" + b" " * 600 + b"\r\n"
        out = raw_request(s.port, head + b"Transfer-Encoding: chunked\r\n\r\n", [chunk, chunk])
        assert out.startswith(b"HTTP/1.1 413") and b"request_too_large" in out, out[:300]
        # exactly at the limit: served
        body = b'{"prompt": [5, 6], "max_tokens": 2, "temperature": 0}'
        body += b" " * (1000 - len(body))
        r = httpx.post(s.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        r = httpx.post(s.url + "/v1/completions", content=body + b" ")
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert batcher.metrics.rejected[413] == 3


def test_tokenization_runs_off_the_event_loop(ckpt):
    batcher, app = load_server(ckpt[0], 4, 8, "fp32", "tiny")
    tok, seen = batcher.tokenizer, []

    class Spy:
        def __call__(self, *a, **k):
            seen.append(threading.get_ident())
            return tok(*a, **k)

        def __getattr__(self, name):
            return getattr(tok, name)

    batcher.tokenizer = Spy()
    with LiveServer(app) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        assert seen and s.thread.ident not in seen  # the event loop runs on the server's thread


# ---- connections ------------------------------------------------------------------------------
def test_connection_cap_and_header_timeout(ckpt):
    batcher, app = load_server(ckpt[0], 4, 8, "fp32", "tiny")
    with LiveServer(app, max_connections=3, header_timeout=0.5) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(2)]
        slow = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\n")  # a head that never ends
        wait_until(lambda: len(s.server.server_state.connections) == 3)
        # the cap: a 4th connection gets 503 + Retry-After and is closed
        out = raw_request(s.port, b"")
        assert out.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in out and b"--max-connections" in out
        for sock in [*idle, slow]:  # trickling bytes does not keep a connection past the timeout
            if sock is slow:
                for _ in range(3):
                    try:
                        sock.sendall(b"X-A: b\r\n")
                    except OSError:
                        break
                    time.sleep(0.2)
            assert sock.recv(100) == b""  # closed by the server
            sock.close()
        wait_until(lambda: not s.server.server_state.connections)
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
