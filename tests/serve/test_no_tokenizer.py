"""A checkpoint without a tokenizer: token-id prompts work; what needs text is a 400 that says so (and
leaves nothing running)."""
import openai
import pytest

from tests.serve.server import Server, tiny_checkpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpt2_no_tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    server = Server("--model", str(folder), "--served-model-name", "tiny")
    yield server
    assert server.stop() == 0


def test_ids_work_and_text_features_are_400(server):
    client = server.client()
    out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 and out.choices[0].text == ""
    for options, param in ((dict(prompt="text"), "prompt"), (dict(prompt=[5], logprobs=1), "logprobs"),
                           (dict(prompt=[5], echo=True), "echo"), (dict(prompt=[5], stop="x"), "stop")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", max_tokens=4, **options)
        assert info.value.body["param"] == param and "tokenizer" in info.value.body["message"], info.value.body
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}])
    assert "no tokenizer" in info.value.body["message"]
    metrics = server.metrics()
    assert metrics["fastlm_requests_in_flight"] == 0 and metrics["fastlm_kv_blocks_used"] == 0
