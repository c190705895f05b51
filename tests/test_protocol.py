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
    assert parse(prompt=[0, V - 1]).prompts == [[0, V - 1]]
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


def test_tiny_temperature_is_greedy_and_penalty_bounds():
    assert parse(prompt=[5], temperature=0.99e-5).settings.temperature == 0.0  # vLLM: < 1e-5 is greedy
    assert parse(prompt=[5], temperature=5e-324).settings.temperature == 0.0
    assert parse(prompt=[5], temperature=1e-5).settings.temperature == 1e-5
    assert parse(prompt=[5], repetition_penalty=0.01).settings.repetition_penalty == 0.01
    assert parse(prompt=[5], repetition_penalty=100).settings.repetition_penalty == 100
    for bad in (0.0099, 1e-308, 100.01, 0):
        assert "[0.01, 100]" in refused("repetition_penalty", prompt=[5], repetition_penalty=bad)


def test_echo_logprobs_boundaries():
    assert parse(prompt=[5], logprobs=0).settings.logprobs == 0
    assert parse(prompt=[5], logprobs=20).settings.logprobs == 20
    assert "cap is 20" in refused("logprobs", prompt=[5], logprobs=21)
    refused("logprobs", prompt=[5], logprobs=-1)
    refused("logprobs", prompt=[5], logprobs=True)
    got = parse(prompt=[5] * L, echo=True, max_tokens=0)  # a whole window scored, nothing generated
    assert got.settings.echo and got.settings.max_tokens == 0
    assert parse(prompt=[5] * L, echo=True).settings.max_tokens == 0  # the default leaves no room
    assert "0 only with echo" in refused("max_tokens", prompt=[5], max_tokens=0)
    refused("prompt", prompt=[5] * (L + 1), echo=True)
    refused("max_tokens", prompt=[5] * L, echo=True, max_tokens=1)


def test_prompt_lists():
    got = parse(prompt=[[5, 6], [7]], max_tokens=2)
    assert got.prompts == [[5, 6], [7]] and got.texts == [None, None]
    assert parse(prompt=[[5]]).prompts == [[5]]
    assert parse(prompt=[[5]] * 256).prompts == [[5]] * 256
    assert "at most 256" in refused("prompt", prompt=[[5]] * 257)
    assert "you requested 17" in refused("max_tokens", prompt=[[5], [5] * 10], max_tokens=7)  # the longest
    refused("prompt", prompt=[[5], []])
