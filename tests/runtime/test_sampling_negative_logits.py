"""Logits that are all negative, the top ones included: the repetition penalty's negative branch (a seen
token's negative logit is multiplied by the penalty, not divided) decides which token wins."""
import pytest
import torch

from fastlm.runtime.sampling import SamplingParams, make_generator, next_tokens
from tests.runtime.test_sampling import assert_processing_matches_transformers


@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(repetition_penalty=2.0, temperature=0.6, top_k=9),
    dict(repetition_penalty=1.5, top_p=0.6),
    dict(repetition_penalty=0.8, temperature=1.4, min_p=0.1),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_negative_logits_match_transformers(options, dtype):
    batch, vocab = 4, 113
    # distinct values in [-9.6, -4]: the most likely tokens have negative logits too
    logits = torch.stack([torch.randperm(vocab) for _ in range(batch)]).float().mul(0.05).sub(9.6).to(dtype)
    assert logits.max() < 0
    input_ids = torch.stack([torch.topk(row.float(), 6).indices[[0, 2, 5]] for row in logits])  # top ones seen
    input_ids = torch.cat([input_ids, torch.randint(0, vocab, (batch, 5))], dim=1)
    assert_processing_matches_transformers(logits, input_ids, options)


@pytest.mark.parametrize("penalty, winner", [(2.0, 1), (0.5, 0)])
def test_penalty_on_a_negative_top_logit_decides_the_greedy_token(penalty, winner):
    """Token 0 (seen, -1.0) vs token 1 (unseen, -1.5): a penalty of 2 makes token 0 -2.0 (token 1 wins);
    0.5 makes it -0.5 (token 0 stays). Dividing instead would do the opposite in both cases."""
    logits = torch.tensor([[-1.0, -1.5, -4.0, -6.0]])
    seen = torch.tensor([[True, False, False, True]])
    for params in (SamplingParams(temperature=0, repetition_penalty=penalty),
                   SamplingParams(temperature=1.0, top_k=1, repetition_penalty=penalty)):
        assert next_tokens(logits, params, make_generator(0, logits.device), seen.clone()).tolist() == [winner]
