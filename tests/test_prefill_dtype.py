"""`--prefill-dtype bf16`: the prompt's prefill under bf16 autocast, decode in fp32 (generate and
the server alike). The cache keeps decode's dtype; a chunked bf16 prefill gives what a one-pass one
gives; the first logits are a bf16 forward's; served outputs equal solo generate(prefill_dtype=...)."""

import pytest
import torch
from helpers import left_padded, tiny_preset_model
from serve_helpers import EOS, prompts, solo, tiny_checkpoint

from subllm.cli.generate import resolve_prefill_dtype
from subllm.errors import SubLLMError
from subllm.inference.generation import generate, stream_generate
from subllm.serve.batcher import Batcher
from subllm.serve.request import Request, Settings


def _first_logits(model, ids, mask, **kw):
    seen = {}
    steps = stream_generate(model, ids, mask, max_new_tokens=2, return_logits=True,
                            on_prefill=lambda c: seen.update(dtype=c.dtype), **kw)  # fmt: skip
    return next(steps)[1], seen["dtype"]


@torch.no_grad()
def test_generate_prefill_dtype():
    model = tiny_preset_model().eval()
    ids, mask = left_padded([20, 13])
    base = generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8, prefill_dtype="fp32"), base)
    bf = generate(model, ids, mask, max_new_tokens=8, prefill_dtype="bf16")
    assert torch.equal(
        generate(model, ids, mask, max_new_tokens=8, prefill_dtype="bf16", prefill_chunk=4), bf
    )
    first, cache_dtype = _first_logits(model, ids, mask, prefill_dtype="bf16")
    assert cache_dtype == torch.float32  # decode's dtype, not the prefill's
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 full forward, at each row's last token
        ref = model(ids, mask).logits[:, -1].float()
    fp32_first, _ = _first_logits(model, ids, mask)
    assert (first - ref).abs().max() < 0.1 * ref.abs().max()
    assert (first - ref).abs().max() < (fp32_first - ref).abs().max()  # nearer bf16's than fp32's
    with pytest.raises(SubLLMError, match="prefill_dtype"):
        generate(model, ids, mask, max_new_tokens=2, prefill_dtype="fp16")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(SubLLMError, match="bf16 decode"):
        generate(model, ids, mask, max_new_tokens=2, prefill_dtype="fp32")


@torch.no_grad()
def test_served_bf16_prefill_equals_solo(tmp_path, monkeypatch):
    import subllm.serve.prefill as prefill_mod

    regions, real = [], prefill_mod.prefill_autocast
    monkeypatch.setattr(prefill_mod, "prefill_autocast", lambda d, dev: regions.append(d) or real(d, dev))
    model, tok = tiny_checkpoint(tmp_path / "tiny")
    b = Batcher(model, tok, EOS, max_batch=4, max_queue=8, prefill_chunk=16, prefill_dtype="bf16")
    ps = prompts(3, seed=4, lo=5, hi=40) + prompts(1, seed=6, lo=60, hi=61)  # the last one in chunks
    texts: dict[int, list] = {}

    def sink(i):
        return lambda kind, x: texts.setdefault(i, []).append((kind, x))

    greedy = Settings(max_tokens=12, ignore_eos=True, temperature=0.0)
    reqs = [Request(p, greedy, sink(i)) for i, p in enumerate(ps)]
    b.submit(reqs)
    while b.running or b.prefilling or b.waiting:
        b.step(b._pop_admissible())
    for i, p in enumerate(ps):
        chunk = 16 if len(p) > 16 else None
        want, _ = solo(model, tok, p, 12, ignore_eos=True, prefill_dtype="bf16", prefill_chunk=chunk)
        assert "".join(x for k, x in texts[i] if k == "delta") == want, i
    pieces = sum(-(-len(p) // 16) for p in ps)  # a prompt of at most 16 tokens is one piece
    assert regions == ["bf16"] * pieces  # every prompt piece ran in bf16


def test_resolve_prefill_dtype(monkeypatch):
    model = tiny_preset_model()
    assert resolve_prefill_dtype("same", model, "fp32") is None
    assert resolve_prefill_dtype("bf16", model, "fp32") == "bf16"
    assert resolve_prefill_dtype("bf16", model, "bf16") is None  # already bf16
    import subllm.dtype_calibration as C

    for measured, want in (("bf16", "bf16"), ("fp32", None)):
        monkeypatch.setattr(C, "choose_dtype", lambda *a, m=measured, **k: C.Choice(m, "measured", m))
        assert resolve_prefill_dtype("auto", model, "fp32") == want


def test_cli_prefill_dtype(tmp_path, capsys):
    from subllm.cli import main

    path = tmp_path / "tiny"
    tiny_checkpoint(path)
    args = ["generate", "--checkpoint", str(path), "--prompt", "w5 w6 w7", "--max-new-tokens", "3"]
    assert main([*args, "--dtype", "fp32", "--prefill-dtype", "bf16"]) == 0
    assert "prefill in bf16, decode in fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses it
        main([*args, "--prefill-dtype", "fp16"])


def test_bf16_weight_copies_kept_between_prefills(tmp_path):
    """Under an fp32 decode, serve's worker holds `prefill_casts_kept`: the weights are cast to bf16
    once, not once per prompt chunk (torch drops autocast's copies when its outermost region ends),
    and the outputs are those of solo generate() with fresh casts."""
    import contextlib
    import time

    from subllm.inference.generation import prefill_casts_kept

    lin, x = torch.nn.Linear(64, 64), torch.randn(4, 64)

    def casts(outer) -> int:
        with torch.profiler.profile() as prof, outer:
            for _ in range(3):  # three prompt chunks, each its own bf16 region
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    lin(x)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    fresh = casts(contextlib.nullcontext())  # weight, bias and x in each region
    assert casts(prefill_casts_kept("bf16", "cpu")) == fresh - 4  # weight and bias cast once
    assert casts(prefill_casts_kept(None, "cpu")) == fresh

    model, tok = tiny_checkpoint(tmp_path / "tiny")
    b = Batcher(model, tok, EOS, max_batch=4, max_queue=8, prefill_chunk=16, prefill_dtype="bf16")
    b.start()
    try:
        greedy = Settings(max_tokens=8, ignore_eos=True, temperature=0.0)
        for i, p in enumerate(prompts(2, seed=7, lo=20, hi=40)):
            out: list = []
            r = Request(p, greedy, lambda kind, x, out=out: out.append((kind, x)))
            b.submit(r)
            deadline = time.monotonic() + 60
            while not r.done and time.monotonic() < deadline:
                time.sleep(0.01)
            want, _ = solo(model, tok, p, 8, ignore_eos=True, prefill_dtype="bf16", prefill_chunk=16)
            assert "".join(x for k, x in out if k == "delta") == want, i
    finally:
        b.stop()
