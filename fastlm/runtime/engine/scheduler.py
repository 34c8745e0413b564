"""Continuous batching: which tokens of which sequences the next step computes.

Each step, in order (after vLLM's scheduler and nano-vllm's, with mixed prefill + decode steps):
1. the running sequences, oldest first: a decode (one token) or the next chunk of an unfinished
   prefill, as long as the step's token budget (max_num_batched_tokens) lasts. A sequence whose next
   tokens need a block when none is free preempts the newest running sequence (its blocks are freed,
   it waits and is recomputed later — possibly itself); nothing fails and nothing is dropped;
2. waiting sequences, oldest first, while the budget, max_num_seqs and the free blocks allow: each
   takes its cached prefix (prefix caching) and a first chunk of its remaining tokens. A sequence whose
   next uncached block is being computed in this very step by another one (requests arriving together
   with a shared system prompt) waits one step, and then reuses it instead of computing it again.
A long prompt is thus chunked across steps, and decodes never wait behind a long prefill.
"""
import bisect
from dataclasses import dataclass, field
from typing import List, Tuple

from fastlm.runtime.engine.block_manager import BlockManager
from fastlm.runtime.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    """The work of one step: spans of (sequence, number of tokens), decodes (span 1) first."""
    decodes: List[Sequence] = field(default_factory=list)
    prefills: List[Tuple[Sequence, int]] = field(default_factory=list)

    @property
    def spans(self) -> List[Tuple[Sequence, int]]:
        return [(seq, 1) for seq in self.decodes] + self.prefills

    def add(self, seq: Sequence, span: int) -> None:
        if span == 1:
            self.decodes.append(seq)
        else:
            self.prefills.append((seq, span))

    def __bool__(self):
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: List[Sequence] = []  # both lists sorted oldest first (Sequence.sort_key)
        self.running: List[Sequence] = []
        self.preemptions = 0
        self.prefix_cache_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds its blocks (a fork)."""
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step, budget = ScheduledStep(), self.max_num_batched_tokens
        in_flight = set()  # chain hashes of the full blocks this step computes
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted by an older sequence in this loop
            span = min(seq.num_uncomputed_tokens, budget)
            if self._grow_or_preempt(seq, seq.num_computed_tokens + span):
                step.add(seq, span)
                budget -= span
                in_flight.update(self._blocks_filled(seq, span))
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if self._next_block_in_flight(seq, in_flight):
                i += 1  # admitted next step, with that block cached
                continue
            span = self._admit(seq, budget)
            if span == 0:
                break
            self.waiting.pop(i)
            step.add(seq, span)
            budget -= span
            in_flight.update(self._blocks_filled(seq, span))
        return step

    def _blocks_filled(self, seq: Sequence, span: int) -> list:
        """Chain hashes of the blocks that computing seq's next `span` tokens fills (prefix caching only)."""
        if not self.blocks.enable_prefix_caching:
            return []
        size = self.blocks.block_size
        first, end = seq.num_computed_tokens // size, (seq.num_computed_tokens + span) // size
        return [self.blocks.chain_hash(seq, i) for i in range(first, end)]

    def _next_block_in_flight(self, seq: Sequence, in_flight: set) -> bool:
        if not in_flight:
            return False
        cached = len(self.blocks.match_prefix(seq))
        return cached < (seq.num_tokens - 1) // self.blocks.block_size and self.blocks.chain_hash(seq, cached) in in_flight

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished or aborted): free its blocks, forget it."""
        if seq.status is Status.RUNNING:
            self.blocks.release(seq)
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix and blocks for a first chunk; 0 if they don't fit."""
        matched = self.blocks.match_prefix(seq)
        computed = len(matched) * self.blocks.block_size
        span = min(seq.num_tokens - computed, budget)
        need = self.blocks.blocks_for(computed + span) - len(matched) + self.blocks.free_blocks_taken_by(matched)
        if need > self.blocks.num_free_blocks:
            return 0
        self.blocks.take_matched(seq, matched)
        self.blocks.grow(seq, computed + span)
        self.prefix_cache_hit_tokens += computed
        self.add_running(seq)
        return span

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for seq's first num_tokens tokens, preempting the newest running sequences as long as
        needed; False when seq itself was the newest and got preempted."""
        while not self.blocks.grow(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits and recomputes its tokens when readmitted."""
        self.blocks.release(seq)
        self.running.remove(seq)
        self.preemptions += 1
        self.add(seq)
