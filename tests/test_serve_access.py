"""`subllm serve --api-key` (issue 21 item 2): without `Authorization: Bearer KEY` the API routes
answer 401 in OpenAI's format; /health and /metrics stay open; the openai client with the key works;
the key comes from --api-key or $SUBLLM_API_KEY."""

import httpx
import pytest
from serve_helpers import LiveServer, tiny_checkpoint

from subllm.cli.serve import api_key, load_server
from subllm.errors import SubLLMError

KEY = "sk-test-1234"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_access") / "tiny"
    tiny_checkpoint(path)
    batcher, app = load_server(path, 4, 8, "fp32", "tiny", api_key=KEY)
    with LiveServer(app) as s:
        s.batcher = batcher
        yield s


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
     {"Authorization": f"Bearer {KEY}x"}],
)  # fmt: skip
def test_without_the_key_401(server, headers):
    body = {"prompt": [5, 6], "max_tokens": 2}
    for r in (
        httpx.post(server.url + "/v1/completions", json=body, headers=headers),
        httpx.get(server.url + "/v1/models", headers=headers),
        httpx.get(server.url + "/v1/nope", headers=headers),  # no route discovery without the key
        httpx.post(server.url + "/tokenize", json={"prompt": "w5"}, headers=headers),
    ):
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert "Authorization: Bearer" in err["message"]


def test_with_the_key_and_open_routes(server):
    from openai import AuthenticationError, OpenAI

    ok = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in ok.models.list().data] == ["tiny"]
    r = ok.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    bad = OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # probes need no key
    assert httpx.get(server.url + "/version").status_code == 200
    assert 'status="401"' in httpx.get(server.url + "/metrics").text


def test_key_from_flag_or_environment():
    assert api_key(None, {}) is None
    assert api_key(None, {"SUBLLM_API_KEY": "k1"}) == "k1"
    assert api_key("k2", {"SUBLLM_API_KEY": "k1"}) == "k2"  # the flag wins
    with pytest.raises(SubLLMError, match="empty"):
        api_key(" ", {})
    with pytest.raises(SubLLMError, match="empty"):
        api_key(None, {"SUBLLM_API_KEY": ""})
