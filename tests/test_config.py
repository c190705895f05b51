"""ModelConfig, the structure parser and PRESETS."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subllm import PRESETS, ModelConfig, SubLLMError, parse_structure
from subllm.config import Sub, get_preset, iter_subs, keep_count


def test_parse_nested():
    tree = parse_structure("TT(T(TT)T)T")
    assert tree == (0, 1, Sub(0, (2, Sub(1, (3, 4)), 5)), 6)


@pytest.mark.parametrize(
    "structure, fragment",
    [
        ("TT)", "unbalanced ')' at position 2"),
        ("T(TT", "unclosed '(' at position 1"),
        ("T()T", "empty brackets at positions 1-2"),
        ("TXT", "invalid character 'X' at position 1"),
        ("()", "empty brackets"),
        ("", "non-empty"),
    ],
)
def test_parse_errors_name_position(structure, fragment):
    with pytest.raises(SubLLMError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_structure(structure)


def test_no_layer_at_all():
    with pytest.raises(SubLLMError):
        parse_structure("(())")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(keep_ratio=0.0), "keep ratio"),
        (dict(keep_ratio=1.5), "keep ratio"),
        (dict(keep_ratio=[0.5]), "has 1 values but structure"),
        (dict(dim=100, n_heads=3), "not divisible by n_heads"),
        (dict(n_heads=16, n_kv_heads=5), "not divisible by n_kv_heads"),
        (dict(vocab_size=0), "positive integer"),
    ],
)
def test_config_errors(kwargs, fragment):
    with pytest.raises(SubLLMError, match=fragment):
        ModelConfig(**kwargs)


def test_keep_ratio_list_and_roundtrip():
    c = ModelConfig(structure="T(T(T)T)T", keep_ratio=[0.75, 0.5], dim=64, n_heads=4, ffn_dim=128)
    assert c.keep_ratios == [0.75, 0.5]
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(SubLLMError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_as_llama_and_presets():
    s = PRESETS["subllm-1.3b"]
    assert s.structure == "TTTTT(TTTTT(TTTT)TTTTT)TTTTT" and s.keep_ratios == [0.64, 0.64]
    assert (s.dim, s.ffn_dim, s.n_heads, s.head_dim, s.vocab_size, s.max_seq_len) == (
        2048,
        5504,
        16,
        128,
        32000,
        4096,
    )
    llama = s.as_llama()
    assert llama.structure == "T" * 24 and llama.n_subsamples == 0
    assert PRESETS["llama-1.3b"] == llama
    assert PRESETS["llama-small"] == PRESETS["subllm-small"].as_llama()
    assert PRESETS["subllm-small"].structure == s.structure
    with pytest.raises(SubLLMError, match="unknown preset"):
        get_preset("nope")


def test_keep_count_float_safety():
    assert keep_count(100, 0.64) == 64
    assert keep_count(25, 0.64) == 16  # 16.0 exactly
    assert keep_count(7, 0.5) == 4
    assert keep_count(3, 1.0) == 3


# ---- property tests --------------------------------------------------------------------------
def _render(tree) -> str:
    return "".join("T" if isinstance(n, int) else "(" + _render(n.children) + ")" for n in tree)


structures = st.recursive(
    st.just("T"),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=4).map("".join),
        inner.map(lambda s: "(" + s + ")"),
    ),
    max_leaves=12,
).filter(lambda s: "T" in s)


@given(structures)
def test_parser_roundtrip(structure):
    tree = parse_structure(structure)
    assert _render(tree) == structure
    subs = list(iter_subs(tree))
    assert [s.index for s in subs] == list(range(structure.count("(")))
    layers = []

    def walk(t):
        for n in t:
            layers.append(n) if isinstance(n, int) else walk(n.children)

    walk(tree)
    assert layers == list(range(structure.count("T")))


@given(st.text(alphabet="T()x", min_size=1, max_size=12))
def test_parser_accepts_or_raises_clearly(s):
    try:
        parse_structure(s)
    except SubLLMError as e:
        assert "position" in str(e) or "no layer" in str(e)
