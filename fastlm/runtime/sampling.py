"""Sampling parameters, logits processing and token sampling.

The ladder's first two rungs: `process_logits` turns the model's last-position logits (B, V) into
fp32 scores with disallowed tokens at -inf, `sample` picks one token per row. Both run entirely on
the logits' device and never read a value back to the CPU, so a decode step followed by sampling
has no GPU->CPU synchronization.

Order (the same as transformers' generate): repetition penalty, temperature, top-k, top-p, min-p.
- repetition_penalty p (HF / CTRL): a logit of a token already seen (prompt or generated) is divided
  by p when positive and multiplied by p when negative.
- temperature 0 means greedy (argmax); the other filters then only matter through the penalty.
- top_k 0, top_p 1 and min_p 0 switch their filter off.
Sampling uses the exponential race: argmax(probs / E) with E ~ Exp(1) i.i.d. picks index i with
probability probs[i] (gpt-fast does the same); E comes from a seeded torch.Generator on the device.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastlm.kernels.argmax import argmax_rows
from fastlm.model.validation import check_int, check_number, check_seed


@dataclass
class SamplingParams:
    """What to generate and when to stop; validated on construction (ValueError naming the argument)."""

    max_new_tokens: int = 64  # upper bound on new tokens per sequence (clipped to the context)
    temperature: float = 1.0  # 0 = greedy; otherwise logits / temperature
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set with probability mass >= top_p; 1 = off
    min_p: float = 0.0  # drop tokens with probability < min_p * max probability; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already present; 1 = off
    stop: Sequence[str] = ()  # strings that end a sequence (not returned)
    seed: Optional[int] = None  # seeds sampling; None = nondeterministic
    # The engine's options (fastlm.runtime.engine), also taken by LLM.generate/stream/generate_tokens:
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    stop_token_ids: Sequence[int] = ()  # ids that end a sequence like eos (not returned)
    min_new_tokens: int = 0  # eos and stop_token_ids are masked out until this many tokens exist
    ignore_eos: bool = False  # keep generating past eos (benchmarks)
    n: int = 1  # independent samples of the prompt (they share its KV blocks)
    logprobs: Optional[int] = None  # per new token: its log-probability and the top `logprobs` ones

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = tuple(self.stop or ())
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_number("temperature", self.temperature, 0)
        check_int("top_k", self.top_k, 0)
        check_number("top_p", self.top_p, 0, 1, min_open=True)
        check_number("min_p", self.min_p, 0, 1)
        check_number("repetition_penalty", self.repetition_penalty, 0, min_open=True)
        check_seed("seed", self.seed, optional=True)
        self._check_engine_options()
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a string or a list of non-empty strings, got {s!r}")

    def _check_engine_options(self):
        for name in ("presence_penalty", "frequency_penalty"):
            check_number(name, getattr(self, name), -2, 2)
        for t in self.stop_token_ids:
            check_int("stop_token_ids", t, 0)
        check_int("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        check_int("n", self.n, 1)
        check_int("logprobs", self.logprobs, 0, optional=True)

    @property
    def penalized(self) -> bool:
        """True when the logits depend on the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        """temperature 0, top_k 1, or a temperature too small for fp32 (it would divide by zero)."""
        return self.temperature < _FP32_TINY or self.top_k == 1


_FP32_TINY = torch.finfo(torch.float32).tiny


def make_generator(seed: Optional[int], device) -> Optional[torch.Generator]:
    """A generator on `device` seeded with `seed`; None (torch's global RNG) when seed is None."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V) fp32, seen (B, V) bool: tokens already present in each row."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep token i (in descending order) iff the mass strictly before it is < p (the first always)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None):
    """logits (B, V) -> fp32 scores (B, V) with filtered tokens at -inf: log-probabilities up to a
    constant per row (with a temperature, each row's best scores 0). `seen` is required when
    repetition_penalty != 1. With temperature 0 only the penalty applies (argmax follows)."""
    x = logits.float()
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("seen must be given when repetition_penalty != 1")
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return x
    if params.temperature != 1.0:
        # Shifted so the best token scores 0: a tiny temperature sends the others to -inf, never inf/inf = nan.
        x = (x - x.amax(dim=-1, keepdim=True)) / params.temperature
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return min_p_filter(x, params.min_p)


def sample(scores: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None):
    """scores (B, V) from process_logits -> token ids (B,) int64, on the scores' device, no sync."""
    if params.greedy:
        return argmax_rows(scores)
    probs = torch.softmax(scores, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    race.clamp_min_(torch.finfo(race.dtype).tiny)  # an exact 0 would turn a masked 0/0 into nan
    return torch.argmax(probs / race, dim=-1)


def next_tokens(logits, params: SamplingParams, generator=None, seen=None, vocab_size=None) -> torch.Tensor:
    """The model's last-position logits (B, V) -> next ids (B,). Greedy without a penalty skips the
    fp32 copy entirely (argmax of the raw logits). vocab_size < V: only ids below it can be drawn (a
    vocabulary padded beyond the tokenizer's tokens, e.g. to a multiple of 64)."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]
        seen = None if seen is None else seen[:, :vocab_size]
    if params.greedy and params.repetition_penalty == 1.0:
        return argmax_rows(logits)
    return sample(process_logits(logits, params, seen), params, generator)


def mark_seen(seen: Optional[torch.Tensor], tokens: torch.Tensor) -> None:
    """Record tokens (B,) or (B, T) in the (B, V) presence mask, in place (no-op without a mask)."""
    if seen is not None:
        index = tokens if tokens.dim() == 2 else tokens[:, None]
        seen.scatter_(1, index, True)
