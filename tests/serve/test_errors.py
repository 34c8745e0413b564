"""Errors in OpenAI's shape from a real server: 400 naming the field, 401, 404, 503 with Retry-After;
a bad request never disturbs the others. Server: --api-key, 2 requests in flight at most, a chat
template that raises on non-alternating roles."""
import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.runtime.chat_templates import STRICT_ALTERNATION
from tests.serve.server import Server, tiny_checkpoint

KEY = "sk-test-key"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpt2_errors"))
    template = folder / "strict.jinja"
    template.write_text(STRICT_ALTERNATION)
    server = Server("--model", str(folder), "--served-model-name", "tiny", "--api-key", KEY, "--chat-template",
                    str(template), "--max-num-seqs", "2", "--max-waiting-requests", "0")
    yield server
    assert server.stop() == 0


@pytest.fixture
def client(server):
    return server.client(api_key=KEY)


def _post(server, path: str, body: bytes, key: str = KEY):
    """Raw POST -> (status, parsed JSON body)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _assert_error_shape(body: dict):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]


def test_api_key_is_required_on_v1_routes(server, client):
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong").completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    status, body = _post(server, "/v1/completions", b'{"prompt": "a"}', key=None)
    assert status == 401
    _assert_error_shape(body)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 0
    assert server.metrics()["fastlm_requests_in_flight"] == 0  # /metrics (and /health) need no key


@pytest.mark.parametrize("field, value, param", [
    ("temperature", -1, "temperature"), ("top_p", 1.5, "top_p"), ("logprobs", 21, "logprobs"), ("n", 0, "n"),
    ("max_tokens", 0, "max_tokens"), ("presence_penalty", 3, "presence_penalty"), ("seed", -1, "seed"),
    ("prompt", "", "prompt"), ("prompt", [999999], "prompt"), ("prompt", [5] * 200, "prompt"),
    ("max_tokens", "many", "max_tokens"), ("stop", [""], "stop"), ("top_k", -3, "top_k"),
    ("logit_bias", {"5": 1.0}, "logit_bias"), ("stream_options", "yes", "stream_options"),
    ("min_tokens", 50, "min_tokens"), ("n", 129, "n"), ("prompt", [[5]] * 129, "prompt"),
])
def test_bad_completion_values_are_400_naming_the_field(client, field, value, param):
    body = {"prompt": PROMPT, "max_tokens": 4, field: value}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=body.pop("prompt"), extra_body=body)
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
    assert info.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages, options, param, match", [
    ([{"role": "assistant", "content": "a"}], {}, "messages", "Conversation roles must alternate"),
    ([], {}, "messages", "non-empty list"),
    ([{"role": "user", "content": 5}], {}, "messages", "content must be"),
    ([{"role": "user", "content": "a"}], {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ([{"role": "user", "content": "a"}], {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= 20|\\[0, 20\\]"),
    ([{"role": "user", "content": "a"}], {"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
])
def test_bad_chat_requests_are_400(client, messages, options, param, match):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, **options)
    assert info.value.body["param"] == param
    assert __import__("re").search(match, info.value.body["message"]), info.value.body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert info.value.code == "model_not_found"


def test_malformed_bodies_are_400(server):
    bodies = (b"{not json", b"[1, 2]", b'{"model": "tiny"}', b'{"prompt": "a\\ud800"}',
              '{"prompt": "\ud800"}'.encode("utf-8", "surrogatepass"))
    for body in bodies:
        status, parsed = _post(server, "/v1/completions", body)
        assert status == 400, (body, parsed)
        _assert_error_shape(parsed)
    status, parsed = _post(server, "/v1/no_such_route", b"{}")
    assert status == 404
    _assert_error_shape(parsed)


def test_full_server_answers_503_with_retry_after_and_recovers(server, client):
    options = dict(model="tiny", prompt=PROMPT, max_tokens=80, temperature=0, stream=True,
                   extra_body={"ignore_eos": True})
    streams = [client.completions.create(**options) for _ in range(2)]
    for stream in streams:
        next(iter(stream))  # both accepted and generating
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
    assert info.value.body["type"] == "server_overloaded"
    for stream in streams:
        stream.close()
    _wait_for(lambda: server.metrics()["fastlm_requests_in_flight"] == 0)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices[0].finish_reason == "length"


def test_bad_requests_do_not_disturb_a_running_one(client):
    options = dict(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0)
    expected = client.completions.create(**options).choices[0].text
    pieces = []
    for i, chunk in enumerate(client.completions.create(stream=True, **options)):
        pieces.append(chunk.choices[0].text)
        if i == 1:
            for bad in ({"temperature": -1}, {"prompt": [10 ** 6]}, {"n": "x"}):
                with pytest.raises(openai.BadRequestError):
                    client.completions.create(**{**options, **bad})
    assert "".join(pieces) == expected


def _wait_for(condition, timeout: float = 60.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
