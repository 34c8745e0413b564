"""The block manager and the scheduler on their own (no model): prefix-cache matching and its traps,
eviction order, reference counts, preemption."""
from fastlm.runtime.engine.block_manager import BlockManager
from fastlm.runtime.engine.scheduler import Scheduler
from fastlm.runtime.engine.sequence import Sequence, Status
from fastlm.runtime.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=4)


def seq(tokens, arrival=0):
    return Sequence(arrival, 0, arrival, list(tokens), PARAMS, len(tokens) + 4)


def computed(manager, s):
    """Give s blocks for all its tokens, mark them computed and registered (what a step does)."""
    assert manager.grow(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    manager.register_full_blocks(s)


def test_match_reuses_full_blocks_only_and_never_the_last_token():
    m = BlockManager(num_blocks=8, block_size=4)
    first = seq(range(10))  # blocks [0-3] [4-7] full, [8-9] partial
    computed(m, first)
    assert len(m.cached) == 2  # the partial block is not registered
    assert m.match_prefix(seq(range(10))) == first.block_table[:2]
    assert m.match_prefix(seq(range(8))) == first.block_table[:1]  # 8 tokens: the second block holds the last
    assert m.match_prefix(seq([0, 1, 2, 9, 4, 5, 6, 7, 8])) == []  # a different first block: nothing
    assert m.match_prefix(seq([0, 1, 2, 3, 4, 5, 6, 9, 8])) == first.block_table[:1]


def test_a_hash_collision_is_caught_by_the_token_check():
    m = BlockManager(num_blocks=4, block_size=2)
    first = seq([1, 2, 3, 4, 5])
    computed(m, first)
    other = seq([7, 8, 3, 4, 5])
    m.chain_hash(other, 1)
    other.block_hashes[:] = first.block_hashes  # pretend both prefixes hash alike
    assert m.match_prefix(other) == []


def test_shared_blocks_are_reference_counted_and_freed_to_the_cache():
    m = BlockManager(num_blocks=6, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    computed(m, a)
    b = seq([1, 2, 3, 4, 9], arrival=1)
    matched = m.match_prefix(b)
    assert matched == a.block_table[:2] and m.free_blocks_taken_by(matched) == 0
    m.take_matched(b, matched)
    assert b.num_computed_tokens == 4 and [m.blocks[i].ref_count for i in matched] == [2, 2]
    m.release(a)
    assert [m.blocks[i].ref_count for i in matched] == [1, 1] and m.num_free_blocks == 4
    m.release(b)
    assert m.num_free_blocks == 6 and len(m.cached) == 2  # still cached while free
    c = seq([1, 2, 3, 4, 7], arrival=2)
    matched = m.match_prefix(c)
    assert len(matched) == 2 and m.free_blocks_taken_by(matched) == 2


def test_eviction_reuses_uncached_blocks_first_then_the_least_recently_freed():
    m = BlockManager(num_blocks=4, block_size=2)
    old, new = seq([1, 2, 9]), seq([3, 4, 9], arrival=1)
    computed(m, old)  # blocks: [1 2] cached, [9] uncached
    computed(m, new)
    (cached_old, uncached_old), (cached_new, uncached_new) = old.block_table, new.block_table
    m.release(old)
    m.release(new)
    assert list(m.free) == [uncached_new, uncached_old, cached_old, cached_new]  # uncached first, then LRU
    taker = seq([5, 6, 7, 8, 9, 10], arrival=2)
    assert m.grow(taker, 6)
    assert cached_old in taker.block_table and cached_new not in taker.block_table
    assert m.match_prefix(seq([1, 2, 5])) == [] and m.match_prefix(seq([3, 4, 5])) == [cached_new]


def test_grow_takes_nothing_when_short():
    m = BlockManager(num_blocks=2, block_size=2)
    s = seq([1, 2, 3, 4, 5])
    assert not m.grow(s, 5) and s.block_table == [] and m.num_free_blocks == 2


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    m = BlockManager(num_blocks=8, block_size=4)
    parent = seq(range(10))
    computed(m, parent)
    child = seq(range(10), arrival=1)
    assert m.can_fork(parent)
    src, dst = m.fork(parent, child)
    assert child.block_table[:2] == parent.block_table[:2] and src == parent.block_table[2] and dst == child.block_table[2]
    assert child.num_computed_tokens == 10 and m.blocks[src].ref_count == 1 and m.blocks[parent.block_table[0]].ref_count == 2


def test_scheduler_preempts_the_newest_and_readmits_it_first():
    m = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(m, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = seq([1, 2, 3], 0), seq([4, 5, 6], 1), seq([7, 8, 9], 2)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert [s for s, _ in step.prefills] == [a, b] and c.status is Status.WAITING  # c: no blocks left
    for s, span in step.spans:
        s.num_computed_tokens += span
        s.token_ids.append(0)  # a sampled token: 4 tokens, still 2 blocks each
    step = sched.schedule()
    assert step.decodes == [a, b] and sched.preemptions == 0
    for s in step.decodes:
        s.num_computed_tokens += 1
        s.token_ids.append(0)  # 5 tokens: a third block each
    step = sched.schedule()
    assert step.decodes == [a] and b.status is Status.WAITING and sched.preemptions == 1
    assert sched.waiting == [b, c] and b.num_computed_tokens == 0 and len(a.block_table) == 3


def test_scheduler_budget_and_max_num_seqs():
    m = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(m, max_num_seqs=2, max_num_batched_tokens=10)
    seqs = [seq(range(10 * i, 10 * i + 8), i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert step.prefills == [(seqs[0], 8), (seqs[1], 2)] and sched.waiting == [seqs[2]]
