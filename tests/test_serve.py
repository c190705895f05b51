"""`subllm serve` against a live server on 127.0.0.1 (tiny model, real TCP): the openai client
(plain and streaming), 16 concurrent streams equal to their solo `generate()`, continuous batching
driven step by step, bad inputs (4xx in OpenAI's format, and the server keeps serving), a full
queue (429 + Retry-After), client disconnects (the row leaves, no cache bytes left) and metrics.
Shutdown: tests/test_serve_shutdown.py; limits: tests/test_serve_limits.py."""

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import EOS, LiveServer, prompts, solo, tiny_checkpoint

from subllm.cli.serve import load_server
from subllm.serve.batcher import Batcher
from subllm.serve.metrics import parse_metrics
from subllm.serve.request import QueueFull, Request, Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    model, tok = tiny_checkpoint(path)
    return path, model, tok


@pytest.fixture(scope="module")
def server(ckpt):
    batcher, app = load_server(ckpt[0], 16, 256, "fp32", "tiny")
    with LiveServer(app) as s:
        s.batcher = batcher
        yield s


def metrics(url) -> dict:
    return parse_metrics(httpx.get(url + "/metrics").text)


def wait_until(cond, timeout=10.0):
    """Poll a condition on the server's state (not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def idle(url) -> bool:
    m = metrics(url)
    return (
        m['subllm_running_batch{model="tiny"}'] == 0
        and m['subllm_kv_cache_allocated_bytes{model="tiny"}'] == 0
    )


# ---- the openai client ------------------------------------------------------------------------
def test_openai_client_plain_and_streaming(server, ckpt):
    from openai import OpenAI

    _, model, tok = ckpt
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "w10 w20 w30 w40 w50"
    ids = tok(prompt)["input_ids"]
    want, n = solo(model, tok, ids, 12)

    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    assert r.choices[0].finish_reason == ("stop" if n < 12 else "length")

    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    assert chunks[-1].usage.completion_tokens == n

    # seeded sampling through the client equals seeded generate()
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    want_s, _ = solo(model, tok, ids, 10, **kw)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, **kw)
    assert r.choices[0].text == want_s


# ---- concurrency: 16 streams, each equal to its solo generate() -------------------------------
SETTINGS = [  # (generate() keyword arguments, ignore_eos)
    (dict(temperature=0), False),
    (dict(temperature=1.0, seed=11), False),
    (dict(temperature=0.8, top_k=20, top_p=0.9, seed=3), True),
    (dict(temperature=0, repetition_penalty=1.3), False),
]


def _api(kw: dict) -> dict:
    return {k: v for k, v in kw.items()}


def test_16_concurrent_streams_equal_solo_generate(server, ckpt):
    _, model, tok = ckpt
    reqs, want = [], []
    for i, p in enumerate(prompts(16)):
        kw, ignore = SETTINGS[i % 4]
        max_tokens = 8 + 3 * i  # rows leave at different steps
        text, _ = solo(model, tok, p, max_tokens, ignore_eos=ignore, **kw)
        stop = ()
        if i % 3 == 0 and len(text.split()) > 3:  # a stop string that really occurs
            stop = (" " + text.split()[2],)
            text, _ = solo(model, tok, p, max_tokens, stop=stop, ignore_eos=ignore, **kw)
        body = {"prompt": p, "max_tokens": max_tokens, "stream": True, "ignore_eos": ignore, **_api(kw)}
        if stop:
            body["stop"] = list(stop)
        reqs.append(body)
        want.append(text)
    server.batcher.peak = 0

    async def one(client, body):
        parts, finish = [], None
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])["choices"][0]
                    parts.append(ch["text"])
                    finish = ch["finish_reason"] or finish
        return "".join(parts), finish

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, b) for b in reqs))

    got = asyncio.run(main())
    for i, ((text, finish), w) in enumerate(zip(got, want)):
        assert text == w, (i, reqs[i])
        assert finish in ("stop", "length")
    assert any(w for w in want)
    assert server.batcher.peak >= 4  # the requests really shared decode steps
    wait_until(lambda: idle(server.url))  # every row left, the cache is gone


@torch.no_grad()
def test_batcher_steps_rows_join_and_leave(ckpt):
    """The continuous-batching loop driven step by step: requests join mid-run and leave at
    different steps; every output equals its solo generate()."""
    _, model, tok = ckpt
    events: dict[int, list] = {}
    b = Batcher(model, tok, EOS, max_batch=3, max_queue=8)
    ps = prompts(6, seed=9)
    cases = [SETTINGS[i % 4] for i in range(6)]
    reqs = []
    for i, (p, (kw, ignore)) in enumerate(zip(ps, cases)):
        s = Settings(max_tokens=5 + 4 * i, ignore_eos=ignore, **{"temperature": 0.0, **kw})
        r = Request(p, s, lambda kind, x, i=i: events.setdefault(i, []).append((kind, x)))
        reqs.append(r)
    schedule = {0: [0, 1], 2: [2], 4: [3, 4], 6: [5]}  # step -> requests submitted
    sizes = []
    for t in range(60):
        for i in schedule.get(t, []):
            b.submit(reqs[i])
        b.step(b._pop_admissible())
        sizes.append(len(b.running))
    assert max(sizes) == 3 and b.cache is None and not b.running and not b.waiting
    for i, (p, (kw, ignore)) in enumerate(zip(ps, cases)):
        text = "".join(x for k, x in events[i] if k == "delta")
        want, n = solo(model, tok, p, 5 + 4 * i, ignore_eos=ignore, **kw)
        assert text == want, i
        assert events[i][-1][0] == "done" and events[i][-1][1]["usage"]["completion_tokens"] == n
    with pytest.raises(QueueFull):
        for _ in range(9):
            b.submit(Request([5], Settings(max_tokens=1), lambda *a: None))


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"prompt": "w5", "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ({"prompt": "w5", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "w5", "temperature": "hot"}, 400, "temperature", "[0, 2]"),
    ({"prompt": "w5", "temperature": 2.5}, 400, "temperature", "[0, 2]"),
    ({"prompt": "w5", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "w5", "top_k": 0}, 400, "top_k", ">= 1"),
    ({"prompt": "w5", "repetition_penalty": -1}, 400, "repetition_penalty", "[0.01, 100]"),
    ({"prompt": "w5", "repetition_penalty": 1e-308}, 400, "repetition_penalty", "[0.01, 100]"),
    (b'{"prompt": "w5", "temperature": NaN}', 400, None, "NaN is not valid JSON"),
    (b'{"prompt": "w5", "top_p": Infinity}', 400, None, "Infinity is not valid JSON"),
    (b'{"prompt": "w5 \\ud800"}', 400, None, "lone surrogate (\\ud800)"),
    (b'{"prompt": "w5", "stop": ["\\udfff"]}', 400, None, "lone surrogate"),
    (b'{"prompt": "w5", "user": ' + b"[" * 40 + b"]" * 40 + b"}", 400, None, "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "nested too deeply"),
    ({"prompt": "w5", "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    ({"prompt": "w5", "logprobs": 1, "stream": True}, 400, "logprobs", "stream"),
    ({"prompt": "w5", "echo": "yes"}, 400, "echo", "true or false"),
    ({"prompt": "w5", "stop": ["x" * 257]}, 400, "stop", "256 characters"),
    ({"prompt": "w5", "seed": 1.5}, 400, "seed", "integer"),
    ({"prompt": "w5", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "w5", "stop": ["a", ""]}, 400, "stop", "non-empty"),
    ({"prompt": "w5", "n": 2}, 400, "n", "not supported"),
    ({"prompt": "w5", "bogus": 1}, 400, "bogus", "unrecognized"),
    ({"prompt": "w5", "model": "gpt-9"}, 404, "model", "does not exist"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"max_tokens": 3}, 400, "prompt", "required"),
    ({"prompt": ["w5"] * 257}, 400, "prompt", "at most 256 prompts"),
    ({"prompt": ["w5", [5, 999]]}, 400, "prompt", "vocabulary"),
    ({"prompt": [5, 999]}, 400, "prompt", "vocabulary"),
    ({"prompt": [5] * 600}, 400, "prompt", "maximum context length is 512"),
    ({"prompt": [5] * 500, "max_tokens": 20}, 400, "max_tokens", "maximum context length is 512"),
]


@pytest.mark.parametrize("body,status,param,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_a_clear_4xx(server, body, status, param, msg):
    kw = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(server.url + "/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert msg in err["message"] and err["param"] == param and err["type"].endswith("_error")


def test_unknown_routes_and_server_keeps_serving(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    m = metrics(server.url)
    assert m['subllm_requests_rejected_total{model="tiny",status="400"}'] >= len(BAD) - 1
    assert (
        m['subllm_prompt_tokens_total{model="tiny"}'] > 0
        and m['subllm_generation_tokens_total{model="tiny"}'] > 0
    )
    assert 0 < m['subllm_keep_ratio{model="tiny",s="0"}'] < 1  # this tiny model really drops tokens
    assert m['subllm_time_to_first_token_seconds_count{model="tiny"}'] > 0
    assert (
        m['subllm_flops_total{model="tiny",arch="llama"}']
        > m['subllm_flops_total{model="tiny",arch="subllm"}']
    )


# ---- full queue and disconnects ---------------------------------------------------------------
def test_full_queue_429_disconnect_drops_the_row_and_drain_503(ckpt):
    batcher, app = load_server(ckpt[0], max_batch=1, max_queue=1, dtype="fp32", model_name="tiny")
    long = {"prompt": [5, 6], "max_tokens": 500, "ignore_eos": True, "temperature": 0}
    with LiveServer(app) as s, httpx.Client(timeout=30) as client:
        with client.stream("POST", s.url + "/v1/completions", json={**long, "stream": True}) as a:
            lines = a.iter_lines()
            assert next(lines).startswith("data: ")  # A runs: the batch (1 row) is full

            got = []
            b = threading.Thread(  # B waits in the queue: the batch is full
                target=lambda: got.append(
                    client.post(s.url + "/v1/completions", json={**long, "max_tokens": 4})
                )
            )
            b.start()
            wait_until(lambda: len(batcher.waiting) == 1)
            c = client.post(s.url + "/v1/completions", json=long)  # C: the queue is full
            assert c.status_code == 429 and c.headers["Retry-After"] == "1"
            assert c.json()["error"]["type"] == "rate_limit_error"
        # A's stream is closed mid-generation: its row leaves and B runs
        b.join(30)
        rb = got[0]
        assert rb.status_code == 200 and rb.json()["usage"]["completion_tokens"] == 4
        wait_until(lambda: idle(s.url))
        m = metrics(s.url)
        assert m['subllm_requests_total{model="tiny",finish_reason="cancelled"}'] == 1
        assert m['subllm_requests_rejected_total{model="tiny",status="429"}'] == 1
        assert m['subllm_generation_tokens_total{model="tiny"}'] < 500  # A never ran to the end
        batcher.drain()  # what SIGTERM does first: new requests get 503, /health says unavailable
        r = client.post(s.url + "/v1/completions", json=long)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json()["error"]["type"] == "service_unavailable"
        assert client.get(s.url + "/health").status_code == 503


def test_non_streaming_disconnect_cancels(server):
    before = metrics(server.url).get('subllm_requests_total{model="tiny",finish_reason="cancelled"}', 0)
    body = {"prompt": [9, 8, 7], "max_tokens": 500, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.2))
    wait_until(
        lambda: (
            metrics(server.url).get('subllm_requests_total{model="tiny",finish_reason="cancelled"}', 0)
            > before
        )
    )
    wait_until(lambda: idle(server.url))


# ---- the load benchmark -----------------------------------------------------------------------
def test_bench_serve_smoke(ckpt, tmp_path):
    """`subllm bench serve` end to end on the tiny checkpoint (served twice), mixed prompt lengths,
    closed loops and Poisson arrivals: every request succeeds, outputs agree across levels and
    with generate(), the servers end idle."""
    import argparse
    import random

    from subllm.bench.serve import print_serve_report, run_serve_bench

    rng = random.Random(0)
    text = tmp_path / "val.txt"
    text.write_text(" ".join(f"w{rng.randint(4, 255)}" for _ in range(400)))
    args = argparse.Namespace(
        checkpoints=f"{ckpt[0]},{ckpt[0]}", text=str(text), prompt_tokens="24,16", max_tokens=4,
        concurrency="1,3", rates="40", seed=0, requests=3, max_batch=4, dtype="fp32", server_threads=1,
        verify=2, prefill_dtype="same", prefill_batch=1, kv_dtype="bf16",
    )  # fmt: skip
    out = run_serve_bench(args, log=lambda *a: None)
    s = out["summary"]
    assert s["zero_failed"] and s["zero_mismatched"] and s["idle_after"], s
    for m in out["models"]:
        assert m["exit_code"] == 0 and m["verify_mismatched"] == 0
        assert [lv["generated_tokens"] for lv in m["levels"]] == [12, 12, 12]
        assert [lv["mode"] for lv in m["levels"]] == ["closed", "closed", "poisson"]
        assert all(lv["tokens_per_s"] > 0 and lv["ttft_p95_s"] >= lv["ttft_p50_s"] > 0 for lv in m["levels"])
        assert all(set(lv["ttft_by_prompt_len"]) == {"16", "24"} for lv in m["levels"])
    assert 1 < s["flop_ideal_speedup"] < 3
    print_serve_report(out)


def test_poisson_offsets_and_mixed_prompt_windows(tmp_path, ckpt):
    """Arrival times: seeded, start at 0, increasing, mean gap ~ 1 / rate; mixed-length prompts are
    consecutive windows of the text, lengths cycling."""
    from subllm.bench.infer import load_text_tokens
    from subllm.bench.serve import prompt_windows
    from subllm.bench.serve_load import poisson_offsets

    t = poisson_offsets(4000, 5.0, seed=1)
    assert t == poisson_offsets(4000, 5.0, seed=1) and t != poisson_offsets(4000, 5.0, seed=2)
    assert t[0] == 0 and all(b > a for a, b in zip(t, t[1:]))
    assert abs(t[-1] / (len(t) - 1) - 0.2) < 0.02  # mean inter-arrival 1/5 s (sd of the mean ~0.003)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{4 + i % 250}" for i in range(100)))
    ws = prompt_windows(str(text), str(ckpt[0]), [5, 3], 5, 512)
    assert [len(w) for w in ws] == [5, 3, 5, 3, 5]
    flat = [x for w in ws for x in w]
    assert flat == list(load_text_tokens(str(text), str(ckpt[0]), 512))[:21]


def test_tokenize_detokenize_version(server):
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "w5 w6 w200"})
    assert r.json() == {"tokens": [5, 6, 200], "count": 3, "max_model_len": 512}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [5, 6, 200]}).json() == {
        "prompt": "w5 w6 w200"
    }
    for path, body, param in [
        ("/detokenize", {"tokens": [5, 999]}, "tokens"),
        ("/detokenize", {"tokens": "w5"}, "tokens"),
        ("/tokenize", {"prompt": [5]}, "prompt"),
        ("/tokenize", {"prompt": "w5", "bogus": 1}, "bogus"),
    ]:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.url + "/tokenize", json={"prompt": "w5", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    from subllm import __version__

    assert httpx.get(server.url + "/version").json() == {"version": __version__}
