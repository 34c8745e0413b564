"""The KV pool's bookkeeping: which blocks each sequence holds, and the prefix cache.

A block holds block_size consecutive tokens of one sequence. Blocks are reference counted: a prompt
block can be shared by several sequences (the `n` samples of one request, requests with a common
prefix). Prefix caching (after nano-vllm and vLLM): once a block is full and its K/V computed, it is
registered under a chain hash h_i = hash((h_{i-1}, tokens of block i)), so a hash names the whole
prefix up to and including the block. A new sequence reuses the registered blocks of its longest
cached prefix; a lookup also compares the stored (parent hash, tokens) key, so a hash collision can
never hand out another prefix's K/V unless the parent hashes themselves collided. Only full blocks are
registered, and at most (num_tokens - 1) // block_size blocks are matched, so the last token is always
recomputed (its logits sample the next token: a step never has nothing to compute).

Free blocks keep their cached content until they are reused: the free list is ordered by eviction
priority — blocks that cache nothing first, then cached blocks least recently freed first. A sequence
frees its blocks last-to-first, so its prefix outlives its tail.
"""
from collections import OrderedDict
from typing import List, Optional, Tuple

from fastlm.runtime.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "key")

    def __init__(self, block_id: int):
        self.block_id, self.ref_count = block_id, 0
        self.hash: Optional[int] = None  # set while the block is registered in the prefix cache
        self.key: Optional[tuple] = None  # (parent hash, token ids): the exact content check


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: "OrderedDict[int, None]" = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict = {}  # chain hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------
    def chain_hash(self, seq: Sequence, i: int) -> int:
        """Hash of seq's prefix through full block i (memoized on the sequence: tokens never change)."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[j - 1] if j else None
            seq.block_hashes.append(hash((parent, seq.block_tokens(j, self.block_size))))
        return seq.block_hashes[i]

    def match_prefix(self, seq: Sequence) -> List[int]:
        """Block ids caching seq's longest prefix of full blocks, never its last token. Changes nothing."""
        if not self.enable_prefix_caching:
            return []
        matched = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = self.chain_hash(seq, i)
            block_id = self.cached.get(h)
            parent = seq.block_hashes[i - 1] if i else None
            if block_id is None or self.blocks[block_id].key != (parent, seq.block_tokens(i, self.block_size)):
                break
            matched.append(block_id)
        return matched

    def free_blocks_taken_by(self, matched: List[int]) -> int:
        """How many of the matched blocks sit in the free list (reusing them takes them out)."""
        return sum(1 for b in matched if self.blocks[b].ref_count == 0)

    def register_full_blocks(self, seq: Sequence, since: int = 0) -> None:
        """Register the blocks filled since token `since` (their K/V now computed); the first block
        registered for a prefix stays its cache entry."""
        if not self.enable_prefix_caching:
            return
        for i in range(since // self.block_size, seq.num_computed_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            h = self.chain_hash(seq, i)
            if h in self.cached:
                continue  # the same prefix computed twice (or a collision): keep the first
            block.hash, block.key = h, (seq.block_hashes[i - 1] if i else None, seq.block_tokens(i, self.block_size))
            self.cached[h] = block.block_id

    # ---- allocation ---------------------------------------------------------------------------
    def take_matched(self, seq: Sequence, matched: List[int]) -> None:
        """Give a sequence without blocks its cached prefix."""
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(matched)
        seq.num_computed_tokens = len(matched) * self.block_size

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover its first num_tokens tokens; False (nothing taken) if short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._new_block())
        return True

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody holds go back to the free list (see eviction order)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)  # caches nothing: reuse it first
        seq.block_table = []
        seq.num_computed_tokens = 0

    def can_fork(self, parent: Sequence) -> bool:
        return parent.num_computed_tokens % self.block_size == 0 or bool(self.free)

    def fork(self, parent: Sequence, child: Sequence) -> Optional[Tuple[int, int]]:
        """Give child (same computed prefix as parent; check can_fork first) parent's full computed
        blocks, shared, and a copy of the partly filled one: returns the (source, destination) blocks
        whose K/V the caller must copy, or None when the computed prefix ends on a block boundary."""
        full, partial = divmod(parent.num_computed_tokens, self.block_size)
        for block_id in parent.block_table[:full]:
            self.blocks[block_id].ref_count += 1
        child.block_table = parent.block_table[:full]
        child.num_computed_tokens = parent.num_computed_tokens
        if not partial:
            return None
        copy = self._new_block()
        child.block_table.append(copy)
        return parent.block_table[full], copy

    def _new_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = block.key = None
        block.ref_count = 1
        return block_id
