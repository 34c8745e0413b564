"""/v1/chat/completions against a real server process (tiny GPT-2 with a ChatML template)."""
import math

from tests.runtime.checkpoints import CONTEXT

MESSAGES = [{"role": "system", "content": "You are a fox."}, {"role": "user", "content": "Once upon a time"}]


def _chat(client, **kwargs):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)


def test_prompt_is_the_template_rendered_as_transformers_does(tiny_server):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_server.tokenizer_folder)
    expected = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    out = _chat(tiny_server.client(), max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens == len(expected)
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    same = tiny_server.client().chat.completions.create(model="tiny", messages=parts, max_tokens=3, temperature=0)
    assert same.usage.prompt_tokens == len(expected) and same.choices[0].message.content == out.choices[0].message.content


def test_stream_joined_equals_non_stream_and_starts_with_the_role(tiny_server):
    client = tiny_server.client()
    options = dict(max_tokens=20, temperature=0.8, seed=7, n=2)
    full = _chat(client, **options)
    assert [c.message.role for c in full.choices] == ["assistant", "assistant"]
    contents, reasons, roles, usage = {}, {}, {}, None
    for chunk in _chat(client, stream=True, stream_options={"include_usage": True}, **options):
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.index not in roles:
                roles[choice.index] = choice.delta.role  # the first chunk of a choice carries the role
            contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                assert choice.index not in reasons
                reasons[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert [contents[i] for i in range(2)] == [c.message.content for c in full.choices]
    assert [reasons[i] for i in range(2)] == [c.finish_reason for c in full.choices]
    assert usage.model_dump() == full.usage.model_dump()


def test_logprobs_and_top_logprobs(tiny_server):
    out = _chat(tiny_server.client(), max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for item in content:
        assert math.isfinite(item.logprob) and item.logprob <= 0 and item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2 and all(math.isfinite(t.logprob) for t in item.top_logprobs)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    plain = _chat(tiny_server.client(), max_tokens=6, temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    assert all(item.top_logprobs == [] for item in plain.choices[0].logprobs.content)
    assert _chat(tiny_server.client(), max_tokens=6, temperature=0).choices[0].logprobs is None


def test_max_tokens_defaults_to_the_rest_of_the_context(tiny_server):
    client = tiny_server.client()
    out = _chat(client, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.total_tokens == CONTEXT and out.choices[0].finish_reason == "length"
    short = _chat(client, temperature=0, max_completion_tokens=4, max_tokens=50, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 4
