"""The generation loop over token ids: prefill -> decode steps -> stop.

    logits = prefill(model, cache, prompts)          # each prompt's last-position logits (B, V)
    tok = next_tokens(logits, ...)                    # sampling.py, on device
    loop: logits = step(tok); tok = next_tokens(...)  # step: DecodeStep, eager or a CUDA graph

Ragged batches: rows are prefilled separately (runs of consecutive equal-length prompts together)
through cache.select, so every row sits at its own length; the decode steps then run the whole batch
with per-row cache lengths (the model's decode_attention path). A row that has finished keeps stepping
on whatever it samples — harmless, its tokens are dropped on the host — so the step's shapes never
change and a captured CUDA graph stays valid.

Synchronization: the sampled tokens stay on the device in a (B, max_new_tokens) buffer; the host reads
the newest ones every `sync_every` steps to find eos (and, in llm.py, stop strings) and to stop when
every row is done. On CPU a read costs nothing, so it happens every step (no wasted steps after the
last row ends); on a GPU plain generation reads every STOP_CHECK_INTERVAL steps (at most that many
wasted steps at the end), streaming every step. The stepping itself never reads the device.
"""
from typing import Iterator, List, Sequence

import torch

from fastlm.runtime.sampling import SamplingParams, make_generator, mark_seen, next_tokens

STOP_CHECK_INTERVAL = 8  # decode steps between host reads of new tokens on a GPU (not streaming)


def prefill(model, cache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Write every prompt into its cache row; return each prompt's last-position logits (B, V)."""
    device = cache.device
    rows, start = [], 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and len(prompts[end]) == len(prompts[start]):
            end += 1
        ids = torch.tensor(prompts[start:end], dtype=torch.long, device=device)  # (rows, T)
        part = cache if (start, end) == (0, len(prompts)) else cache.select(slice(start, end))
        rows.append(last_position_logits(model, ids, part))
        start = end
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def last_position_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """(B, T) ids -> (B, V) logits of the last position; the lm_head runs for that position only."""
    return model(ids, cache=cache, last_only=True)[:, -1]


class DecodeStep:
    """One batched decode step: tokens (B,) -> logits (B, V), advancing the cache by one. Eager; see
    cuda_graph.GraphedDecodeStep for the captured version with the same interface."""

    uses_cuda_graph = False  # callers (and GPU tests) check this to see whether a graph replays
    capture_error = None  # why make_decode_step fell back to this eager step on a GPU (None: it did not)

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, None], cache=self.cache)[:, -1]


def new_token_budget(prompt_lengths: Sequence[int], max_new_tokens: int, context: int) -> int:
    """max_new_tokens clipped so that the longest prompt plus its new tokens fits the context."""
    longest = max(prompt_lengths)
    if longest >= context:
        raise ValueError(f"prompt is {longest} tokens but the model's context is {context} tokens "
                         f"(at most {context - 1} prompt tokens leave room to generate)")
    return min(max_new_tokens, context - longest)


class TokenLoop:
    """Iterates over new token ids: each item is one list per row with the ids that row produced since
    the previous item ([] once the row is done). A row is done at eos (not returned), after
    max_new_tokens, or when the consumer calls finish(row) (stop strings)."""

    def __init__(self, model, cache, step, prompts, params: SamplingParams, eos_ids=(), sync_every: int = 1,
                 vocab_size=None):
        self.model, self.cache, self.step = model, cache, step
        self.vocab_size = vocab_size  # ids >= this are never sampled (None: the model's whole vocabulary)
        self.prompts, self.params = [list(p) for p in prompts], params
        self.eos_ids = frozenset(eos_ids)
        self.sync_every = sync_every
        self.done = [False] * len(prompts)
        self.counts = [0] * len(prompts)  # new tokens returned per row

    def finish(self, row: int) -> None:
        self.done[row] = True

    def __iter__(self) -> Iterator[List[List[int]]]:
        n = self.params.max_new_tokens
        with torch.no_grad():  # not around the yields: the consumer's code runs in its own mode
            state = self._start(n)
        read = 0  # columns of the token buffer already handed to the host
        for i in range(1, n + 1):
            if i == n or i - read >= self.sync_every:
                yield self._take(state["out"][:, read:i].tolist())
                read = i
                if all(self.done):
                    return
            if i == n:
                return
            with torch.no_grad():
                self._advance(state, i)

    def _start(self, n: int) -> dict:
        """Prefill and sample the first new token into a (B, n) device buffer."""
        params, device = self.params, self.cache.device
        generator = make_generator(params.seed, device)
        seen = self._prompt_presence() if params.repetition_penalty != 1.0 else None
        out = torch.empty(len(self.prompts), n, dtype=torch.long, device=device)  # (B, n) new tokens
        tok = next_tokens(prefill(self.model, self.cache, self.prompts), params, generator, seen, self.vocab_size)
        out[:, 0] = tok
        return {"out": out, "tok": tok, "generator": generator, "seen": seen}

    def _advance(self, state: dict, i: int) -> None:
        """One decode step: feed the last token, sample the next into column i. No host sync."""
        mark_seen(state["seen"], state["tok"])
        logits = self.step(state["tok"])
        state["tok"] = next_tokens(logits, self.params, state["generator"], state["seen"], self.vocab_size)
        state["out"][:, i] = state["tok"]

    def _take(self, chunk: List[List[int]]) -> List[List[int]]:
        """Cut each row's new ids at its first eos; mark rows done."""
        result = []
        for row, ids in enumerate(chunk):
            if self.done[row]:
                result.append([])
                continue
            for j, token in enumerate(ids):
                if token in self.eos_ids:
                    ids, self.done[row] = ids[:j], True
                    break
            self.counts[row] += len(ids)
            if self.counts[row] >= self.params.max_new_tokens:
                self.done[row] = True
            result.append(ids)
        return result

    def _prompt_presence(self) -> torch.Tensor:
        """(B, V) bool: which tokens each prompt contains (for the repetition penalty)."""
        vocab = self.model.config.vocab_size
        seen = torch.zeros(len(self.prompts), vocab, dtype=torch.bool, device=self.cache.device)
        for row, ids in enumerate(self.prompts):
            seen[row, torch.tensor(ids, dtype=torch.long, device=self.cache.device)] = True
        return seen


def generate_ids(model, prompts, params: SamplingParams, eos_ids=(), step_factory=DecodeStep,
                 cache=None) -> List[List[int]]:
    """Plain batch generation over ids: returns each row's new ids (eos excluded)."""
    budget = new_token_budget([len(p) for p in prompts], params.max_new_tokens, model.config.max_seq_len)
    if budget != params.max_new_tokens:
        params = _with_budget(params, budget)
    if cache is None:
        cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + budget)
    results = [[] for _ in prompts]
    loop = TokenLoop(model, cache, step_factory(model, cache), prompts, params, eos_ids,
                     sync_every=default_sync_every(cache.device, streaming=False))
    for chunk in loop:
        for row, ids in enumerate(chunk):
            results[row].extend(ids)
    return results


def default_sync_every(device, streaming: bool) -> int:
    if torch.device(device).type == "cpu" or streaming:
        return 1
    return STOP_CHECK_INTERVAL


def _with_budget(params: SamplingParams, budget: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_new_tokens=budget)


def check_prompt_ids(prompts, vocab_size: int, name: str = "prompts") -> List[List[int]]:
    """A list of non-empty lists of ids in [0, vocab_size); ValueError naming the argument otherwise."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of lists of token ids, got {type(prompts).__name__}")
    checked = []
    for i, ids in enumerate(prompts):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"{name}[{i}] must be a non-empty list of token ids (empty prompt)")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"{name}[{i}] has {t!r}, not a token id in [0, {vocab_size})")
        checked.append(list(ids))
    return checked
