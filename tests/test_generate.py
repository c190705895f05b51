"""generate / stream_generate: cached == uncached (tokens exactly, logits within 1e-5), each row of a
batch == the row alone, eos handling, seeded sampling, logits processors on hand-computed cases,
argument checks, text deltas and the `subllm generate` CLI."""

import math

import pytest
import torch
from helpers import checkpoint_with_tokenizer, left_padded, tiny_preset_model

from subllm import SubLLMError, generate
from subllm.inference.generation import (
    TextDeltas,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    next_tokens,
    stream_generate,
)

V = 256


def steps(model, ids, mask, use_cache, n=10, **kw):
    out = list(
        stream_generate(model, ids, mask, max_new_tokens=n, use_cache=use_cache, return_logits=True, **kw)
    )
    return torch.stack([t for t, _ in out], 1), torch.stack([lg for _, lg in out], 1)


@pytest.mark.parametrize("structure", ["TT(T(TT)T)T", "(T(T(T)))T", "T(TT)(T)(TT)T"])
def test_cached_greedy_equals_uncached(structure):
    model = tiny_preset_model(structure)
    ids, mask = left_padded([14, 6, 10])
    tok_c, lg_c = steps(model, ids, mask, True)
    tok_u, lg_u = steps(model, ids, mask, False)
    assert torch.equal(tok_c, tok_u)  # token for token
    assert (lg_c - lg_u).abs().max() < 1e-5  # per-step logits, fp32
    # the run really mixes kept and dropped tokens at every S (prompt and continuation)
    seq = torch.cat([ids, tok_c], 1)
    fr = model(seq, torch.cat([mask, torch.ones_like(tok_c)], 1)).keep_fractions
    assert all(0.1 < f < 0.9 for f in fr), fr
    out = generate(model, ids, mask, max_new_tokens=10)
    assert out.shape == (3, ids.shape[1] + 10) and torch.equal(out[:, ids.shape[1] :], tok_c)
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_each_row_equals_the_row_alone():
    model = tiny_preset_model()
    lens = [12, 5, 9]
    ids, mask = left_padded(lens)
    tok, lg = steps(model, ids, mask, True, n=8)
    for b, n in enumerate(lens):
        t1, l1 = steps(model, ids[b : b + 1, -n:], None, True, n=8)
        assert torch.equal(t1[0], tok[b])
        assert (l1[0] - lg[b]).abs().max() < 1e-5


def test_right_padding_and_eos():
    model = tiny_preset_model()
    ids, mask = left_padded([8, 13])
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(2):
        n = int(mask[b].sum())
        right_ids[b, :n], right_mask[b, :n] = ids[b, -n:], 1
    base = generate(model, ids, mask, max_new_tokens=8)[:, ids.shape[1] :]
    assert torch.equal(generate(model, right_ids, right_mask, max_new_tokens=8)[:, ids.shape[1] :], base)
    # stop row 0 at its 3rd token: it is padded afterwards, row 1 is unaffected until it stops too
    eos = int(base[0, 2])
    for use_cache in (True, False):
        out = generate(
            model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, use_cache=use_cache
        )
        new = out[:, ids.shape[1] :]
        assert torch.equal(new[0, :3], base[0, :3]) and (new[0, 3:] == 0).all()
        stop1 = next((i for i, t in enumerate(base[1].tolist()) if t == eos), None)
        upto = new.shape[1] if stop1 is None else stop1 + 1
        assert torch.equal(new[1, :upto], base[1, :upto])
    # every row stops at once: the output is shorter than max_new_tokens
    first = base[:, 0].tolist()
    out = generate(model, ids, mask, max_new_tokens=8, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1


def test_bf16_autocast_and_preallocated_cache():
    model = tiny_preset_model()
    ids, mask = left_padded([9, 5])
    ref = generate(model, ids, mask, max_new_tokens=6)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=6, chunk=None), ref)
    stream = stream_generate(model, ids, mask, max_new_tokens=6)  # created outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.stack(list(stream), 1)
    assert got.shape == (2, 6) and (got >= 0).all() and (got < V).all()


def test_seeded_sampling_is_reproducible():
    model = tiny_preset_model()
    ids, mask = left_padded([7, 11])
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.3)
    a = generate(model, ids, mask, seed=123, **kw)
    assert torch.equal(a, generate(model, ids, mask, seed=123, **kw))
    assert torch.equal(a, generate(model, ids, mask, seed=123, use_cache=False, **kw))
    assert not torch.equal(a, generate(model, ids, mask, seed=124, **kw))


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    # greedy with the penalty: token 3 wins without it, token 0 is penalised below token 3 anyway;
    # penalise 3 and the argmax moves to 0 (2.0 > 3.0 / 2)
    assert (
        next_tokens(apply_repetition_penalty(logits, torch.tensor([[False, False, False, True]]), 2.0), 0.0)
        == 0
    )


def test_top_k_hand_computed():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, 0.0, 5.0, 0.0]])
    got = apply_top_k(logits, 2)
    inf = float("-inf")
    assert torch.equal(got[0], torch.tensor([inf, 4.0, 3.0, inf]))
    assert torch.equal(got[1], torch.tensor([0.0, 0.0, 5.0, 0.0]))  # ties with the 2nd are kept
    assert torch.equal(apply_top_k(logits, 10), logits)
    # top_k = 1 sampling is greedy
    g = torch.Generator().manual_seed(0)
    assert next_tokens(logits, 1.0, top_k=1, generator=g).tolist() == [1, 2]


def test_top_p_hand_computed():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    inf = float("-inf")

    def kept(p):
        return torch.isfinite(apply_top_p(logits, p))[0].tolist()

    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.7
    assert kept(0.85) == [False, True, True, True]  # 0.95 >= 0.85
    assert kept(0.99) == [True, True, True, True]
    assert kept(0.01) == [False, True, False, False]  # always at least the most likely token
    # renormalised distribution after top-p 0.7: 0.5/0.8 and 0.3/0.8
    p = apply_top_p(logits, 0.7).softmax(-1)[0]
    assert torch.allclose(p, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    assert apply_top_p(logits, 0.7)[0, 0] == inf
    # temperature is applied before top-p: at T = 2 the distribution is proportional to sqrt(p),
    # i.e. (0.120, 0.379, 0.208, 0.294); mass before each in sorted order: tok1 0, tok3 0.379,
    # tok2 0.673, tok0 0.880, so top-p 0.7 keeps {1, 3, 2} (at T = 1 it kept only {1, 3})
    w = probs.sqrt()[0] / probs.sqrt()[0].sum()
    assert torch.allclose(w, torch.tensor([0.1199, 0.3790, 0.2076, 0.2936]), atol=1e-4)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([next_tokens(logits, 2.0, top_p=0.7, generator=g) for _ in range(300)])
    assert set(draws.tolist()) == {1, 2, 3}


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), float("-inf")]])  # p = 1/4, 3/4, 0
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([next_tokens(logits, 1.0, generator=g) for _ in range(2000)]).flatten()
    assert (draws == 2).sum() == 0
    assert abs((draws == 1).float().mean().item() - 0.75) < 0.04


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(seed=1.5), "seed"),
        (dict(eos_token_id=V), "eos"),
        (dict(max_new_tokens=600), "max_seq_len"),
    ],
)
def test_argument_errors(kw, match):
    model = tiny_preset_model()
    ids = torch.randint(3, V, (1, 5))
    with pytest.raises(SubLLMError, match=match):
        generate(model, ids, **kw)


def test_input_errors_and_edge_cases():
    model = tiny_preset_model()
    with pytest.raises(SubLLMError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(SubLLMError, match="vocabulary"):
        generate(model, torch.tensor([[V]]))
    with pytest.raises(SubLLMError, match="integer token ids"):
        generate(model, torch.zeros(1, 3))
    with pytest.raises(SubLLMError, match="at least one real"):
        generate(model, torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    ids = torch.randint(3, V, (2, 4))
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)
    model.train()
    generate(model, ids, max_new_tokens=2)
    assert model.training  # the mode is restored after generation


class ByteTokenizer:
    """ids 3.. are bytes 0..252; 0, 1, 2 are special (pad, bos, eos)."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def test_text_deltas_hold_back_split_characters():
    tok = ByteTokenizer()
    d = TextDeltas(tok)
    e_acute = "é".encode()  # two bytes
    assert d.push([ord("a") + 3]) == ["a"]
    assert d.push([e_acute[0] + 3]) == [""]  # half a character: held back
    assert d.push([e_acute[1] + 3]) == ["é"]
    assert d.push([0]) == [""]  # pad after a stop: nothing
    assert d.flush() == [""]


def test_stream_text_matches_generate():
    from subllm.inference.generation import stream_text

    model = tiny_preset_model()
    ids = torch.randint(3, 100, (1, 6))
    text = "".join(stream_text(model, ByteTokenizer(), ids, max_new_tokens=8, eos_token_id=None))
    out = generate(model, ids, max_new_tokens=8)
    assert text == ByteTokenizer().decode(out[0, 6:].tolist())


def test_cli(tmp_path, capsys):
    from subllm.cli import main

    checkpoint_with_tokenizer(tmp_path)
    base = ["generate", "--checkpoint", str(tmp_path)]
    assert main([*base, "--prompt", "hello world the cat", "--max-new-tokens", "5"]) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--prompt", "hello world the cat", "--max-new-tokens", "5", "--stream"]) == 0
    assert capsys.readouterr().out == plain  # streaming prints the same text
    assert main([*base, "--prompt", "a cat", "--temperature", "0.8", "--top-k", "5", "--seed", "3"]) == 0
    cases = [
        (["--prompt", "   "], "empty"),
        (["--prompt", "cat " * 600], "max_seq_len"),
        (["--prompt", "cat", "--top-p", "1.5"], "top_p"),
        (["--prompt", "cat", "--temperature", "-1"], "temperature"),
        (["--prompt", "cat", "--top-k", "0"], "top_k"),
        (["--prompt", "cat", "--repetition-penalty", "0"], "repetition_penalty"),
    ]
    for args, match in cases:
        assert main([*base, *args]) == 2
        assert match in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "cat"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    assert main([*base, "--prompt", "cat"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def _recount(model, ids, T):
    """Per-level lengths after the first T tokens of ids (1, n) and after all of them, recounted
    from eval-mode full forwards (Selection.n_kept) - the oracle of `generate --stats`."""
    out = []
    for seq in (ids[:, :T], ids):
        sels = model(seq, return_selections=True).selections
        out.append([[seq.shape[1]]] + [[0] if s is None else s.n_kept.tolist() for s in sels])
    return out


def test_cli_stats_equal_a_full_forward_recount(tmp_path, capsys):
    """`generate --stats`: per-S keep over prompt and generated tokens equals a recount from
    uncached full forwards over prompt + generated tokens, cached, streamed and --no-cache alike."""
    import re

    from subllm.cli import main
    from subllm.data.tokenizer import load_tokenizer
    from subllm.flops import decode_ideal_speedup
    from subllm.model.subllm import SubLLM

    checkpoint_with_tokenizer(tmp_path)
    model = SubLLM.from_pretrained(tmp_path).eval()
    tok = load_tokenizer(tmp_path)
    text = "hello world the cat sat on the mat a cat sat on a mat the world " * 2
    prompt = torch.tensor([tok(text)["input_ids"]])
    T = prompt.shape[1]
    ids = generate(model, prompt, max_new_tokens=12, eos_token_id=tok.eos_token_id)
    before, after = _recount(model, ids, T)
    expected = []
    for i, parent in enumerate([0, 1]):  # TT(T(TT)T)T: S0 reads level 0, S1 level 1
        kp, np_ = before[i + 1][0], before[parent][0]
        kg, ng = after[i + 1][0] - kp, after[parent][0] - np_
        expected.append((kp, np_, kg, ng))
    assert all(0 < k < n for k, n, _, _ in expected)  # a real mix of kept and dropped tokens
    ideal = f"{decode_ideal_speedup(model.config, before, after):.3f}x"
    base = ["generate", "--checkpoint", str(tmp_path), "--prompt", text, "--max-new-tokens", "12", "--stats"]
    base += ["--dtype", "fp32"]  # the recount above runs in fp32
    outputs = []
    for extra in ([], ["--stream"], ["--no-cache"]):
        assert main([*base, *extra]) == 0
        err = capsys.readouterr().err
        found = re.findall(r"keep S(\d): prompt (\d+)/(\d+) = \S+, generated (\d+)/(\d+)", err)
        assert [tuple(int(v) for v in f[1:]) for f in found] == expected, err
        assert [int(f[0]) for f in found] == [0, 1]
        assert f"context {T} -> {ids.shape[1]}): {ideal}" in err, err
        outputs.append([ln for ln in err.splitlines() if ln.startswith(("  keep S", "  decode FLOP"))])
    assert outputs[0] == outputs[1] == outputs[2]
