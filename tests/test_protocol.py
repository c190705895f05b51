"""The request checks of the completions endpoint (subllm/serve/protocol.py) at their boundaries:
each limit accepted exactly at its edge and refused one past it, without a server."""

import pytest

from subllm.serve.protocol import APIError, parse_completion

V, L = 50, 16  # vocabulary size, max_seq_len


def parse(**body):
    return parse_completion(body, None, vocab_size=V, max_seq_len=L, model_name="tiny")


def refused(param, **body) -> str:
    with pytest.raises(APIError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)
    return e.value.message


def test_context_length_boundaries():
    assert parse(prompt=[5] * 10, max_tokens=6).settings.max_tokens == 6  # 10 + 6 == max_seq_len
    assert "you requested 17" in refused("max_tokens", prompt=[5] * 10, max_tokens=7)
    assert parse(prompt=[5] * (L - 1)).settings.max_tokens == 1  # room for exactly one new token
    assert "room for no new token" in refused("prompt", prompt=[5] * L)


def test_token_id_boundaries():
    assert parse(prompt=[0, V - 1]).prompt == [0, V - 1]
    assert f"token id {V} is outside" in refused("prompt", prompt=[3, V])
    assert "token id -1 is outside" in refused("prompt", prompt=[-1, 3])


def test_seed_boundaries():
    assert parse(prompt=[5], seed=0).settings.seed == 0
    assert parse(prompt=[5], seed=2**63 - 1).settings.seed == 2**63 - 1
    refused("seed", prompt=[5], seed=2**63)
    refused("seed", prompt=[5], seed=-1)


def test_stream_options_only_with_stream():
    usage = {"include_usage": True}
    got = parse(prompt=[5], stream=True, stream_options=usage)
    assert got.stream and got.include_usage
    assert "only allowed with stream=true" in refused("stream_options", prompt=[5], stream_options=usage)
    refused("stream_options", prompt=[5], stream=False, stream_options=usage)
