"""`--dtype auto` (subllm/dtype.py): bf16 only where the hardware does bf16 natively. The hardware
probes are monkeypatched, so every branch is tested on whatever CPU runs the suite."""

import pytest
import torch

from subllm import SubLLMError
from subllm import dtype as D
from subllm.trainer.config import TrainConfig, build_config

NATIVE = {"cpu_capability": "AVX512", "cpu_native_bf16": True}
AVX2 = {"cpu_capability": "AVX2", "cpu_native_bf16": False}


@pytest.fixture(autouse=True)
def _fresh_caches():
    D.cpu_probe.cache_clear()
    D._warn_slow_bf16.cache_clear()
    yield
    D.cpu_probe.cache_clear()
    D._warn_slow_bf16.cache_clear()


def _cpu(monkeypatch, facts: dict) -> None:
    monkeypatch.setattr(D, "cpu_probe", lambda: dict(facts))


def test_auto_on_cpu_follows_native_bf16(monkeypatch, capsys):
    _cpu(monkeypatch, NATIVE)
    assert D.resolve_dtype("auto", "cpu") == "bf16"
    _cpu(monkeypatch, AVX2)
    assert D.resolve_dtype("auto", "cpu") == "fp32"
    assert D.resolve_dtype("fp32", "cpu") == "fp32"
    assert capsys.readouterr().err == ""  # auto never warns


def test_auto_on_cuda_follows_cuda_bf16(monkeypatch):
    _cpu(monkeypatch, AVX2)  # the CPU does not matter on a GPU
    monkeypatch.setattr(D, "cuda_bf16", lambda: True)
    assert D.resolve_dtype("auto", "cuda") == D.resolve_dtype("auto", "cuda:1") == "bf16"
    assert D.resolve_dtype("auto", "cpu") == "fp32"
    monkeypatch.setattr(D, "cuda_bf16", lambda: False)
    assert D.resolve_dtype("auto", "cuda:0") == "fp32"


def test_explicit_bf16_on_a_cpu_without_it_warns_once(monkeypatch, capsys):
    _cpu(monkeypatch, NATIVE)
    assert D.resolve_dtype("bf16", "cpu") == "bf16"
    assert capsys.readouterr().err == ""
    _cpu(monkeypatch, AVX2)
    monkeypatch.setattr(D, "cuda_bf16", lambda: True)
    assert D.resolve_dtype("bf16", "cuda") == "bf16"
    assert capsys.readouterr().err == ""  # a GPU run is not slowed by the CPU
    assert D.resolve_dtype("bf16", "cpu") == D.resolve_dtype("bf16", "cpu") == "bf16"  # kept: asked for
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "AVX2" in err and "--dtype auto or fp32" in err


@pytest.mark.parametrize("name", ["fp16", "float16", "", "BF16"])
def test_unknown_name_is_a_one_line_error(name):
    with pytest.raises(SubLLMError, match=r"--dtype must be one of auto, bf16, fp32") as e:
        D.resolve_dtype(name, "cpu")
    assert "\n" not in str(e.value)


def test_train_config_defaults_to_auto():
    assert TrainConfig().dtype == "auto" and build_config({"data": "x"}).dtype == "auto"
    assert build_config({"data": "x", "dtype": "fp32"}).dtype == "fp32"
    with pytest.raises(SubLLMError, match="--dtype must be one of auto, bf16, fp32"):
        build_config({"data": "x", "dtype": "fp16"})


def test_trainer_autocast_follows_the_resolved_dtype(monkeypatch):
    from subllm.trainer.loop import _autocast_factory

    _cpu(monkeypatch, AVX2)
    with _autocast_factory("auto", "cpu")():
        assert not torch.is_autocast_enabled("cpu")
    _cpu(monkeypatch, NATIVE)
    with _autocast_factory("auto", "cpu")():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_probe_on_this_machine_and_its_records(monkeypatch):
    facts = D.describe_hardware()
    assert isinstance(facts["cpu_capability"], str) and isinstance(facts["cpu_native_bf16"], bool)
    assert D.resolve_dtype("auto", "cpu") == ("bf16" if facts["cpu_native_bf16"] else "fp32")
    _cpu(monkeypatch, AVX2)
    rec = D.dtype_record("auto")
    rec.pop("cuda_bf16", None)  # only where torch sees a GPU
    assert rec == {"dtype": "fp32", "dtype_requested": "auto", **AVX2}
    assert D.dtype_line("auto") == "fp32 (auto; cpu AVX2, no native bf16)"


def test_probe_rules(monkeypatch):
    """oneDNN says yes on AVX512 without bf16 instructions (emulated): the x86 flags decide; a
    failing private API reads as 'no native bf16'."""

    def boom():
        raise RuntimeError("gone")

    monkeypatch.setattr(D.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert D.cpu_probe() == {"cpu_capability": "AVX512", "cpu_native_bf16": False}  # Skylake-X
    D.cpu_probe.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert D.cpu_probe() == NATIVE  # Cooper Lake, Sapphire Rapids, Zen 4
    D.cpu_probe.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", boom)
    assert D.cpu_probe()["cpu_native_bf16"]  # flags unknown: AVX512 + oneDNN bf16
    D.cpu_probe.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert D.cpu_probe() == AVX2
    D.cpu_probe.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", boom)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", boom)
    assert D.cpu_probe() == {"cpu_capability": "unknown", "cpu_native_bf16": False}
    D.cpu_probe.cache_clear()
    monkeypatch.setattr(D.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "SVE256")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert D.cpu_probe() == {"cpu_capability": "SVE256", "cpu_native_bf16": True}  # oneDNN decides


def test_auto_decodes_in_fp32_on_any_cpu(monkeypatch):
    """Decoding (generate, serve, bench infer) on a CPU: fp32 even with native bf16; explicit bf16
    is honoured; a GPU decodes in bf16 where it has it."""
    _cpu(monkeypatch, NATIVE)
    assert D.resolve_dtype("auto", "cpu", "decode") == "fp32"
    assert D.resolve_dtype("bf16", "cpu", "decode") == "bf16"
    assert "decoding on a CPU" in D.dtype_line("auto", "cpu", "decode")
    monkeypatch.setattr(D, "cuda_bf16", lambda: True)
    assert D.resolve_dtype("auto", "cuda", "decode") == "bf16"
    with pytest.raises(ValueError):
        D.resolve_dtype("auto", "cpu", "prefill")
