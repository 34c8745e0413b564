"""The engine end to end on tiny checkpoints (reference kernels): every request's greedy output equals
its output alone and the greedy continuation computed by whole-sequence forwards (no KV cache), under
every scheduling condition."""
import pytest
import torch

from fastlm.runtime.sampling import SamplingParams
from tests.runtime.conftest import NAMES
from tests.runtime.engine_util import (GREEDY, PROMPTS, generate, make_engine, reference_greedy,  # noqa: F401
                                       run_to_end)


def pool_bytes(llm, blocks, block_size):
    cfg = llm.model.config
    return blocks * block_size * 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * llm.model.tok_emb.weight.element_size()


@pytest.mark.parametrize("name", NAMES)
def test_each_request_equals_its_output_alone_and_the_reference(name, llms, make_engine, reference_kernels):
    llm = llms[name]
    expected = reference_greedy(llm, PROMPTS)
    assert any(len(e) >= 12 and len(set(e)) > 3 for e in expected)  # the comparison has substance
    engine = make_engine(llm)
    assert generate(engine, PROMPTS) == expected
    assert [generate(engine, [p])[0] for p in PROMPTS] == expected


@pytest.mark.parametrize("options", [
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=7),  # every prompt longer than 7 tokens is chunked, decodes share the budget
    dict(max_num_seqs=2),
    dict(block_size=1),
    dict(block_size=5, max_num_batched_tokens=13),
], ids=["no-prefix-cache", "chunk-7", "2-seqs", "block-1", "block-5-chunk-13"])
def test_scheduling_options_keep_every_output(options, llms, make_engine, reference_kernels):
    llm = llms["llama_gqa"]
    engine = make_engine(llm, **options)
    assert generate(engine, PROMPTS) == reference_greedy(llm, PROMPTS)


def test_chunked_prefill_really_chunks(llms, make_engine, reference_kernels):
    engine = make_engine(llms["gpt2"], max_num_batched_tokens=7)
    engine.add_request(list(range(3, 48)), GREEDY)
    spans = []
    while engine.has_unfinished():
        scheduled = engine.scheduler.schedule
        def spy():
            step = scheduled()
            spans.append([span for _, span in step.spans])
            return step
        engine.scheduler.schedule = spy
        engine.step()
        engine.scheduler.schedule = scheduled
    assert spans[:7] == [[7]] * 6 + [[3]]  # 45 prompt tokens: 6 chunks of 7, then 3; then decodes
    assert all(s == [1] for s in spans[7:])


@pytest.mark.parametrize("name", NAMES)
def test_a_pool_too_small_for_all_preempts_and_still_gives_every_output(name, llms, make_engine, reference_kernels):
    llm = llms[name]
    engine = make_engine(llm, block_size=4, kv_cache_memory=pool_bytes(llm, 20, 4))
    assert engine.stats()["kv_blocks_total"] == 20  # 80 tokens for 6 requests of up to 45 + 24
    assert generate(engine, PROMPTS) == reference_greedy(llm, PROMPTS)
    assert engine.stats()["preemptions"] > 0


def test_preemption_takes_the_newest_request(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    engine = make_engine(llm, block_size=4, kv_cache_memory=pool_bytes(llm, 8, 4))
    first = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=16, temperature=0))
    second = engine.add_request([40, 41, 42], SamplingParams(max_new_tokens=16, temperature=0))
    preempted = []
    original = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.request_id), original(seq))
    results = run_to_end(engine)
    assert preempted and set(preempted) == {second}
    assert [results[first][0], results[second][0]] == reference_greedy(llm, [[5, 6, 7], [40, 41, 42]], 16)


def test_prefix_cache_hit_on_a_shared_system_prompt(llms, make_engine, reference_kernels):
    llm = llms["llama_gqa"]
    system = list(range(10, 50))  # 40 tokens: two full blocks of 16 and a partial one
    prompts = [system + [60 + i, 61 + i] for i in range(3)]
    expected = reference_greedy(llm, prompts, 8)
    engine = make_engine(llm)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    got = [generate(engine, [p], params)[0] for p in prompts]  # one after another: the first fills the cache
    assert got == expected
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * 32
    cold = make_engine(llm, enable_prefix_caching=False)
    assert [generate(cold, [p], params)[0] for p in prompts] == expected
    assert cold.stats()["prefix_cache_hit_tokens"] == 0


def test_a_long_shared_system_prompt_takes_the_cascade_and_keeps_every_output(llms, make_engine, reference_kernels,
                                                                           monkeypatch):
    """Requests arriving together with an 80-token system prompt: their decode steps attend the shared
    blocks once (cascade, kernels/paged_attention.py) and each output still equals the reference; one
    request aborted mid-way leaves the others intact and frees its blocks (checked at teardown)."""
    import fastlm.kernels.paged_attention as paged

    shared_counts = []

    def spy(*args):
        shared_counts.append(real(*args))
        return shared_counts[-1]
    real = paged._shared_blocks
    monkeypatch.setattr(paged, "_shared_blocks", spy)
    llm = llms["llama_gqa"]
    system = list(range(10, 90))  # 5 full blocks of 16 >= CASCADE_MIN_TOKENS
    prompts = [system + [95 + i] * (1 + i) for i in range(4)]
    expected = reference_greedy(llm, prompts, 12)
    engine = make_engine(llm)
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=12, temperature=0)) for p in prompts]
    results = run_to_end(engine, on_step=lambda step: engine.abort(rids[2]) if step == 4 else None)
    assert [results[rids[i]][0] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]
    assert len(results[rids[2]][0]) < len(expected[2])
    assert max(shared_counts) * 16 >= paged.CASCADE_MIN_TOKENS  # the cascade really ran


def test_full_prefix_hit_still_computes_the_last_token(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    prompt = list(range(10, 42))  # exactly two blocks: the second is recomputed, not reused
    engine = make_engine(llm)
    first = generate(engine, [prompt])
    assert generate(engine, [prompt]) == first == reference_greedy(llm, [prompt])
    assert engine.stats()["prefix_cache_hit_tokens"] == 16


def test_n_samples_share_the_prompt_blocks(llms, make_engine, reference_kernels):
    llm = llms["llama_gqa"]
    prompt = list(range(3, 43))  # 40 tokens: blocks 0-1 full, block 2 partial
    engine = make_engine(llm)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, n=4))
    used = []
    results = run_to_end(engine, on_step=lambda _: used.append(engine.stats()["kv_blocks_total"] - engine.stats()["kv_blocks_free"]))
    assert len(results[rid]) == 4 and all(len(s) == 6 for s in results[rid])
    assert len({tuple(s) for s in results[rid]}) > 1  # different samples
    assert max(used) == 3 + 3  # the prompt's 3 blocks, plus one copied partial block per other sample
    alone = make_engine(llm)
    one = alone.add_request(prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    assert run_to_end(alone)[one][0] == results[rid][0]  # sample 0 is the n=1 request's


def test_n_greedy_samples_are_identical(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    engine = make_engine(llm)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=24, temperature=0, n=3))
    assert run_to_end(engine)[rid] == reference_greedy(llm, PROMPTS[:1]) * 3


def test_aborts_mid_way_free_blocks_and_leave_the_others_intact(llms, make_engine, reference_kernels):
    llm = llms["llama_gqa"]
    expected = reference_greedy(llm, PROMPTS)
    engine = make_engine(llm, max_num_seqs=3)
    rids = [engine.add_request(p, GREEDY) for p in PROMPTS]

    def abort_some(step):
        if step == 3:
            engine.abort(rids[1])  # running
            engine.abort(rids[5])  # still waiting (max_num_seqs=3)
        if step == 5:
            engine.abort(rids[1])  # twice: no-op
    results = run_to_end(engine, on_step=abort_some)
    for i in (0, 2, 3, 4):
        assert results[rids[i]][0] == expected[i]
    assert len(results[rids[1]][0]) < len(expected[1]) and rids[5] not in results
    assert engine.stats()["aborted_sequences"] == 2


def test_requests_added_while_others_run(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    engine = make_engine(llm, max_num_batched_tokens=16)
    rids = {}
    def add_late(step):
        if step in (0, 4, 9):
            i = (0, 4, 9).index(step)
            rids[i] = engine.add_request(PROMPTS[i + 2], GREEDY)
    results = run_to_end(engine, on_step=add_late)
    assert [results[rids[i]][0] for i in range(3)] == reference_greedy(llm, PROMPTS[2:5])


def test_seeded_requests_sample_the_same_in_any_batch(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    mixed = [SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=5),
             SamplingParams(max_new_tokens=12, temperature=0),
             SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=7, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=6)]
    together = make_engine(llm)
    rids = [together.add_request(PROMPTS[i], p) for i, p in enumerate(mixed)]
    results = run_to_end(together)
    for i, params in enumerate(mixed):
        alone = make_engine(llm)
        rid = alone.add_request(PROMPTS[i], params)
        assert run_to_end(alone)[rid] == results[rids[i]]
    assert results[rids[0]] != results[rids[3]]


def test_mixed_steps_on_the_interpreter_kernels(llms, make_engine):
    """No reference_kernels fixture: the paged Triton kernels run under TRITON_INTERPRET=1, on prefill
    chunks over a cached prefix and on a step that packs a decode row with a prefill."""
    llm = llms["gpt2"]
    prompts = [list(range(5, 25)), [40, 41, 42]]
    expected = reference_greedy(llm, prompts, 3)
    engine = make_engine(llm, max_num_batched_tokens=8)  # the first prompt is prefilled in chunks of 8, 8, 4
    params = SamplingParams(max_new_tokens=3, temperature=0)
    rids = [engine.add_request(prompts[0], params)]
    shapes, run = [], engine.runner.run
    engine.runner.run = lambda step: (shapes.append((len(step.decodes), len(step.prefills))), run(step))[1]

    def add_second(step):
        if step == 3:  # the first request decodes now: this step mixes its decode with the new prefill
            rids.append(engine.add_request(prompts[1], params))
    results = run_to_end(engine, on_step=add_second)
    assert [results[r][0] for r in rids] == expected
    assert shapes[:4] == [(0, 1), (0, 1), (0, 1), (1, 1)]


def test_requests_arriving_together_share_a_system_prompt_computed_once(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    system = list(range(10, 50))  # two full blocks and a partial one
    prompts = [system + [60 + i, 61 + i] for i in range(3)]
    engine = make_engine(llm)
    assert generate(engine, prompts, SamplingParams(max_new_tokens=8, temperature=0)) == reference_greedy(llm, prompts, 8)
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * 32  # the first computes it; the others wait a step
    cold = make_engine(llm, enable_prefix_caching=False)
    assert generate(cold, prompts, SamplingParams(max_new_tokens=8, temperature=0)) == reference_greedy(llm, prompts, 8)
