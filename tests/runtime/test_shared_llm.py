"""One LLM used by several calls at once (issue 11, item 1): threads, interleaved stream() generators
and a generate() inside a stream() loop each get exactly the output they get alone."""
import gc
import threading

import pytest

PROMPTS = ["def read_config(path):", "class Foo(object):", "Once upon a time", "The quick brown fox"]
OPTIONS = [dict(temperature=0), dict(temperature=1.3, top_k=50, seed=7)]


@pytest.fixture
def llm(llms, reference_kernels, monkeypatch):
    llm = llms["llama_gqa"]
    monkeypatch.setattr(llm, "eos_token_ids", ())  # full-length outputs: more steps to disturb
    return llm


@pytest.mark.parametrize("options", OPTIONS)
def test_generate_inside_a_stream_loop(llm, options):
    reference = llm.generate(PROMPTS[0], max_new_tokens=40, **options)
    inner_reference = llm.generate(PROMPTS[1], max_new_tokens=5, **options)
    pieces, inner = [], []
    for i, piece in enumerate(llm.stream(PROMPTS[0], max_new_tokens=40, **options)):
        pieces.append(piece)
        if i == 5:
            inner.append(llm.generate(PROMPTS[1], max_new_tokens=5, **options))
    assert "".join(pieces) == reference
    assert inner == [inner_reference]


@pytest.mark.parametrize("options", OPTIONS)
def test_two_stream_generators_advanced_in_turn(llm, options):
    references = [llm.generate(p, max_new_tokens=30, **options) for p in PROMPTS[:2]]
    streams = [llm.stream(p, max_new_tokens=30, **options) for p in PROMPTS[:2]]
    outputs = [[], []]
    live = [True, True]
    while any(live):
        for i, stream in enumerate(streams):
            if live[i]:
                piece = next(stream, None)
                live[i] = piece is not None
                outputs[i].append(piece or "")
    assert ["".join(o) for o in outputs] == references


def test_threads_sharing_one_llm(llm):
    solo = {(p, kind): llm.generate(p, max_new_tokens=24, temperature=0) for p in PROMPTS for kind in ("g", "s")}
    start = threading.Barrier(len(PROMPTS))
    results, errors = {}, []

    def work(prompt):
        try:
            start.wait()
            for _ in range(3):
                results.setdefault((prompt, "g"), []).append(llm.generate(prompt, max_new_tokens=24, temperature=0))
                text = "".join(llm.stream(prompt, max_new_tokens=24, temperature=0))
                results.setdefault((prompt, "s"), []).append(text)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {key: [text] * 3 for key, text in solo.items()}


def test_an_abandoned_stream_neither_leaks_nor_disturbs_later_calls(llm):
    reference = llm.generate(PROMPTS[2], max_new_tokens=30, temperature=0)
    paused = llm.stream(PROMPTS[2], max_new_tokens=30, temperature=0)
    first = [next(paused) for _ in range(3)]
    for _ in range(6):  # each advanced a little, then dropped without being exhausted
        dropped = llm.stream(PROMPTS[3], max_new_tokens=30, temperature=0)
        next(dropped)
        del dropped
    gc.collect()
    assert llm.generate(PROMPTS[3], max_new_tokens=30, temperature=0) == llm.generate(
        PROMPTS[3], max_new_tokens=30, temperature=0)
    assert "".join(first + list(paused)) == reference  # the paused stream resumes unharmed
    stats = llm.stats()  # the dropped streams' requests were aborted: every KV block is free again
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == stats["waiting"] == 0
