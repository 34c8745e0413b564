"""Per-request sampling of one step's logits: each row has its own SamplingParams.

Rows are grouped by the options that shape the distribution (temperature, top-k/p, min-p,
repetition penalty); each group runs fastlm.runtime.sampling's process_logits once, batched. The
random draws are per row for seeded sequences (each has its own torch.Generator, so a request's
tokens do not depend on what else runs in the batch) and one draw for the unseeded rows of a group.
Before the groups, per row: presence/frequency penalties (on the generated tokens) and, until
min_new_tokens exist, eos and stop_token_ids masked out.
Log-probabilities are those of the model's distribution (log_softmax of the raw logits, before any
processing), as vLLM and OpenAI report them.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence as Seq, Tuple

import torch

from fastlm.kernels.argmax import argmax_rows
from fastlm.runtime.engine.sequence import Sequence
from fastlm.runtime.sampling import process_logits, sample


@dataclass
class TokenLogprobs:
    """A generated token's log-probability and the `logprobs` most likely tokens at its position."""
    token_id: int
    logprob: float
    top: List[Tuple[int, float]]  # (token id, log-probability), most likely first


def sample_rows(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: Seq[int],
                greedy: Optional[torch.Tensor] = None) -> Tuple[List[int], List[Optional[TokenLogprobs]]]:
    """logits (R, V) of the rows that sample this step, in seqs' order -> (token ids, logprobs or None).
    greedy: torch.argmax(logits, -1) when the step computed it (a compiled CPU step): a step whose rows
    are all plainly greedy (no penalties, no min_new_tokens left) takes it as it is."""
    if greedy is not None and all(_plainly_greedy(seq) for seq in seqs):
        tokens = greedy.tolist()
        return tokens, _logprobs(logits, seqs, tokens)
    scores = _adjusted(logits, seqs, eos_ids)
    groups = list(_groups(seqs).values())
    if len(groups) == 1:  # the common case: no (R, V) row copies
        tokens = _sample_group(scores, list(seqs))
    else:
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for rows in groups:
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = _sample_group(scores[index], [seqs[r] for r in rows])
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, seqs, token_list)


def _group_key(seq: Sequence):
    p = seq.params
    if p.greedy:
        return (0.0, 0, 1.0, 0.0, p.repetition_penalty)
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)


def _groups(seqs) -> Dict[tuple, List[int]]:
    groups: Dict[tuple, List[int]] = {}
    for row, seq in enumerate(seqs):
        groups.setdefault(_group_key(seq), []).append(row)
    return groups


def _sample_group(scores: torch.Tensor, seqs: List[Sequence]) -> torch.Tensor:
    params = seqs[0].params  # the group's distribution options are the same in every row
    if _argmax_picks(params):
        return argmax_rows(scores)  # in place: process_logits would only copy the rows to fp32
    seen = _presence(scores, seqs) if params.repetition_penalty != 1.0 else None
    processed = process_logits(scores, params, seen)
    if params.greedy or all(seq.generator is None for seq in seqs):
        return sample(processed, params, None)
    return torch.cat([sample(processed[r:r + 1], params, seq.generator) for r, seq in enumerate(seqs)])


def _adjusted(logits, seqs, eos_ids) -> torch.Tensor:
    """The logits with presence/frequency penalties and min_new_tokens masks applied (fp32 copy only
    when some row needs it)."""
    rows = [r for r, s in enumerate(seqs) if _needs_adjusting(s)]
    if not rows:
        return logits
    scores = logits.to(torch.float32, copy=True)  # the raw logits stay as they are (logprobs)
    for r in rows:
        seq, p = seqs[r], seqs[r].params
        if p.presence_penalty or p.frequency_penalty:
            counts = _counts(scores, seq.output_ids)
            scores[r] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if seq.num_output_tokens < p.min_new_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            scores[r, banned] = float("-inf")
    return scores


def _argmax_picks(params) -> bool:
    """Options whose token is the argmax of the (adjusted) logits, nothing to process."""
    return params.greedy and params.repetition_penalty == 1.0


def _plainly_greedy(seq: Sequence) -> bool:
    """The row's token is its raw logits' argmax: _argmax_picks and nothing for _adjusted to do."""
    return _argmax_picks(seq.params) and not _needs_adjusting(seq)


def _needs_adjusting(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.presence_penalty or p.frequency_penalty) or seq.num_output_tokens < p.min_new_tokens


def _counts(scores, ids) -> torch.Tensor:
    counts = torch.zeros(scores.shape[-1], device=scores.device)
    if ids:
        counts.index_add_(0, torch.tensor(ids, device=scores.device), torch.ones(len(ids), device=scores.device))
    return counts


def _presence(scores, seqs) -> torch.Tensor:
    """(R, V) bool: the tokens present in each row's sequence (prompt + generated)."""
    seen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for r, seq in enumerate(seqs):
        seen[r, torch.tensor(seq.token_ids, dtype=torch.long, device=scores.device)] = True
    return seen


def _logprobs(logits, seqs, tokens) -> List[Optional[TokenLogprobs]]:
    result: List[Optional[TokenLogprobs]] = [None] * len(seqs)
    rows = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return result
    logp = torch.log_softmax(logits[rows].float(), dim=-1)  # (R', V)
    for i, r in enumerate(rows):
        k = min(seqs[r].params.logprobs, logp.shape[-1])
        top = torch.topk(logp[i], k) if k else None
        top_list = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
        result[r] = TokenLogprobs(tokens[r], float(logp[i, tokens[r]]), top_list)
    return result
