"""Weight-only int8 (subllm/inference/quantize.py): the fast Int8Linear against its dequantized slow
path and against the fp32 layer within the rounding bound; a quantized tiny model's logits within a
stated tolerance of fp32's, with the same selections; cached == uncached on it; unquantized paths
unchanged; `generate --quantize int8`."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import checkpoint_with_tokenizer, left_padded, tiny_preset_model
from torch import nn

from subllm import SubLLMError, generate
from subllm.inference.quantize import Int8Linear, apply_quantization, quantize_int8_

# End-to-end tolerance of int8 logits against fp32 on the tiny random models below (logits' std
# ~0.15, max ~0.6; measured max |diff| ~0.009, RMS diff / std ~0.015): stated with ~2x margin.
MAX_ABS, REL_RMS = 0.02, 0.03


def test_int8_linear_equals_its_dequantized_weight_and_the_rounding_bound():
    torch.manual_seed(0)
    lin = nn.Linear(48, 20, bias=False)
    with torch.no_grad():
        lin.weight[3] = 0.0  # an all-zero row stays zero (no division by a zero scale)
        lin.weight[5] *= 50.0  # rows of very different ranges get their own scales
    q = Int8Linear.from_linear(lin)
    assert q.q.dtype == torch.int8 and q.scale.shape == (20,) and int(q.q.abs().max()) == 127
    x = torch.randn(2, 7, 48)
    fast = q(x)
    slow = F.linear(x, q.dequantized())  # the obviously-correct path: x @ (q * s)^T
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    exact = lin(x)
    bound = q.scale / 2 * x.abs().sum(-1, keepdim=True)  # |round error| <= s/2 per weight
    assert ((fast - exact).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert (fast[..., 3] == 0).all()
    assert (q.dequantized() - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7
    with torch.autocast("cpu", dtype=torch.bfloat16):  # runs under autocast; bf16 rounding only
        torch.testing.assert_close(q(x).float(), slow, rtol=0.05, atol=0.05)
    # the blocked path (output channels cast a block at a time, the last block ragged) is the same
    for block in (48, 48 * 3, 100):
        q.BLOCK = block
        torch.testing.assert_close(q(x), slow, rtol=1e-5, atol=1e-6)
    with pytest.raises(SubLLMError, match="bias"):
        Int8Linear.from_linear(nn.Linear(4, 4))


def _logits(model, ids, mask):
    with torch.no_grad():
        out = model(ids, mask, return_selections=True)
    return out.logits[mask.bool()], out.selections


@pytest.mark.parametrize("structure", ["TTTTTTT", "TT(T(TT)T)T"])
def test_quantized_logits_within_tolerance_of_fp32(structure):
    model = tiny_preset_model(structure)
    q = quantize_int8_(copy.deepcopy(model))
    ids, mask = left_padded([30, 20])
    ref, sel_ref = _logits(model, ids, mask)
    got, sel_got = _logits(q, ids, mask)
    for a, b in zip(sel_ref, sel_got):  # the same tokens kept at every S
        assert torch.equal(a.idx, b.idx) and torch.equal(a.n_kept, b.n_kept)
    diff = got - ref
    assert diff.abs().max() <= MAX_ABS
    assert diff.pow(2).mean().sqrt() <= REL_RMS * ref.std()
    assert diff.abs().max() > 0  # it really is quantized
    # what was replaced: every linear of the layers and the head; scores and embedding stay fp32
    assert not any(type(m) is nn.Linear for m in q.layers.modules())
    assert isinstance(q.head, Int8Linear) and q.embed.weight.dtype == torch.float32
    assert all(s.score.weight.dtype == torch.float32 for s in q.subsamples)
    assert q.quantization == "int8"


def test_cached_equals_uncached_on_a_quantized_model():
    q = quantize_int8_(tiny_preset_model())
    ids, mask = left_padded([14, 6, 10])
    kw = dict(max_new_tokens=8, return_logits=True)
    from subllm.inference.generation import stream_generate

    c = list(stream_generate(q, ids, mask, use_cache=True, **kw))
    u = list(stream_generate(q, ids, mask, use_cache=False, **kw))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(c, u))
    assert max(float((la - lb).abs().max()) for (_, la), (_, lb) in zip(c, u)) < 1e-5


def test_tied_head_gets_its_own_copy():
    model = tiny_preset_model()
    tied = type(model)(model.config.replace(tie_embeddings=True)).eval()
    emb = tied.embed.weight.detach().clone()
    quantize_int8_(tied)
    assert isinstance(tied.head, Int8Linear) and torch.equal(tied.embed.weight, emb)
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        tied(ids)


def test_unquantized_paths_are_unchanged_and_errors():
    model = tiny_preset_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_quantization(model, "none") is model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.head, nn.Linear) and getattr(model, "quantization", None) is None
    with pytest.raises(SubLLMError, match="--quantize must be one of none, int8"):
        apply_quantization(model, "int4")
    q = apply_quantization(copy.deepcopy(model), "int8")
    with pytest.raises(SubLLMError, match="already quantized"):
        quantize_int8_(q)
    with pytest.raises(SubLLMError, match="inference only"):
        q.save_pretrained("/nonexistent")


def test_generate_cli_quantize(tmp_path, capsys):
    from subllm.cli import main
    from subllm.data.tokenizer import load_tokenizer
    from subllm.model.subllm import SubLLM

    checkpoint_with_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    prompt = "hello world the cat sat on the mat"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    model = SubLLM.from_pretrained(tmp_path).eval()
    kw = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id)
    base = ["generate", "--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6"]
    expected = {}
    for name, m in (("none", model), ("int8", quantize_int8_(copy.deepcopy(model)))):
        out = generate(m, ids, **kw)[0, ids.shape[1] :]
        expected[name] = tok.decode(out.tolist(), skip_special_tokens=True)
    assert main([*base, "--dtype", "fp32"]) == 0  # the default: no quantization
    cap = capsys.readouterr()
    assert cap.out.strip() == expected["none"].strip() and "int8" not in cap.err
    assert main([*base, "--dtype", "fp32", "--quantize", "int8"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == expected["int8"].strip() and "int8 weights" in cap.err


def test_serve_loads_a_quantized_model(tmp_path):
    from subllm.cli.serve import load_server

    checkpoint_with_tokenizer(tmp_path)
    batcher, _ = load_server(tmp_path, 2, 2, "fp32", "tiny", quantize="int8")
    assert isinstance(batcher.model.head, Int8Linear) and batcher.model.quantization == "int8"
    batcher, _ = load_server(tmp_path, 2, 2, "fp32", "tiny")
    assert type(batcher.model.head) is nn.Linear
