"""Logits processing against transformers' own logits processors; sampling statistics and seeding."""
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastlm.runtime.sampling import SamplingParams, make_generator, mark_seen, next_tokens, process_logits


def hf_process(logits, input_ids, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    scores = logits.float()
    if repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(input_ids, scores)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(input_ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(input_ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(input_ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(input_ids, scores)
    return scores


@pytest.mark.parametrize("options", [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_k=1000),
    dict(top_p=0.9),
    dict(top_p=0.3, temperature=1.3),
    dict(min_p=0.05),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8, temperature=0.5, top_k=17, top_p=0.8, min_p=0.02),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_process_logits_matches_transformers(options, dtype):
    batch, vocab = 3, 131
    # distinct values (also in bf16): with ties, which tied token top-p drops depends on the sort
    logits = torch.stack([torch.randperm(vocab) for _ in range(batch)]).float().mul(0.05).sub(3).to(dtype)
    input_ids = torch.randint(0, vocab, (batch, 9))
    assert_processing_matches_transformers(logits, input_ids, options)


def assert_processing_matches_transformers(logits, input_ids, options):
    """process_logits equals transformers' processors on the same logits and history: the same tokens
    masked, and the same scores up to a constant per row (ours are shifted so each row's best is 0)."""
    seen = torch.zeros(logits.shape, dtype=torch.bool)
    mark_seen(seen, input_ids)
    ours = process_logits(logits, SamplingParams(**options), seen)
    theirs = hf_process(logits, input_ids, **options)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    ours, theirs = ours - ours.amax(-1, keepdim=True), theirs - theirs.amax(-1, keepdim=True)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(4, 97)
    expected = logits.argmax(-1)
    assert torch.equal(next_tokens(logits, SamplingParams(temperature=0)), expected)
    gen = make_generator(3, logits.device)
    assert torch.equal(next_tokens(logits, SamplingParams(temperature=1.5, top_k=1), gen), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_in_half_precision_keeps_the_first_of_tied_maxima(dtype):
    logits = torch.randn(3, 50).to(dtype)
    logits[0, [7, 30]] = 9.0  # a tie: argmax's first index, with or without an fp32 copy
    logits[1, 2:] = -float("inf")
    logits[2, :] = 0.0
    ids = next_tokens(logits, SamplingParams(temperature=0))
    assert ids.tolist() == [7, int(logits[1, :2].float().argmax()), 0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = probs.log().expand(40000, -1)
    gen = make_generator(0, logits.device)
    tokens = next_tokens(logits, SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.01)
    assert freq[4] == 0


def test_filtered_tokens_are_never_sampled():
    logits = torch.randn(1, 50).expand(5000, -1)
    allowed = torch.topk(logits[0], 3).indices
    tokens = next_tokens(logits, SamplingParams(top_k=3), make_generator(1, logits.device))
    assert set(tokens.tolist()) == set(allowed.tolist())


def test_seed_reproduces_and_different_seeds_differ():
    logits = torch.randn(8, 200)
    params = SamplingParams(temperature=1.0)
    first = next_tokens(logits, params, make_generator(7, logits.device))
    again = next_tokens(logits, params, make_generator(7, logits.device))
    other = next_tokens(logits, params, make_generator(8, logits.device))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(seed=-3), "seed must be in [0, 18446744073709551615]"),
    (dict(seed=2 ** 64), "seed must be in [0, 18446744073709551615]"),
    (dict(stop=5), "stop must be a string or a list"),
    (dict(stop=["ok", ""]), "stop must be"),
])
def test_invalid_params_raise_value_error_naming_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        SamplingParams(**kwargs)
