"""What evaluation clients need from `subllm serve` (issue 21 item 4): `logprobs` and `echo` equal to
the obviously-correct path (one full forward of prompt + completion), `max_tokens: 0` with echo,
prompt lists (one choice per prompt, each equal to its solo generate()), and lm-eval's
`local-completions` backend scoring log-likelihoods through the server at batch size 4 equal to
in-process scoring."""

import json

import httpx
import pytest
import torch
from serve_helpers import LiveServer, prompts, solo, tiny_checkpoint

from subllm.cli.serve import load_server


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_logprobs") / "tiny"
    model, tok = tiny_checkpoint(path)
    return path, model, tok


@pytest.fixture(scope="module")
def server(ckpt):
    batcher, app = load_server(ckpt[0], 8, 64, "fp32", "tiny")
    with LiveServer(app) as s:
        s.batcher = batcher
        yield s


def post(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@torch.no_grad()
def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probabilities of the next token at every position: the eval-mode full forward."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def check_against_forward(model, tok, ids, lp, k, first_is_prompt=True):
    logp = full_forward_logprobs(model, ids)
    n = len(lp["tokens"])
    offset = len(ids) - n  # the returned tokens are the last n of ids
    assert lp["tokens"] == [tok.decode([i]) for i in ids[offset:]]
    for j in range(n):
        t = offset + j
        if t == 0:
            assert first_is_prompt and lp["token_logprobs"][j] is None and lp["top_logprobs"][j] is None
            continue
        assert lp["token_logprobs"][j] == pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-4)
        top = logp[t - 1].topk(k)
        got = lp["top_logprobs"][j]
        assert list(got) == [tok.decode([i]) for i in top.indices.tolist()]
        assert list(got.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:j]) for j in range(n)]


def test_echo_logprobs_equal_the_full_forward(server, ckpt):
    _, model, tok = ckpt
    p = prompts(1, seed=4, lo=20, hi=21)[0]
    want, n = solo(model, tok, p, 6, ignore_eos=True)
    out = post(server, prompt=p, max_tokens=6, temperature=0, echo=True, logprobs=3, ignore_eos=True)
    ch = out["choices"][0]
    gen = [int(x[1:]) for x in want.split()]  # w<id> words: the generated ids
    assert ch["text"] == tok.decode(p, skip_special_tokens=True) + want
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(p) + 6 and out["usage"]["completion_tokens"] == n == 6
    check_against_forward(model, tok, p + gen, lp, 3)
    for j in range(len(p), len(p) + 6):  # greedy: each generated token is its position's top-1, exactly
        assert lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values())

    # without echo: only the generated tokens
    out = post(server, prompt=p, max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == want and lp["top_logprobs"] == [{}] * 6
    logp = full_forward_logprobs(model, p + gen)
    want_lp = [float(logp[len(p) - 1 + j, gen[j]]) for j in range(6)]
    assert lp["token_logprobs"] == pytest.approx(want_lp, abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_only(server, ckpt):
    _, model, tok = ckpt
    text = "w10 w20 w30 w40 w50 w60"
    out = post(server, prompt=text, max_tokens=0, echo=True, logprobs=1)
    ch = out["choices"][0]
    assert ch["text"] == text and ch["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6}
    check_against_forward(model, tok, tok(text)["input_ids"], ch["logprobs"], 1)
    # a whole window (max_seq_len tokens) can be scored
    out = post(server, prompt=[7] * 512, max_tokens=0, echo=True, logprobs=0)
    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == 512


def test_prompt_lists_one_choice_each_equal_solo(server, ckpt):
    _, model, tok = ckpt
    ps = prompts(5, seed=8)
    want = [solo(model, tok, p, 7)[0] for p in ps]
    out = post(server, prompt=ps, max_tokens=7, temperature=0)
    assert [c["index"] for c in out["choices"]] == list(range(5))
    assert [c["text"] for c in out["choices"]] == want
    assert out["usage"]["prompt_tokens"] == sum(map(len, ps))
    # the same, streamed: chunks say which prompt they belong to
    body = {
        "prompt": ps,
        "max_tokens": 7,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts, finished = [""] * 5, set()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        data = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(x) for x in data[:-1]]
    for c in chunks[:-1]:
        assert "usage" in c and c["usage"] is None  # include_usage: every other chunk says null
        (ch,) = c["choices"]
        texts[ch["index"]] += ch["text"]
        if ch["finish_reason"]:
            finished.add(ch["index"])
    assert texts == want and finished == set(range(5))
    assert (
        chunks[-1]["choices"] == []
        and chunks[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]
    )


def test_lm_eval_local_completions_loglikelihood_equals_in_process(server, ckpt):
    """lm-eval's `local-completions` payload (`_create_payload`: echo, logprobs=1, max_tokens=1)
    for a batch of 4 token-id prompts, sent to the server and read back by lm-eval's own
    `parse_logprobs`, equals lm-eval's in-process SUBLLM adapter (log-likelihood and is_greedy).
    (The backend's constructor needs `lm-eval[api]` packages; its payload and parser do not.)"""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from subllm.evals.lm import SubLLMLM

    path, model, tok = ckpt
    greedy, _ = solo(model, tok, tok("w10 w20 w30")["input_ids"], 2, ignore_eos=True)  # "wA wB"
    pairs = [("w10 w20 w30", " w40"), ("w10 w20 w30", " w41 w42"), ("w5 w6", " w7"), ("w9", " w9 w9 w9"),
             ("w100 w101 w102 w103", " w104"), ("w7 w8", " w200"), ("w50", " w51")]  # fmt: skip
    pairs.append(("w10 w20 w30", " " + greedy))
    local_lm = SubLLMLM(model, tok, batch_size=4)
    local = local_lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], True)
    remote = []
    for b in range(0, len(pairs), 4):  # --batch_size 4: one request holds 4 prompts
        encoded = [local_lm._encode_pair(c, x) for c, x in pairs[b : b + 4]]
        tokens = [c + x for c, x in encoded]
        payload = LocalCompletionsAPI._create_payload(SimpleNamespace(model="tiny"), tokens, generate=False)
        out = httpx.post(server.url + "/v1/completions", json=payload, timeout=60)
        assert out.status_code == 200, out.text
        remote += LocalCompletionsAPI.parse_logprobs(out.json(), tokens, [len(c) for c, _ in encoded])
    assert len(remote) == len(local) == len(pairs)
    for (lr, gr), (ll, gl) in zip(remote, local):
        assert lr == pytest.approx(ll, abs=1e-3) and gr == gl
    assert local[-1][1] and not local[0][1]  # both answers of is_greedy occur
