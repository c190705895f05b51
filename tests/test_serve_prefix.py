"""Automatic prefix caching in the serving batcher (issue 21 item 6; subllm/serve/prefix_cache.py).

First the claim it rests on: a prefix's kept sets and per-level K/V are a property of the prefix
alone (chunked prefill resumed after a prefix == the whole prompt chunked; one pass over the prefix
== the first tokens of one pass over the whole prompt). Then served outputs with the store equal
those without it (greedy tokens and every step's logits, sampled texts), hits are counted and skip
the prefix's chunks, the byte budget holds by evicting leaves first, a request cancelled or failed
mid-prefill leaves only whole blocks behind, and the counters reach /health and /metrics."""

import httpx
import pytest
import torch
from helpers import tiny_preset_model
from serve_helpers import EOS, LiveServer, prompts, solo, tiny_checkpoint

import subllm.serve.prefill as prefill_mod
from subllm.cli.serve import load_server
from subllm.inference.chunked_prefill import prefill_chunked, prefill_chunks
from subllm.inference.engine import new_cache, prefill
from subllm.serve.batcher import Batcher
from subllm.serve.prefill import Prefill
from subllm.serve.request import Request, Settings

CHUNK = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_prefix") / "tiny"
    model, tok = tiny_checkpoint(path)
    return path, model, tok


def held(cache, level):
    """(positions, [K of each layer of the level], [V ...]) held by row 0 at `level`."""
    n = cache.length(level, 0)
    layers = cache.level_layers[level]
    ks = [cache.k[i][0, :, :n] for i in layers]
    return cache.pos[level][0, :n], ks, [cache.v[i][0, :, :n] for i in layers]


@torch.no_grad()
@pytest.mark.parametrize("k", [CHUNK, 4 * CHUNK])
def test_a_prefix_cache_is_a_property_of_the_prefix(k):
    model = tiny_preset_model()
    ids = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    whole = new_cache(model, 1)
    want = prefill_chunked(model, ids, None, whole, CHUNK)
    # resumed: the prefix alone, then the rest from `k` - the batcher's path on a hit
    resumed = new_cache(model, 1)
    prefill_chunked(model, ids[:, :k], None, resumed, CHUNK)
    *_, got = prefill_chunks(model, ids, None, resumed, CHUNK, start=k)
    assert torch.equal(got, want)
    # the slow path: one pass over the prefix vs one pass over the whole prompt
    one_pre, one_whole = new_cache(model, 1), new_cache(model, 1)
    prefill(model, ids[:, :k], None, one_pre)
    prefill(model, ids, None, one_whole)
    partial = 0
    for level in range(whole.n_levels):
        pos, ks, vs = held(whole, level)
        rpos, rks, rvs = held(resumed, level)
        assert torch.equal(pos, rpos) and all(map(torch.equal, ks + vs, rks + rvs)), level
        # the first k tokens: the prefix's own kept set and K/V, whatever follows
        ppos, pks, pvs = held(one_pre, level)
        wpos, wks, wvs = held(one_whole, level)
        m = int((wpos < k).sum())
        assert torch.equal(wpos[:m], ppos), level
        assert torch.equal(pos[pos < k], ppos), level  # chunked keeps the same tokens
        for a, b in zip(pks + pvs, wks + wvs):
            torch.testing.assert_close(a, b[:, :m], rtol=0, atol=1e-5)
        partial += 0 < m < k
    assert partial >= 2  # the inner levels really drop some of the prefix's tokens


class Recording(Batcher):
    """A Batcher that keeps every row of logits it samples from, by request tag."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.logits: dict[int, list[torch.Tensor]] = {}

    def _advance(self, reqs, logits):
        for i, r in enumerate(reqs):
            self.logits.setdefault(r.tag, []).append(logits[i].clone())
        return super()._advance(reqs, logits)


def shared_prefix_prompts():
    """A 64-token prefix (4 blocks) + suffixes: 1, 15, 16 (a block-aligned prompt), 37 tokens; the
    prefix alone (its last block is never taken: the last token must run); a different prompt; the
    prefix + the first 10 tokens of the 16-token suffix + 10 others (its fifth block differs from
    the 16-token prompt's only after 10 tokens)."""
    pre = prompts(1, seed=21, lo=64, hi=65)[0]
    tails = [prompts(1, seed=30 + n, lo=n, hi=n + 1)[0] for n in (1, 15, 16, 37)]
    other = prompts(1, seed=5, lo=40, hi=41)[0]
    late = pre + tails[2][:10] + prompts(1, seed=50, lo=10, hi=11)[0]
    return [pre + tails[0], pre + tails[1], pre + tails[2], pre + tails[3], list(pre), other, late]


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.9, seed=4),
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=20, seed=9),
    dict(temperature=0.0, logprobs=3),
    dict(temperature=0.0),
    dict(temperature=0.0),
]


def serve_all(model, tok, ps, mb, one_at_a_time=True):
    b = Recording(model, tok, EOS, max_batch=4, max_queue=16, prefill_chunk=CHUNK, prefix_cache_mb=mb)
    texts: dict[int, str] = {}
    reqs = []
    for i, (p, kw) in enumerate(zip(ps, SETTINGS)):

        def sink(kind, x, i=i):
            if kind == "delta":
                texts[i] = texts.get(i, "") + x

        r = Request(p, Settings(max_tokens=6, ignore_eos=True, **kw), sink)
        r.tag = i
        reqs.append(r)
    for r in reqs if one_at_a_time else [reqs]:
        b.submit(r)
        while b.waiting or b.prefilling or b.running:
            b.step(b._pop_admissible())
    return b, texts


@torch.no_grad()
def test_served_outputs_equal_no_cache_and_hits_skip_the_prefix(ckpt, monkeypatch):
    _, model, tok = ckpt
    ps = shared_prefix_prompts()
    off, want = serve_all(model, tok, ps, 0)
    assert off.prefix_store is None
    pieces = []
    real_run = Prefill.run

    def run(self):
        pieces.append((self.req.tag, self.done_tokens, self.next_tokens))
        return real_run(self)

    monkeypatch.setattr(Prefill, "run", run)
    on, got = serve_all(model, tok, ps, 1.0)
    assert got == want and all(want.values())
    for i in range(len(ps)):
        assert len(on.logits[i]) == len(off.logits[i]) == 6
        for a, b in zip(on.logits[i], off.logits[i]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for i in (0, 2):  # and solo generate() with the same chunk boundaries
        assert got[i] == solo(model, tok, ps[i], 6, ignore_eos=True, prefill_chunk=CHUNK)[0]
    st = on.prefix_store.stats()
    # 0 misses and stores 4 blocks; 1, 2, 3, 6 take all 4; the prefix alone takes 3; 5 misses
    assert (st["hits"], st["misses"], st["hit_tokens"]) == (5, 2, 4 * 64 + 48)
    firsts = {}
    for tag, done, _ in pieces:
        firsts.setdefault(tag, done)
    assert firsts == {0: 0, 1: 64, 2: 64, 3: 64, 4: 48, 5: 0, 6: 64}  # where each prompt's prefill began
    assert sum(n for tag, _, n in pieces if tag == 3) == 37  # only the suffix ran
    assert st["blocks"] == 4 + 1 + 2 + 2 + 1  # 0's four; 2's fifth (aligned); 3's two; 5's two; 6's fifth


@torch.no_grad()
def test_prompts_admitted_together_find_what_the_first_stored(ckpt):
    _, model, tok = ckpt
    ps = shared_prefix_prompts()[:4]
    _, want = serve_all(model, tok, ps, 0, one_at_a_time=False)
    on, got = serve_all(model, tok, ps, 1.0, one_at_a_time=False)
    assert got == want
    assert on.prefix_store.stats()["hits"] == 3


@torch.no_grad()
def test_eviction_keeps_the_budget_and_drops_leaves_first(ckpt):
    _, model, tok = ckpt
    ps = shared_prefix_prompts()
    big, want = serve_all(model, tok, ps, 1.0)
    sizes = sorted(b.nbytes for b in big.prefix_store.entries.values())
    budget = sum(sizes[:3])  # room for about three blocks of the ten
    small, got = serve_all(model, tok, ps, budget / 2**20)
    assert got == want
    store = small.prefix_store
    st = store.stats()
    assert st["bytes"] <= budget and st["evictions"] > 0 and 0 < st["blocks"] < 10
    assert st["bytes"] == sum(b.nbytes for b in store.entries.values())
    for p in ps:  # no orphan: a held block's parents are all held
        keys = store.keys(p, len(p) // CHUNK)
        held_at = [k in store.entries for k in keys]
        assert held_at == sorted(held_at, reverse=True), held_at
    # room for the prefix's 4 blocks: a different prompt's 2 blocks evict the prefix's last blocks
    a, other = ps[0], ps[5]
    budget = sum(big.prefix_store.entries[k].nbytes for k in big.prefix_store.keys(a, 4))
    b = Batcher(model, tok, EOS, prefill_chunk=CHUNK, prefix_cache_mb=budget / 2**20)
    for p in (a, other):
        r = Request(p, Settings(max_tokens=1, temperature=0.0), lambda *x: None)
        b.submit(r)
        while not r.done:
            b.step(b._pop_admissible())
    held_at = [k in b.prefix_store.entries for k in b.prefix_store.keys(a, 4)]
    assert held_at[0] and not held_at[3] and held_at == sorted(held_at, reverse=True), held_at
    assert all(k in b.prefix_store.entries for k in b.prefix_store.keys(other, 2))


@torch.no_grad()
def test_cancelled_or_failed_mid_prefill_leaves_only_whole_blocks(ckpt, monkeypatch):
    _, model, tok = ckpt
    p = prompts(1, seed=40, lo=100, hi=101)[0]  # 6 blocks + 4
    b = Batcher(model, tok, EOS, max_batch=4, max_queue=8, prefill_chunk=CHUNK, prefix_cache_mb=1.0)
    r = Request(p, Settings(max_tokens=5, temperature=0.0, ignore_eos=True), lambda *a: None)
    b.submit(r)
    b.step(b._pop_admissible())
    b.step(b._pop_admissible())
    b.cancel(r)
    b.step(b._pop_admissible())
    assert r.finish_reason == "cancelled" and b.prefix_store.stats()["blocks"] == 2

    real = prefill_chunks

    def failing(*a, **kw):  # the third chunk runs into the cache, then the step raises
        steps = real(*a, **kw)
        yield next(steps)
        next(steps)
        raise RuntimeError("injected")

    monkeypatch.setattr(prefill_mod, "prefill_chunks", failing)
    events = []
    r = Request(p, Settings(max_tokens=5, temperature=0.0, ignore_eos=True), lambda k, x: events.append(k))
    b.submit(r)
    while not r.done:
        b.step(b._pop_admissible())
    assert r.finish_reason == "error" and b.prefix_store.stats()["blocks"] == 3  # the 3rd; not the 4th
    monkeypatch.setattr(prefill_mod, "prefill_chunks", real)
    text = []
    r = Request(p, Settings(max_tokens=5, temperature=0.0, ignore_eos=True),
                lambda k, x: text.append(x) if k == "delta" else None)  # fmt: skip
    b.submit(r)
    while not r.done:
        b.step(b._pop_admissible())
    assert b.prefix_store.stats()["hit_tokens"] == 2 * CHUNK + 3 * CHUNK
    assert "".join(text) == solo(model, tok, p, 5, ignore_eos=True, prefill_chunk=CHUNK)[0]


def test_store_off_without_chunks_or_with_dynamic_rope(ckpt):
    _, model, tok = ckpt
    assert Batcher(model, tok, EOS, prefill_chunk=None, prefix_cache_mb=8).prefix_store is None
    assert Batcher(model, tok, EOS, prefill_chunk=CHUNK, prefix_cache_mb=8).prefix_store.block == CHUNK
    dyn = tiny_preset_model()
    dyn.config = dyn.config.replace(
        rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}
    )
    assert Batcher(dyn, tok, EOS, prefill_chunk=CHUNK, prefix_cache_mb=8).prefix_store is None


def test_over_http_counters_and_cli_option(ckpt, capsys):
    path, model, tok = ckpt
    _, app = load_server(path, 4, 8, "fp32", "tiny", prefill_chunk=CHUNK, prefix_cache_mb=1.0)
    ps = shared_prefix_prompts()[:2]
    with LiveServer(app) as s:
        got = [
            httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"prompt": p, "max_tokens": 5, "temperature": 0, "ignore_eos": True}).json()
            for p in ps
        ]  # fmt: skip
        health = httpx.get(s.url + "/health").json()
        text = httpx.get(s.url + "/metrics").text
    assert [g["choices"][0]["text"] for g in got] == [
        solo(model, tok, p, 5, ignore_eos=True, prefill_chunk=CHUNK)[0] for p in ps
    ]
    assert health["prefix_cache"]["hits"] == 1 and health["prefix_cache"]["hit_tokens"] == 64
    assert 'subllm_prefix_cache_lookups_total{model="tiny",result="hit"} 1' in text
    assert 'subllm_prefix_cache_hit_tokens_total{model="tiny"} 64' in text
    from subllm.cli import main

    assert main(["serve", "--checkpoint", str(path), "--prefix-cache-mb", "-1"]) == 2
    assert "--prefix-cache-mb must be >= 0" in capsys.readouterr().err
