"""/v1/completions against a real server process with the official openai client (max_retries=0)."""
import math

import pytest

from fastlm.model import load_tokenizer

PROMPT = "Once upon a time"


def _complete(client, **kwargs):
    return client.completions.create(model="tiny", **kwargs)


def _joined_stream(client, **kwargs):
    """Stream a completion -> (text per choice, finish_reason per choice, usage, chunks)."""
    texts, reasons, usage, chunks = {}, {}, None, []
    for chunk in _complete(client, stream=True, **kwargs):
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                assert choice.index not in reasons, "one finish_reason per choice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage, chunks


def test_models_and_health(tiny_server):
    client = tiny_server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.get("/../health", cast_to=object) == {"status": "ok"}


def test_stream_joined_equals_non_stream_greedy(tiny_server):
    client = tiny_server.client()
    options = dict(prompt=PROMPT, max_tokens=24, temperature=0)
    full = _complete(client, **options)
    texts, reasons, usage, _ = _joined_stream(client, stream_options={"include_usage": True}, **options)
    assert texts == {0: full.choices[0].text} and full.choices[0].text
    assert reasons == {0: full.choices[0].finish_reason}
    assert usage.model_dump() == full.usage.model_dump()


def test_prompt_forms_give_the_same_greedy_text(tiny_server):
    client = tiny_server.client()
    ids = load_tokenizer(tiny_server.tokenizer_folder).encode(PROMPT)
    options = dict(max_tokens=12, temperature=0)
    text = _complete(client, prompt=PROMPT, **options).choices[0].text
    assert _complete(client, prompt=ids, **options).choices[0].text == text
    batch = _complete(client, prompt=[ids, [5, 6, 7]], **options)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == text
    assert _complete(client, prompt=[PROMPT, "The quick"], **options).choices[0].text == text


def test_usage_is_exact(tiny_server):
    client = tiny_server.client()
    prompts = [[5, 6, 7, 8], [40, 41]]
    out = _complete(client, prompt=prompts, max_tokens=7, n=2, temperature=1, seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (6, 28, 34)
    text = _complete(client, prompt=PROMPT, max_tokens=5, temperature=0)
    assert text.usage.prompt_tokens == len(load_tokenizer(tiny_server.tokenizer_folder).encode(PROMPT))


def test_n_samples_are_distinct_and_seeds_repeat(tiny_server):
    client = tiny_server.client()
    options = dict(prompt=PROMPT, max_tokens=16, n=3, temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
    first = [c.text for c in _complete(client, **options).choices]
    assert len(set(first)) == 3
    assert [c.text for c in _complete(client, **options).choices] == first
    texts, reasons, _, _ = _joined_stream(client, **options)
    assert [texts[i] for i in range(3)] == first and set(reasons) == {0, 1, 2}
    other = [c.text for c in _complete(client, **{**options, "seed": 99}).choices]
    assert other != first


def test_logprobs_shapes_and_values(tiny_server):
    client = tiny_server.client()
    out = _complete(client, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert out.usage.completion_tokens == 10 and "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert math.isfinite(logprob) and logprob <= 0
        assert 1 <= len(top) <= 3 and all(math.isfinite(v) and v <= 0 for v in top.values())
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    streamed = [c.choices[0].logprobs for c in _joined_stream(client, prompt=PROMPT, max_tokens=10, temperature=0,
                                                               logprobs=3, extra_body={"ignore_eos": True})[3]]
    assert sum((s.token_logprobs for s in streamed if s), []) == lp.token_logprobs


def test_stop_strings_cut_the_text_and_never_stream_a_part(tiny_server):
    client = tiny_server.client()
    options = dict(prompt=PROMPT, max_tokens=24, temperature=0)
    text = _complete(client, **options).choices[0].text
    stop = text[6:9]
    assert stop.strip(), text
    cut = text[:text.find(stop)]
    out = _complete(client, stop=[stop, "never appears"], **options).choices[0]
    assert (out.text, out.finish_reason) == (cut, "stop")
    texts, reasons, _, chunks = _joined_stream(client, stop=stop, **options)
    assert (texts[0], reasons[0]) == (cut, "stop")
    shown = ""
    for chunk in chunks:
        shown += "".join(c.text for c in chunk.choices)
        assert shown == cut[:len(shown)]  # never more than the cut text, even for a moment


def test_echo_prepends_the_prompt(tiny_server):
    client = tiny_server.client()
    plain = _complete(client, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert _complete(client, prompt=PROMPT, max_tokens=8, temperature=0, echo=True).choices[0].text == PROMPT + plain
    texts = _joined_stream(client, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)[0]
    assert texts == {0: PROMPT + plain}


def test_extensions_and_unknown_fields(tiny_server):
    client = tiny_server.client()
    base = _complete(client, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    same = _complete(client, prompt=PROMPT, max_tokens=12, temperature=0,
                     extra_body={"no_such_field": {"x": 1}, "top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0})
    assert same.choices[0].text == base
    forced = _complete(client, prompt=PROMPT, max_tokens=9, temperature=0.7, seed=5, presence_penalty=0.5,
                       frequency_penalty=0.5, extra_body={"min_tokens": 9, "ignore_eos": True, "top_k": 20,
                                                          "min_p": 0.01, "repetition_penalty": 1.2})
    assert forced.usage.completion_tokens == 9 and forced.choices[0].finish_reason == "length"
    every_id = list(range(load_tokenizer(tiny_server.tokenizer_folder).vocab_size))
    stopped = _complete(client, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"stop_token_ids": every_id})
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("", "stop", 0)


def test_streamed_text_never_splits_a_multibyte_character(tiny_server, monkeypatch):
    import fastlm

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the in-process reference generation: PyTorch path
    llm = fastlm.LLM(str(tiny_server.tokenizer_folder), dtype="float32")
    prompt = "日本語のテキスト"
    ids = llm.generate_tokens([llm.tokenizer.encode(prompt)], max_new_tokens=30, temperature=0)[0]
    expected = llm.tokenizer.decode(ids)  # decoded at once: every complete character intact
    assert any(ord(c) > 127 and c != "\ufffd" for c in expected)  # the output has multi-byte characters
    assert _complete(tiny_server.client(), prompt=prompt, max_tokens=30, temperature=0).choices[0].text == expected
    texts, _, _, chunks = _joined_stream(tiny_server.client(), prompt=prompt, max_tokens=30, temperature=0)
    assert texts[0] == expected  # a character split across deltas would show as U+FFFD pieces instead
    assert len(chunks) > 5


def test_metrics_count_tokens_latencies_and_prefix_hits(tiny_server):
    client = tiny_server.client()
    prompt = list(range(5, 45))  # 40 tokens: 2 full blocks of 16 to cache
    before = tiny_server.metrics()
    first = _complete(client, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    second = _complete(client, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    after = tiny_server.metrics()

    def grew(name):
        return after[name] - before.get(name, 0)

    assert grew("fastlm_prompt_tokens_total") == first.usage.prompt_tokens + second.usage.prompt_tokens == 80
    assert grew("fastlm_generation_tokens_total") == 10
    assert grew('fastlm_requests_finished_total{finish_reason="length"}') == 2
    assert grew("fastlm_time_to_first_token_seconds_count") == 2
    assert grew("fastlm_inter_token_latency_seconds_count") == 8  # 4 gaps per request
    assert grew("fastlm_prefix_cache_hit_tokens_total") == 32  # the second request reuses both full blocks
    assert second.choices[0].text == first.choices[0].text
    for name in ("fastlm_requests_running", "fastlm_requests_waiting", "fastlm_kv_blocks_used",
                 "fastlm_kv_blocks_total", "fastlm_preemptions_total", 'fastlm_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert name in after
    assert after["fastlm_kv_blocks_used"] == 0 and after["fastlm_kv_blocks_total"] == 24
