"""The embedded default model behind a real server (no --model): completions, chat without a template,
a client that leaves mid-request (its request aborted, its KV blocks returned), SIGTERM draining."""
import signal
import time

import openai
import pytest

from tests.serve.server import Server

NAME = "fastlm-default"
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def server():
    server = Server("--max-num-seqs", "8")
    yield server
    assert server.stop() == 0


def _wait_for(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_completion_stream_equals_non_stream(server):
    client = server.client()
    options = dict(model=NAME, prompt=PROMPT, max_tokens=32, temperature=0)
    full = client.completions.create(**options).choices[0]
    assert full.text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **options)) == full.text


def test_chat_without_a_template_is_a_clear_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "no_chat_template" and "--chat-template" in info.value.body["message"]


def test_disconnect_mid_stream_aborts_the_request_and_frees_its_blocks(server):
    client = server.client()
    before = server.metrics()
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=450, n=2, temperature=0.8, seed=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert server.metrics()["fastlm_kv_blocks_used"] > 0
    stream.close()
    _wait_for(lambda: server.metrics()["fastlm_kv_blocks_used"] == 0)
    metrics = server.metrics()
    assert metrics["fastlm_engine_aborted_sequences_total"] == before["fastlm_engine_aborted_sequences_total"] + 2
    assert metrics['fastlm_requests_finished_total{finish_reason="abort"}'] == \
        before.get('fastlm_requests_finished_total{finish_reason="abort"}', 0) + 2
    assert metrics["fastlm_requests_running"] == metrics["fastlm_requests_in_flight"] == 0
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4).usage.prompt_tokens > 0


def test_disconnect_while_waiting_for_a_full_response_aborts_it(server):
    aborted = server.metrics()["fastlm_engine_aborted_sequences_total"]
    impatient = server.client(timeout=0.5)
    # 8 choices x 450 tokens take seconds even on a fast, idle CPU (one choice alone may not outlast 0.5 s)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=NAME, prompt=PROMPT, max_tokens=450, n=8, temperature=0.8, seed=0,
                                     extra_body={"ignore_eos": True})
    _wait_for(lambda: server.metrics()["fastlm_kv_blocks_used"] == 0)
    assert server.metrics()["fastlm_engine_aborted_sequences_total"] == aborted + 8


def test_sigterm_lets_a_running_stream_finish_then_exits_0():
    server = Server("--shutdown-timeout", "120")
    try:
        stream = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=300, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        assert server.metrics()["fastlm_kv_blocks_used"] > 0  # still generating when the signal comes
        server.process.send_signal(signal.SIGTERM)
        reasons = []
        for chunk in chunks:
            text += chunk.choices[0].text
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        assert reasons == ["length"] and text
    finally:
        assert server.stop() == 0
