"""fastlm.LLM on the engine: one LLM shared by threads and interleaved generators, n samples, details
with logprobs, SamplingParams objects, stats."""
import threading

import pytest

import fastlm
from fastlm.runtime.results import Completion
from tests.runtime.engine_util import PROMPTS, reference_greedy

TEXTS = ["Once upon a time", "The quick brown fox", "def read_config(path):", "naïve café", "a", "Hello there",
         "class Foo(object):", "1 2 3"]


def test_eight_threads_sharing_one_llm_each_get_their_sequential_result(llms, reference_kernels):
    llm = llms["llama_gqa"]
    options = [dict(temperature=0), dict(temperature=1.2, top_k=40, seed=3)]
    expected = {(i, j): llm.generate(TEXTS[i], max_new_tokens=16, **options[j]) for i in range(8) for j in (0, 1)}
    results, errors, start = {}, [], threading.Barrier(8)

    def work(i):
        try:
            start.wait()
            for j in (0, 1):
                results[(i, j, "generate")] = llm.generate(TEXTS[i], max_new_tokens=16, **options[j])
                results[(i, j, "stream")] = "".join(llm.stream(TEXTS[i], max_new_tokens=16, **options[j]))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {(i, j, kind): text for (i, j), text in expected.items() for kind in ("generate", "stream")}
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == stats["waiting"] == 0


def test_interleaved_streams_and_a_generate_inside_a_stream(llms, reference_kernels):
    llm = llms["gpt2"]
    expected = [llm.generate(t, max_new_tokens=20, temperature=0) for t in TEXTS[:3]]
    streams = [llm.stream(t, max_new_tokens=20, temperature=0) for t in TEXTS[:3]]
    pieces, live = [[] for _ in streams], [True] * 3
    while any(live):
        for i, stream in enumerate(streams):
            piece = next(stream, None) if live[i] else None
            live[i] = piece is not None
            pieces[i].append(piece or "")
            if len(pieces[0]) == 2 and i == 0:
                assert llm.generate(TEXTS[3], max_new_tokens=5, temperature=0) == llm.generate(
                    TEXTS[3], max_new_tokens=5, temperature=0)
    assert ["".join(p) for p in pieces] == expected


def test_n_samples(llms, reference_kernels):
    llm = llms["gpt2"]
    five = llm.generate(TEXTS[0], n=5, max_new_tokens=12, temperature=1.0, seed=1)
    assert isinstance(five, list) and len(five) == 5 and len(set(five)) > 1
    assert five[0] == llm.generate(TEXTS[0], max_new_tokens=12, temperature=1.0, seed=1)
    assert llm.generate(TEXTS[0], n=5, max_new_tokens=12, temperature=1.0, seed=1) == five  # seeded: reproducible
    batch = llm.generate(TEXTS[:2], n=3, max_new_tokens=6, temperature=0)
    assert [len(b) for b in batch] == [3, 3] and all(len(set(b)) == 1 for b in batch)
    ids = llm.generate_tokens(PROMPTS[:2], n=2, max_new_tokens=6, temperature=0)
    assert ids == [[r, r] for r in reference_greedy(llm, PROMPTS[:2], 6)]
    with pytest.raises(ValueError, match="n must be 1"):
        llm.stream(TEXTS[0], n=2)


def test_details_with_logprobs(llms, reference_kernels):
    llm = llms["llama_gqa"]
    text = llm.generate(TEXTS[1], max_new_tokens=10, temperature=0)
    c = llm.generate(TEXTS[1], max_new_tokens=10, temperature=0, logprobs=2, return_details=True)
    assert isinstance(c, Completion) and c.text == text and c.finish_reason in ("stop", "length")
    assert len(c.logprobs) == len(c.token_ids) and all(len(lp.top) == 2 for lp in c.logprobs)
    assert all(lp.logprob <= 0 and lp.token_id == t for lp, t in zip(c.logprobs, c.token_ids))
    plain = llm.generate_tokens(PROMPTS[:2], max_new_tokens=5, temperature=0, return_details=True)
    assert [d.token_ids for d in plain] == reference_greedy(llm, PROMPTS[:2], 5) and plain[0].logprobs is None


def test_a_sampling_params_object_or_keywords_not_both(llms, reference_kernels):
    llm = llms["gpt2"]
    params = fastlm.SamplingParams(max_new_tokens=8, temperature=0)
    assert llm.generate(TEXTS[0], params) == llm.generate(TEXTS[0], max_new_tokens=8, temperature=0)
    assert llm.generate_tokens(PROMPTS[:1], params) == reference_greedy(llm, PROMPTS[:1], 8)
    with pytest.raises(ValueError, match="not both"):
        llm.generate(TEXTS[0], params, temperature=0)
    with pytest.raises(ValueError, match="unknown sampling option"):
        llm.generate(TEXTS[0], max_tokens=8)
    with pytest.raises(ValueError, match="params must be a fastlm.SamplingParams"):
        llm.generate(TEXTS[0], {"temperature": 0})


def test_engine_options_and_stats(checkpoints, reference_kernels):
    llm = fastlm.LLM(str(checkpoints["gpt2"][0]), dtype="float32", block_size=8, max_num_seqs=4,
                     kv_cache_memory=40 * 8 * 2 * 2 * 64 * 4)
    stats = llm.stats()
    assert stats["kv_blocks_total"] == 40 and stats["block_size"] == 8
    system = "The quick brown fox jumps over the lazy dog and then some more words follow here "
    first = llm.generate(system + "first", max_new_tokens=4, temperature=0)
    assert llm.generate(system + "first", max_new_tokens=4, temperature=0) == first
    assert llm.stats()["prefix_cache_hit_tokens"] > 0
    with pytest.raises(ValueError, match="unknown engine option"):
        fastlm.LLM(str(checkpoints["gpt2"][0]), blocksize=8)
    llm.close()
