"""`--dtype auto` by measurement (subllm/dtype_calibration.py): the timings are monkeypatched, so
every branch - cache miss, cache hit, key contents, the rule as the fallback - is tested on any CPU.
The real timing code runs once per work on a tiny model; its numbers are never asserted."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_with_tokenizer, tiny_preset_model

from subllm import dtype as D
from subllm import dtype_calibration as C

NATIVE = {"cpu_capability": "AVX512", "cpu_native_bf16": True}
AVX2 = {"cpu_capability": "AVX2", "cpu_native_bf16": False}


@pytest.fixture(autouse=True)
def _calibration_on(monkeypatch, tmp_path):
    monkeypatch.setenv(C.ENV_SWITCH, "on")
    monkeypatch.setenv(C.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(D, "cpu_probe", lambda: dict(NATIVE))


def fake_timings(monkeypatch, seconds: dict) -> list:
    """measure() returns `seconds`; the returned list records every call (model, dtypes, work)."""
    calls = []

    def measure(model, dtypes, work, device="cpu", rounds=C.ROUNDS):
        calls.append((model, list(dtypes), work))
        return {d: seconds[d] for d in dtypes}

    monkeypatch.setattr(C, "measure", measure)
    return calls


def test_miss_measures_saves_and_picks_the_faster(monkeypatch, tmp_path):
    model = tiny_preset_model()
    calls = fake_timings(monkeypatch, {"fp32": 0.004, "bf16": 0.002})
    logs = []
    c = C.choose_dtype("auto", model, "decode", log=logs.append)
    assert (c.dtype, c.source) == ("bf16", "measured") and calls == [(model, ["fp32", "bf16"], "decode")]
    assert c.seconds == {"fp32": 0.004, "bf16": 0.002}
    assert "bf16 (auto, measured now: decode fp32 4.00 ms, bf16 2.00 ms" in c.line
    assert len(logs) == 1 and "calibrating --dtype auto for decode" in logs[0]
    path = tmp_path / "cache" / C.FILE_NAME
    assert c.path == str(path)
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    assert entry["dtype"] == "bf16" and entry["seconds"] == {"fp32": 0.004, "bf16": 0.002}
    # the key: machine (capability, native bf16, cores, threads, torch), model shape, work
    key = entry["key"]
    assert key == c.key and key["work"] == "decode"
    assert key["machine"] == {
        **NATIVE, "cores": __import__("os").cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }  # fmt: skip
    cfg = model.config
    assert key["model"] == {
        "structure": cfg.structure, "keep_ratios": list(cfg.keep_ratios), "dim": cfg.dim,
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size, "tie_embeddings": cfg.tie_embeddings,
        "weights": ["float32"], "quantization": None,
    }  # fmt: skip
    # the slower dtype loses, whichever it is
    calls2 = fake_timings(monkeypatch, {"fp32": 0.001, "bf16": 0.003})
    assert C.choose_dtype("auto", model, "prefill").dtype == "fp32" and calls2[0][2] == "prefill"


def test_hit_reads_the_cache_without_measuring(monkeypatch):
    model = tiny_preset_model()
    fake_timings(monkeypatch, {"fp32": 0.004, "bf16": 0.002})
    first = C.choose_dtype("auto", model, "decode")
    calls = fake_timings(monkeypatch, {"fp32": 0.001, "bf16": 0.009})  # would now pick fp32
    again = C.choose_dtype("auto", model, "decode", log=lambda m: pytest.fail(m))
    assert calls == [] and (again.dtype, again.source) == ("bf16", "cached")
    assert again.seconds == first.seconds and again.path == first.path and "auto, measured 20" in again.line
    # another work, another shape, another thread count: each a miss of its own
    assert C.choose_dtype("auto", model, "train").dtype == "fp32"
    other = tiny_preset_model("TT(TT)T")
    assert C.choose_dtype("auto", other, "decode").source == "measured"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert C.choose_dtype("auto", model, "decode").source == "measured"
    assert len(calls) == 3
    entries = C.load_entries(Path(first.path))
    assert len(entries) == 4


def test_the_rule_decides_without_a_measurement(monkeypatch):
    model = tiny_preset_model()
    calls = fake_timings(monkeypatch, {"fp32": 9.0, "bf16": 1.0})
    # explicit dtypes are kept
    assert C.choose_dtype("fp32", model, "decode").dtype == "fp32"
    assert C.choose_dtype("bf16", model, "decode").dtype == "bf16"
    # a GPU: the rule (bf16 where supported)
    monkeypatch.setattr(D, "cuda_bf16", lambda: True)
    assert C.choose_dtype("auto", model, "decode", "cuda").dtype == "bf16"
    # switched off: the rule, which decodes in fp32 on a CPU and trains in bf16 with native bf16
    monkeypatch.setenv(C.ENV_SWITCH, "off")
    c = C.choose_dtype("auto", model, "decode")
    assert (c.dtype, c.source) == ("fp32", "rule") and f"{C.ENV_SWITCH}=off" in c.line
    assert C.choose_dtype("auto", model, "train").dtype == "bf16"
    assert C.choose_dtype("auto", model, "prefill").dtype == "bf16"
    # one candidate only (no native bf16): nothing to measure
    monkeypatch.setenv(C.ENV_SWITCH, "on")
    monkeypatch.setattr(D, "cpu_probe", lambda: dict(AVX2))
    assert C.candidates() == ["fp32"]
    assert C.choose_dtype("auto", model, "decode").source == "rule"
    assert calls == []
    with pytest.raises(ValueError):
        C.choose_dtype("auto", model, "serve")


def test_a_failing_measurement_falls_back_to_the_rule(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no bf16 kernel")

    monkeypatch.setattr(C, "measure", boom)
    c = C.choose_dtype("auto", tiny_preset_model(), "decode")
    assert (c.dtype, c.source) == ("fp32", "rule")
    assert "calibration failed: RuntimeError: no bf16 kernel" in c.line
    assert not C.cache_path().exists()  # nothing cached: the next run measures again


def test_unreadable_or_unwritable_cache(monkeypatch, tmp_path):
    model = tiny_preset_model()
    fake_timings(monkeypatch, {"fp32": 0.004, "bf16": 0.002})
    path = C.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert C.choose_dtype("auto", model, "decode").source == "measured"  # read as empty, rewritten
    assert len(C.load_entries(path)) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(C.ENV_CACHE_DIR, str(blocker / "sub"))  # a directory below a file: unwritable
    logs = []
    c = C.choose_dtype("auto", model, "decode", log=logs.append)
    assert c.dtype == "bf16" and any("could not write" in m for m in logs)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(C.ENV_CACHE_DIR, str(tmp_path / "x"))
    assert C.cache_path() == tmp_path / "x" / "dtype_calibration.json"
    monkeypatch.delenv(C.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.cache_path() == tmp_path / "xdg" / "subllm" / "dtype_calibration.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    default = C.cache_path()
    assert default == Path.home() / ".cache" / "subllm" / "dtype_calibration.json"
    repo = Path(__file__).resolve().parents[1]
    assert not default.resolve().is_relative_to(repo)


@pytest.mark.parametrize("work", C.WORKS)
def test_real_measurement_runs_and_leaves_the_model_alone(work, monkeypatch):
    """The timing code itself on a tiny model: finite positive seconds per candidate (no value
    asserted), the model's weights, mode and gradients untouched."""
    monkeypatch.setattr(C, "DECODE_STEPS", 2)
    monkeypatch.setattr(C, "PREFILL", 16)
    monkeypatch.setattr(C, "TRAIN_LEN", 16)
    model = tiny_preset_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sec = C.measure(model, ["fp32", "bf16"], work, rounds=2)
    assert set(sec) == {"fp32", "bf16"} and all(0 < s < math.inf for s in sec.values())
    assert model.training and all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_generate_cli_uses_and_prints_the_measured_choice(monkeypatch, tmp_path, capsys):
    import subllm.cli.generate as G
    from subllm.cli import main

    checkpoint_with_tokenizer(tmp_path / "ck")
    calls = fake_timings(monkeypatch, {"fp32": 0.004, "bf16": 0.002})
    used = []
    real = G.autocast
    monkeypatch.setattr(G, "autocast", lambda dtype, device="cpu": used.append(dtype) or real(dtype, device))
    args = ["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "the cat", "--max-new-tokens", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert used == ["bf16"] and len(calls) == 1
    assert "calibrating --dtype auto for decode" in err and "bf16 (auto, measured now" in err
    assert main(args) == 0  # the second run reads the cache
    err = capsys.readouterr().err
    assert used == ["bf16", "bf16"] and len(calls) == 1 and "bf16 (auto, measured 20" in err
    assert main([*args, "--dtype", "fp32"]) == 0 and used[-1] == "fp32" and len(calls) == 1


def test_the_decode_path_is_part_of_the_decode_key(monkeypatch):
    """An answer timed through per-layer ops is not reused once the native runs of layers decode
    (or the other way round); prefill and train keys never load the native build."""
    from subllm.inference import native_layers

    model = tiny_preset_model("TT(TT)T")
    monkeypatch.setattr(native_layers, "status", lambda device="cpu": "native runs of layers (fp32 decode)")
    key = C.calibration_key(model, "decode")
    monkeypatch.setattr(native_layers, "status", lambda device="cpu": "per-layer ops")
    assert C.calibration_key(model, "decode") != key
    monkeypatch.setattr(C, "_decode_path", lambda: pytest.fail("prefill / train keys read the decode path"))
    assert C.calibration_key(model, "train")["setting"] == {"tokens": C.TRAIN_LEN}
    assert C.calibration_key(model, "prefill")["setting"] == {"prompt": C.PREFILL}
