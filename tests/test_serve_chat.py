"""`/v1/chat/completions` (issue 21 item 5): messages through the checkpoint's chat template (saved
as chat_template.jinja, or in tokenizer_config.json) equal `generate()` on the prompt rendered by
hand; OpenAI's chat.completion and chat.completion.chunk shapes (the openai client reads both);
logprobs equal a full forward; a clear 400 without a template, for bad messages and for a template
that refuses them; the API key and the body and context limits hold as for /v1/completions."""

import json

import httpx
import pytest
import torch
from serve_helpers import LiveServer, solo, tiny_checkpoint

from subllm.cli.serve import load_server
from subllm.serve.app import Limits

# the tiny vocabulary is w4 .. w255: roles and turn ends are words too
TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('a conversation starts with a system or user message') }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}w4 {% elif m['role'] == 'user' %}w5 {% else %}w6 {% endif %}"
    "{{ m['content'] }} w7 {% endfor %}"
    "{% if add_generation_prompt %}w6{% endif %}"
)
ROLE_WORD = {"system": "w4", "developer": "w4", "user": "w5", "assistant": "w6"}
CHAT = [
    {"role": "system", "content": "w30 w31"},
    {"role": "user", "content": "w40 w41 w42"},
    {"role": "assistant", "content": "w50"},
    {"role": "user", "content": [{"type": "text", "text": "w60"}, {"type": "text", "text": "w61"}]},
]


def by_hand(messages) -> str:
    """What TEMPLATE renders, written out: the obviously-correct prompt."""
    parts = []
    for m in messages:
        c = m["content"] if isinstance(m["content"], str) else "\n".join(p["text"] for p in m["content"])
        parts += [ROLE_WORD[m["role"]], c, "w7"]
    return " ".join([*parts, "w6"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_chat")
    model, tok = tiny_checkpoint(root / "plain")  # no template
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(root / "chat"))
    model.save_pretrained(root / "chat")
    assert (root / "chat" / "chat_template.jinja").is_file()
    # the same template inside tokenizer_config.json (older checkpoints keep it there)
    tok.save_pretrained(str(root / "config_template"))
    model.save_pretrained(root / "config_template")
    (root / "config_template" / "chat_template.jinja").unlink()
    cfg_path = root / "config_template" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return root, model, tok


@pytest.fixture(scope="module")
def server(ckpt):
    batcher, app = load_server(ckpt[0] / "chat", 8, 64, "fp32", "tiny")
    with LiveServer(app) as s:
        s.batcher = batcher
        yield s


def chat(url, headers=None, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_template_renders_as_by_hand(ckpt):
    from subllm.data.tokenizer import load_tokenizer
    from subllm.serve.chat import check_messages, render

    root, _, tok = ckpt
    want = tok(by_hand(CHAT))["input_ids"]
    for folder in ("chat", "config_template"):
        loaded = load_tokenizer(root / folder)
        got = render(loaded, check_messages(CHAT))
        assert got == want and len(got) == 17
        msgs = check_messages(CHAT)  # transformers' own tokenizing path agrees
        assert got == list(loaded.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])


def test_chat_json_and_stream_equal_solo_generate(server, ckpt):
    _, model, tok = ckpt
    ids = tok(by_hand(CHAT))["input_ids"]
    want, n = solo(model, tok, ids, 10)
    assert want
    r = chat(server.url, model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == "tiny" and isinstance(out["created"], int)
    (c,) = out["choices"]
    assert c["index"] == 0 and c["message"] == {"role": "assistant", "content": want}
    assert c["logprobs"] is None and c["finish_reason"] == ("stop" if n < 10 else "length")
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

    body = {"messages": CHAT, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(x) for x in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert len(deltas) > 1 and all(set(d) == {"content"} for d in deltas)  # really streamed
    assert "".join(d["content"] for d in deltas) == want
    end = chunks[-2]["choices"][0]
    assert end["delta"] == {} and end["finish_reason"] == c["finish_reason"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == out["usage"]


def test_openai_client_chat(server, ckpt):
    from openai import OpenAI

    _, model, tok = ckpt
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "w20 w21 w22"}]
    ids = tok(by_hand(msgs))["input_ids"]
    kw = dict(temperature=0.9, top_p=0.9, seed=7)  # seeded sampling equals seeded generate()
    want, _ = solo(model, tok, ids, 8, **kw)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=8, **kw)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want

    # no max_tokens: the rest of the context (OpenAI and vLLM), here until eos
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0)
    full, n = solo(model, tok, ids, 512 - len(ids))
    assert r.choices[0].message.content == full and r.usage.completion_tokens == n


def test_chat_logprobs_equal_the_full_forward(server, ckpt):
    _, model, tok = ckpt
    msgs = [{"role": "user", "content": "w90 w91"}]
    ids = tok(by_hand(msgs))["input_ids"]
    want, _ = solo(model, tok, ids, 5, ignore_eos=True)
    r = chat(server.url, messages=msgs, max_tokens=5, temperature=0, ignore_eos=True, logprobs=True,
             top_logprobs=3)  # fmt: skip
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    gen = [int(w[1:]) for w in want.split()]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0].float(), -1)
    assert [e["token"] for e in content] == want.split()
    for j, e in enumerate(content):
        row = logp[len(ids) - 1 + j]
        assert e["logprob"] == pytest.approx(float(row[gen[j]]), abs=1e-4)
        assert e["bytes"] == list(e["token"].encode())
        top = row.topk(3)
        assert [t["token"] for t in e["top_logprobs"]] == [f"w{i}" for i in top.indices.tolist()]
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert (
        chat(server.url, messages=msgs, max_tokens=2, logprobs=True).json()["choices"][0]["logprobs"][
            "content"
        ][0]["top_logprobs"]
        == []
    )


U = [{"role": "user", "content": "w5"}]


def user(content, **kw) -> list[dict]:
    return [{"role": "user", "content": content, **kw}]


BAD = [
    ({}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "w5"}, "messages", "non-empty list"),
    ({"messages": ["w5"]}, "messages", "messages[0] must be an object"),
    ({"messages": [{"role": "robot", "content": "w5"}]}, "messages", "messages[0].role must be one of"),
    ({"messages": [{"content": "w5"}]}, "messages", "role must be one of"),
    ({"messages": [{"role": "user"}]}, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": []}]}, "messages", "content must be a string"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages",
        "only text parts",
    ),
    ({"messages": user([{"type": "text", "text": 5}])}, "messages", "only text parts"),
    ({"messages": user("w5", name=3)}, "messages", "name must be a string"),
    ({"messages": user("w5", mood="x")}, "messages", "unrecognized message field"),
    (
        {"messages": U + [{"role": "tool", "content": "w5", "tool_call_id": "a"}]},
        "messages",
        "messages[1]: tool calling",
    ),
    ({"messages": [{"role": "assistant", "content": "w5"}]}, "messages", "chat template refused"),
    ({"messages": U, "tools": []}, "tools", "unrecognized"),
    ({"messages": U, "echo": True}, "echo", "unrecognized"),
    ({"messages": U, "logprobs": 2}, "logprobs", "true or false"),
    ({"messages": U, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": U, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ({"messages": U, "logprobs": True, "stream": True}, "logprobs", "stream"),
    ({"messages": U, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens", "differ"),
    ({"messages": U, "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"messages": U, "temperature": 3}, "temperature", "[0, 2]"),
    ({"messages": U, "n": 2}, "n", "not supported"),
    ({"messages": [{"role": "user", "content": "w5 " * 600}]}, "messages", "maximum context length is 512"),
    (
        {"messages": [{"role": "user", "content": "w5 " * 400}], "max_tokens": 200},
        "max_tokens",
        "maximum context length is 512",
    ),
]


@pytest.mark.parametrize("body,param,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_chat_requests_get_a_clear_400(server, body, param, msg):
    r = chat(server.url, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert msg in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"


def test_bad_json_and_unknown_model(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": "\\ud800"}',
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    r = chat(server.url, model="gpt-9", messages=CHAT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = chat(server.url, messages=[{"role": "developer", "content": "w8"}, {"role": "user", "content": "w9"}],
             max_tokens=1)  # fmt: skip
    assert r.status_code == 200  # developer: OpenAI's newer name for system


def test_no_chat_template_is_a_clear_400(ckpt):
    batcher, app = load_server(ckpt[0] / "plain", 2, 4, "fp32", "tiny")
    with LiveServer(app) as s:
        r = chat(s.url, messages=U)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "chat_template_missing" and "/v1/completions" in err["message"]
        assert "chat_template.jinja" in err["message"]
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 1})
        assert ok.status_code == 200  # the server goes on serving completions


def test_template_in_tokenizer_config_api_key_and_limits(ckpt):
    """A checkpoint that keeps its template in tokenizer_config.json; with --api-key and a small
    --max-body-bytes: 401 without the key, 413 over the limit, and the answer with the key."""
    root, model, tok = ckpt
    batcher, app = load_server(root / "config_template", 2, 4, "fp32", "tiny", Limits(max_body_bytes=2000),
                               api_key="sk-chat")  # fmt: skip
    msgs = [{"role": "user", "content": "w11 w12 w13"}]
    want, _ = solo(model, tok, tok(by_hand(msgs))["input_ids"], 6)
    with LiveServer(app) as s:
        r = chat(s.url, messages=msgs, max_tokens=6, temperature=0)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer sk-chat"}
        r = chat(s.url, key, messages=msgs, max_tokens=6, temperature=0)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
        r = chat(s.url, key, messages=[{"role": "user", "content": "w5 " * 1000}], max_tokens=1)
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
