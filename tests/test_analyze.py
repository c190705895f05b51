"""`subllm analyze`: the explicit attention path equals the layer's SDPA, structure bookkeeping,
token classes, and a run on a tiny checkpoint that writes its HTML, figures and JSON."""

import json

import pytest
import torch
from helpers import tiny_model

from subllm.cli import main
from subllm.config import parse_structure
from subllm.evals.analysis import analyze_window, attention_probs, sub_parents_and_layers, token_classes

pytest.importorskip("matplotlib")


def test_sub_parents_and_layers():
    assert sub_parents_and_layers(parse_structure("TT(T(TT)T)T")) == ({0: None, 1: 0}, {0: 1, 1: 2})
    assert sub_parents_and_layers(parse_structure("(T)T(T)(TT)")) == (
        {0: None, 1: None, 2: None},
        {0: None, 1: 1, 2: None},
    )


def test_explicit_attention_equals_sdpa_layer():
    model = tiny_model()
    block = model.layers[2]  # inside S0: runs on the kept tokens only
    captured = {}
    h = block.register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    ids = torch.randint(3, 97, (1, 40))
    with torch.no_grad():
        model(ids)
    h.remove()
    x, cos, sin, mask = captured["args"]
    probs, allowed = attention_probs(block, x, cos, sin, mask)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert not probs[..., ~allowed].any()  # causal: nothing from the future
    _, _, v = block.attn.qkv(block.attn_norm(x), cos, sin)
    v = v.repeat_interleave(block.attn.n_heads // block.attn.n_kv_heads, dim=1)
    o = (probs @ v.float()).transpose(1, 2).reshape(1, x.shape[1], -1)
    with torch.no_grad():
        ref = block.attn(block.attn_norm(x), cos, sin, mask)
    assert (block.attn.wo(o) - ref).abs().max() < 1e-5


def test_analyze_window_matches_model_selection():
    model = tiny_model()
    ids = torch.randint(3, 97, (1, 64))
    per_s = analyze_window(model, ids)
    with torch.no_grad():
        out = model(ids, return_selections=True)
    assert len(per_s) == 2
    assert torch.equal(per_s[0]["pos"], torch.arange(64))
    assert torch.equal(per_s[0]["kept"], out.selections[0].scores[0] > 0)
    assert torch.equal(per_s[1]["pos"], out.selections[0].idx[0])  # S1 sees what S0 kept
    for r, f in zip(per_s, out.keep_fractions):
        assert abs(r["kept"].float().mean().item() - f) < 1e-6
        assert not torch.isnan(r["att"]).any() and (r["att"] > 0).all()


def test_token_classes():
    text = "The cat, 42 times: running."
    spans = [(0, 3), (3, 7), (7, 8), (8, 11), (11, 14), (14, 17), (17, 18), (18, 22), (22, 26), (26, 27)]
    cls = token_classes(text, spans)
    assert cls[0] == {"word-initial", "stop word"}  # "The"
    assert cls[1] == {"word-initial"}  # " cat"
    assert cls[2] == {"punctuation"}  # ","
    assert cls[3] == {"number"}  # " 42"
    assert cls[8] == {"word continuation"}  # "ning"
    assert cls[9] == {"punctuation"}


def test_cli_analyze_writes_files(tmp_path, capsys):
    from subllm.data.tokenizer import train_tokenizer

    text = " ".join(
        f"The {w} of the house came, and it was {n} times older."
        for n, w in enumerate(["king", "queen", "river", "stone", "light"] * 12)
    )
    (tmp_path / "t.txt").write_text(text)
    ck = tmp_path / "ck"
    train_tokenizer([text], vocab_size=300, out_dir=ck)
    tiny_model(vocab_size=300).save_pretrained(ck)
    out = tmp_path / "an"
    args = ["analyze", "--checkpoint", str(ck), "--text", str(tmp_path / "t.txt"), "--out", str(out)]
    assert main([*args, "--seq-len", "100", "--max-tokens", "250"]) == 0
    printed = capsys.readouterr().out
    assert "S0: kept" in printed and "spearman" in printed
    for name in ("tokens.html", "attention_vs_score.png", "keep_by_position.png", "keep_by_class.png"):
        assert (out / name).stat().st_size > 1000, name
    res = json.loads((out / "analysis.json").read_text())
    assert res["tokens"] == 250 and res["seq_len"] == 100 and len(res["per_S"]) == 2
    s0, s1 = res["per_S"]
    assert s0["tokens"] == 250 and s1["tokens"] == s0["kept"] and 0 < s0["kept"] < 250
    assert -1 <= s0["spearman_attention_score"] <= 1 and s0["mean_attention_kept"] > 0
    assert {"punctuation", "stop word", "word-initial", "number"} <= set(s0["keep_by_class"])
    html = (out / "tokens.html").read_text()
    assert html.count("<span title=") == 250 and "S1:" in html
    llama = tmp_path / "llama"
    tiny_model(structure="TTT", keep_ratio=1.0, vocab_size=300).save_pretrained(llama)
    assert (
        main(["analyze", "--checkpoint", str(llama), "--text", str(tmp_path / "t.txt"), "--out", str(out)])
        == 2
    )
    assert "no subsampling module" in capsys.readouterr().err
