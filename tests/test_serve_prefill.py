"""Chunked prefill in the serving batcher (issue 21 item 6, first part; subllm/serve/prefill.py): a long
prompt admitted while other rows decode is prefilled `prefill_chunk` tokens per step with a decode
step of the running rows between its chunks (counted, not timed); every output equals its solo
`generate()` - the long prompt's `generate(prefill_chunk=N)`, bit for bit, whose chunk boundaries
it shares; short prompts share one step's budget; a request cancelled mid-prefill leaves; over HTTP
with `--prefill-chunk`."""

import asyncio
import json

import httpx
import pytest
import torch
from serve_helpers import EOS, LiveServer, prompts, solo, tiny_checkpoint

import subllm.serve.batcher as batcher_mod
from subllm.cli.serve import load_server
from subllm.serve.batcher import Batcher
from subllm.serve.prefill import Prefill, solo_prefill_chunk
from subllm.serve.request import Request, Settings

CHUNK = 16
LONG = 200  # 13 chunks: 12 x 16 + 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_prefill") / "tiny"
    model, tok = tiny_checkpoint(path)
    return path, model, tok


@pytest.fixture
def trace(monkeypatch):
    """What the batcher runs, in order: ("prefill", request id, tokens) per prompt piece and
    ("decode", rows) per decode step - the real functions, only observed."""
    log = []
    real_run, real_decode = Prefill.run, batcher_mod.decode_step

    def run(self):
        log.append(("prefill", self.req.id, self.next_tokens))
        return real_run(self)

    def decode(model, cache, tokens, rows=None):
        log.append(("decode", len(tokens)))
        return real_decode(model, cache, tokens, rows)

    monkeypatch.setattr(Prefill, "run", run)
    monkeypatch.setattr(batcher_mod, "decode_step", decode)
    return log


def collect(events: dict, i: int):
    return lambda kind, x: events.setdefault(i, []).append((kind, x))


def text_of(events, i) -> str:
    return "".join(x for k, x in events[i] if k == "delta")


CASES = [dict(temperature=0.0), dict(temperature=1.0, seed=11), dict(temperature=0.8, top_k=20, seed=3)]


@torch.no_grad()
@pytest.mark.parametrize("chunk", [CHUNK, None])
def test_long_prompt_interleaves_with_decode_and_outputs_equal_solo(ckpt, trace, chunk):
    _, model, tok = ckpt
    b = Batcher(model, tok, EOS, max_batch=4, max_queue=8, prefill_chunk=chunk)
    events: dict[int, list] = {}
    short = prompts(3, seed=2, lo=5, hi=12)
    reqs = [Request(p, Settings(max_tokens=40, ignore_eos=True, **kw), collect(events, i))
            for i, (p, kw) in enumerate(zip(short, CASES))]  # fmt: skip
    long_p = prompts(1, seed=3, lo=LONG, hi=LONG + 1)[0]
    long_kw = dict(temperature=0.9, top_p=0.9, seed=5)
    long_r = Request(long_p, Settings(max_tokens=8, ignore_eos=True, **long_kw), collect(events, 3))
    b.submit(reqs)
    for _ in range(3):  # the short rows run
        b.step(b._pop_admissible())
    assert len(b.running) == 3
    start = len(trace)
    b.submit(long_r)
    steps = 0
    while not long_r.tokens:
        b.step(b._pop_admissible())
        steps += 1
    during = trace[start:]
    pieces = [e[2] for e in during if e[0] == "prefill"]
    if chunk is None:  # one pass: the running rows wait for the whole prompt
        assert pieces == [LONG] and steps == 1
    else:
        assert pieces == [CHUNK] * 12 + [8] and steps == 13
        # between two chunks of the long prompt: one decode step of the 3 running rows
        kinds = [e[0] for e in during]
        assert kinds == ["prefill", "decode"] * 13
        assert all(e == ("decode", 3) for e in during[1:-1:2])  # the long row decodes after its last
        assert during[-1] == ("decode", 4)
    while b.running or b.prefilling:
        b.step(b._pop_admissible())
    for i, (p, kw) in enumerate(zip(short, CASES)):
        assert text_of(events, i) == solo(model, tok, p, 40, ignore_eos=True, **kw)[0], i
    want, _ = solo(model, tok, long_p, 8, ignore_eos=True, prefill_chunk=solo_prefill_chunk(LONG, chunk),
                   **long_kw)  # fmt: skip
    assert text_of(events, 3) == want and len(want.split()) == 8
    greedy = Request(long_p, Settings(max_tokens=8, ignore_eos=True, temperature=0.0), collect(events, 4))
    b.submit(greedy)
    while not greedy.done:
        b.step(b._pop_admissible())
    assert text_of(events, 4) == solo(model, tok, long_p, 8, ignore_eos=True)[0]  # = unchunked greedy too


@torch.no_grad()
def test_short_prompts_share_a_step_budget(ckpt, trace):
    """Pieces in arrival order while they fit in `prefill_chunk` tokens together; a long prompt's
    chunks keep their boundaries (multiples of the chunk) whatever waits behind it."""
    _, model, tok = ckpt
    b = Batcher(model, tok, EOS, max_batch=8, max_queue=8, prefill_chunk=CHUNK)
    ps = [prompts(1, seed=s, lo=n, hi=n + 1)[0] for s, n in enumerate([5, 6, 7, 20, 3, 2])]
    events: dict[int, list] = {}
    reqs = [Request(p, Settings(max_tokens=3, temperature=0.0, ignore_eos=True), collect(events, i))
            for i, p in enumerate(ps)]  # fmt: skip
    b.submit(reqs)
    per_step = []
    while b.waiting or b.prefilling or b.running:
        n = len(trace)
        b.step(b._pop_admissible())
        per_step.append([e[2] for e in trace[n:] if e[0] == "prefill"])
    # 5+6 (+7 > 16); 7 (+16 > 16); 16 of 20; 4 + 3 + 2
    assert per_step[:4] == [[5, 6], [7], [16], [4, 3, 2]]
    for i, p in enumerate(ps):
        chunk = solo_prefill_chunk(len(p), CHUNK)
        assert text_of(events, i) == solo(model, tok, p, 3, ignore_eos=True, prefill_chunk=chunk)[0], i


@torch.no_grad()
def test_cancelled_while_prefilling_leaves(ckpt, trace):
    _, model, tok = ckpt
    b = Batcher(model, tok, EOS, max_batch=4, max_queue=8, prefill_chunk=CHUNK)
    events: dict[int, list] = {}
    run = Request(prompts(1, seed=7)[0], Settings(max_tokens=12, temperature=0.0, ignore_eos=True),
                  collect(events, 0))  # fmt: skip
    long_r = Request(prompts(1, seed=3, lo=LONG, hi=LONG + 1)[0], Settings(max_tokens=4), collect(events, 1))
    b.submit([run, long_r])
    b.step(b._pop_admissible())
    b.step(b._pop_admissible())
    assert len(b.prefilling) == 1 and b.busy
    b.cancel(long_r)  # the client went away mid-prefill
    n = len(trace)
    b.step(b._pop_admissible())
    assert long_r.finish_reason == "cancelled" and not b.prefilling and 1 not in events
    assert [e[0] for e in trace[n:]] == ["decode"]  # no further chunk ran
    while b.running:
        b.step(b._pop_admissible())
    assert text_of(events, 0) == solo(model, tok, run.prompt, 12, ignore_eos=True)[0]
    assert b.cache is None and not b.busy


def test_over_http_long_prompt_among_streams_equals_solo(ckpt):
    """`load_server(..., prefill_chunk=16)`: four streams and a long prompt sent together; every
    output equals its solo generate()."""
    path, model, tok = ckpt
    batcher, app = load_server(path, 8, 16, "fp32", "tiny", prefill_chunk=CHUNK)
    assert batcher.prefilling.chunk == CHUNK
    short = prompts(4, seed=12, lo=5, hi=20)
    long_p = prompts(1, seed=13, lo=300, hi=301)[0]
    bodies = [{"prompt": p, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stream": True}
              for p in short]  # fmt: skip
    bodies.append({"prompt": long_p, "max_tokens": 10, "temperature": 0.7, "seed": 4, "stream": True})
    want = [solo(model, tok, p, 30, ignore_eos=True)[0] for p in short]
    want.append(solo(model, tok, long_p, 10, temperature=0.7, seed=4, prefill_chunk=CHUNK)[0])

    async def one(client, url, body):
        parts = []
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    parts.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(parts)

    async def main(url):
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, url, b) for b in bodies))

    with LiveServer(app) as s:
        got = asyncio.run(main(s.url))
        health = httpx.get(s.url + "/health").json()
    assert got == want and all(want)
    assert health["prefilling"] == 0 and health["running"] == 0


def test_cli_prefill_chunk_option(ckpt, capsys):
    from subllm.cli import main
    from subllm.errors import SubLLMError

    path = ckpt[0]
    assert main(["serve", "--checkpoint", str(path), "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "default 512; 0: each prompt in one pass" in " ".join(capsys.readouterr().out.split())
    batcher, _ = load_server(path, 2, 2, "fp32", "tiny", prefill_chunk=None)  # --prefill-chunk 0
    assert batcher.prefilling.chunk is None
    with pytest.raises(SubLLMError, match="prefill-chunk"):
        Batcher(batcher.model, batcher.tokenizer, EOS, prefill_chunk=0)


@torch.no_grad()
def test_waiting_prompts_prefilled_together(ckpt, monkeypatch):
    """--prefill-batch: one-pass prompts next to each other in the queue that fit in the step's
    budget run as one batch (at most N rows; a chunked prompt ends the group), each joins with its
    own cache and the logits and K/V of its solo prefill (to float rounding); a batch that raises
    is retried one prompt at a time."""
    import subllm.serve.prefill as prefill_mod
    from subllm.inference.engine import new_cache, prefill

    _, model, tok = ckpt
    calls = []
    real = prefill_mod.prefill_together
    monkeypatch.setattr(
        prefill_mod, "prefill_together", lambda m, g, *a: calls.append(len(g)) or real(m, g, *a)
    )
    q = prefill_mod.PrefillQueue(model, CHUNK, 8, together=3)
    lens = [5, 6, 3, 20, 4, 2]  # 5+6+3 together (3 rows); 20 chunked (16, 4); 4+2 together
    ps = [prompts(1, seed=s, lo=n, hi=n + 1)[0] for s, n in enumerate(lens)]
    reqs = [Request(p, Settings(max_tokens=3, temperature=0.0, ignore_eos=True), lambda *a: None) for p in ps]
    for r in reqs:
        q.add(r)
    got = {}
    rounds = 0
    while len(q):
        q.round(lambda r, c, lg: got.setdefault(r.id, (c, lg)), lambda r, e: pytest.fail(f"dropped: {e}"))
        rounds += 1
    assert calls == [3, 2] and rounds == 3  # [5, 6, 3], then 16 of 20, then 4 of 20 + [4, 2]
    for r, p in zip(reqs, ps):
        if len(p) > CHUNK:  # the chunked one ran alone
            continue
        cache, logits = got[r.id]
        ref_cache = new_cache(model, 1, packed=True)
        want = prefill(model, torch.tensor([p]), None, ref_cache)
        assert cache.batch_size == 1 and cache.snapshot() == ref_cache.snapshot()
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        for layer, level in enumerate(cache.layer_level):
            n = cache.length(level, 0)
            for a, b in zip(cache.row_kv(layer, 0), ref_cache.row_kv(layer, 0)):
                torch.testing.assert_close(a[..., :n, :], b[..., :n, :], rtol=1e-4, atol=1e-4)

    def broken(*a):
        raise RuntimeError("no memory for the batch")

    monkeypatch.setattr(prefill_mod, "prefill_together", broken)
    for r in reqs[:3]:
        q.add(Request(r.prompt, r.settings, lambda *a: None))
    joined = []
    q.round(lambda r, c, lg: joined.append(r), lambda r, e: pytest.fail(f"dropped: {e}"))
    assert len(joined) == 3 and not len(q)  # one at a time, all in


def test_prefill_batch_over_http_flag(ckpt):
    path, _, _ = ckpt
    batcher, _ = load_server(path, 4, 8, "fp32", None, prefill_batch=4)
    assert batcher.prefilling.together == 4
