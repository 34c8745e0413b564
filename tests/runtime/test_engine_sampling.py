"""Per-request sampling options through the engine: penalties, min_new_tokens, stop ids and strings,
logprobs, finish reasons; request validation."""
import pytest
import torch

from fastlm.runtime.engine.sampler import sample_rows
from fastlm.runtime.engine.sequence import Sequence
from fastlm.runtime.sampling import SamplingParams
from tests.runtime.checkpoints import CONTEXT
from tests.runtime.engine_util import GREEDY, PROMPTS, make_engine, run_to_end  # noqa: F401


def fake_seq(prompt, output, **options):
    s = Sequence(0, 0, 0, prompt, SamplingParams(**options), 100)
    s.token_ids += output
    return s


def test_presence_and_frequency_penalties_lower_generated_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 4], logits[0, 5] = 5.0, 3.5, 1.0
    plain = sample_rows(logits, [fake_seq([3], [3, 3], temperature=0)], ())[0]
    freq = sample_rows(logits, [fake_seq([3], [3, 3], temperature=0, frequency_penalty=1.0)], ())[0]
    presence = sample_rows(logits, [fake_seq([4], [3, 3, 3], temperature=0, presence_penalty=1.0)], ())[0]
    assert plain == [3] and freq == [4]  # 5 - 2 * 1 < 3.5: only generated tokens count, the prompt's do not
    assert presence == [3]  # 5 - 1 (once, however often) > 3.5


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, 10)
    logits[:, 7], logits[:, 8], logits[:, 2] = 9.0, 8.0, 1.0  # 7 is eos, 8 a stop id
    early = fake_seq([1], [], temperature=0, min_new_tokens=2, stop_token_ids=[8])
    later = fake_seq([1], [4, 4], temperature=0, min_new_tokens=2, stop_token_ids=[8])
    assert sample_rows(logits, [early, later], (7,))[0] == [2, 7]
    ignoring = fake_seq([1], [], temperature=0, min_new_tokens=2, ignore_eos=True)
    assert sample_rows(logits[:1], [ignoring], (7,))[0] == [7]  # ignore_eos: eos is an ordinary token


def test_greedy_picks_given_by_the_step_are_taken_only_by_plainly_greedy_rows():
    # a compiled CPU step hands sample_rows each row's argmax; rows that adjust their logits recompute
    logits = torch.zeros(2, 10)
    logits[:, 3], logits[:, 4] = 5.0, 3.5
    picks = torch.tensor([3, 3])
    plain = [fake_seq([1], [3], temperature=0), fake_seq([1], [], temperature=0, logprobs=2)]
    tokens, logprobs = sample_rows(logits, plain, (), greedy=picks)
    assert tokens == [3, 3] and logprobs[0] is None and logprobs[1].token_id == 3
    penalised = fake_seq([1], [3, 3], temperature=0, frequency_penalty=1.0)
    assert sample_rows(logits, [plain[0], penalised], (), greedy=picks)[0] == [3, 4]
    waiting = fake_seq([1], [], temperature=0, min_new_tokens=1)  # eos (3) masked until one token is out
    assert sample_rows(logits, [plain[0], waiting], (3,), greedy=picks)[0] == [3, 4]
    repeated = fake_seq([3], [], temperature=0, repetition_penalty=2.0)
    assert sample_rows(logits, [plain[0], repeated], (), greedy=picks)[0] == [3, 4]


def test_logprobs_are_the_models_log_softmax(llms, make_engine, reference_kernels):
    llm = llms["llama_gqa"]
    engine = make_engine(llm)
    prompt = PROMPTS[0]
    engine.add_request(prompt, SamplingParams(max_new_tokens=6, temperature=0, logprobs=3))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    ids = [t for o in outs for t in o.token_ids]
    logprobs = [lp for o in outs for lp in o.logprobs]
    assert len(ids) == len(logprobs) == 6
    with torch.no_grad():
        full = torch.log_softmax(llm.model(torch.tensor([prompt + ids])).float(), dim=-1)[0]
    for i, lp in enumerate(logprobs):
        row = full[len(prompt) - 1 + i]
        assert lp.token_id == ids[i] == lp.top[0][0]  # greedy: the chosen token is the most likely
        assert [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()
        torch.testing.assert_close(torch.tensor([lp.logprob] + [v for _, v in lp.top]),
                                   torch.stack([row[ids[i]], *torch.topk(row, 3).values]), rtol=1e-4, atol=1e-4)


def test_stop_token_ids_and_finish_reasons(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    engine = make_engine(llm)
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    full = [t for o in outs for t in o.token_ids]
    assert len(full) == 12 and outs[-1].finish_reason == "length" and outs[-1].finished
    stop_id = full[5]
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                        stop_token_ids=[stop_id]))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [t for o in outs for t in o.token_ids] == full[:full.index(stop_id)]
    assert outs[-1].finish_reason == "stop" and outs[-1].request_id == rid and not outs[-1].token_ids


def test_stop_strings_cut_the_text_like_llm_generate(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    prompt = "The quick brown fox"
    full = llm.generate(prompt, max_new_tokens=40, temperature=0)
    stop = next(c for c in full[3:] if c.isalpha())
    engine = make_engine(llm)
    engine.add_request(llm.tokenizer.encode(prompt), SamplingParams(max_new_tokens=40, temperature=0, stop=stop))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert "".join(o.text for o in outs) == llm.generate(prompt, max_new_tokens=40, temperature=0, stop=stop)
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == full[:full.index(stop)]


def test_length_is_clipped_to_the_context(llms, make_engine, reference_kernels):
    llm = llms["gpt2"]
    engine = make_engine(llm)
    rid = engine.add_request([3] * (CONTEXT - 5), SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))
    assert len(run_to_end(engine)[rid][0]) == 5


@pytest.mark.parametrize("call, words", [
    (lambda e: e.add_request([], GREEDY), "empty prompt"),
    (lambda e: e.add_request([1, 10 ** 6], GREEDY), "not a token id"),
    (lambda e: e.add_request([1] * CONTEXT, GREEDY), "context"),
    (lambda e: e.add_request([1, 2], {"temperature": 0}), "params must be a fastlm.SamplingParams"),
    (lambda e: [e.add_request([1, 2], GREEDY, request_id=0) for _ in range(2)], "already in use"),
])
def test_invalid_requests_raise_value_error(call, words, llms, make_engine):
    engine = make_engine(llms["gpt2"])
    with pytest.raises(ValueError, match=words):
        call(engine)
    engine.abort(0)


def test_a_request_larger_than_the_pool_is_refused(llms, make_engine):
    llm = llms["gpt2"]
    engine = make_engine(llm, block_size=4, kv_cache_memory=4 * 4 * 2 * 2 * 64 * 4)
    assert engine.stats()["kv_blocks_total"] == 4
    with pytest.raises(ValueError, match="needs 5 KV blocks but the pool has 4"):
        engine.add_request([1] * 10, SamplingParams(max_new_tokens=10))


@pytest.mark.parametrize("options, words", [
    (dict(block_size=0), "block_size must be"), (dict(max_num_seqs=1.5), "max_num_seqs must be"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be"),
    (dict(kv_cache_memory=10), "holds no block"), (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
])
def test_invalid_engine_options_raise_value_error(options, words, llms):
    from fastlm.runtime.engine import Engine

    with pytest.raises(ValueError, match=words):
        Engine(llms["gpt2"].model, **options)


@pytest.mark.parametrize("kwargs, words", [
    (dict(presence_penalty=3), "presence_penalty must be in"), (dict(frequency_penalty="x"), "frequency_penalty must be a number"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids must be >= 0"), (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
    (dict(max_new_tokens=3, min_new_tokens=4), "min_new_tokens .4. must be <= max_new_tokens"),
    (dict(ignore_eos=1), "ignore_eos must be True or False"), (dict(n=0), "n must be >= 1"),
    (dict(logprobs=-1), "logprobs must be >= 0"),
])
def test_invalid_engine_sampling_params(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)
