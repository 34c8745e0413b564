"""Paged attention (decode and varlen prefill over a block pool) against an fp64 reference on the dense
K/V the pool was built from, by the comparison rule; the same K/V laid out with different block sizes
gives the same output. Physical blocks are placed at random, unused table entries hold junk, and free
pool slots hold NaN, so reading anything but the row's own tokens shows."""
import pytest
import torch

from fastlm.kernels import paged_decode_attention, paged_prefill_attention
from tests.compare import assert_close_by_rule
from tests.kernels.test_attention import ATOL, ON_CUDA, attention_plain, poisoned_outputs  # noqa: F401


def make_pool(dense, lengths, block_size, extra_columns=1):
    """Lay dense (B, S, Hkv, D) out as a pool (num_blocks, block_size, Hkv, D) with block tables int32
    (B, max_blocks): each row's first lengths[b] tokens in randomly placed blocks; free slots NaN."""
    B, S = dense.shape[:2]
    used = [-(-length // block_size) for length in lengths]
    n_blocks = sum(used) + 2  # two blocks no row owns
    pool = torch.full((n_blocks, block_size) + dense.shape[2:], float("nan"), dtype=dense.dtype)
    tables = torch.randint(-3, 1000, (B, -(-S // block_size) + extra_columns), dtype=torch.int32)  # junk
    physical = iter(torch.randperm(n_blocks).tolist())
    for b, length in enumerate(lengths):
        for j in range(used[b]):
            tables[b, j] = block = next(physical)
            tokens = dense[b, j * block_size: min(length, (j + 1) * block_size)]
            pool[block, : len(tokens)] = tokens
    return pool, tables


def dense_kv(B, S, Hkv, D, dtype):
    return torch.randn(B, S, Hkv, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype)


def run_decode(q, k, v, lengths, block_size, scale=None):
    k_cache, tables = make_pool(k, lengths, block_size)
    v_cache = _same_layout(v, k_cache, tables, lengths)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return paged_decode_attention(q, k_cache, v_cache, tables, seqlens, softmax_scale=scale)


def _same_layout(dense, like_pool, tables, lengths):
    """dense laid out in the blocks of tables (the pool layout of another tensor)."""
    pool = torch.full_like(like_pool, float("nan"))
    block_size = pool.shape[1]
    for b, length in enumerate(lengths):
        for p in range(length):
            pool[tables[b, p // block_size], p % block_size] = dense[b, p]
    return pool


def check_decode(case, dtype, block_size, scale=None):
    """case = (Sq, Hq, Hkv, D, lengths); returns the output for cross-layout comparisons."""
    Sq, Hq, Hkv, D, lengths = case
    B, S = len(lengths), max(lengths)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype)
    k, v = dense_kv(B, S, Hkv, D, dtype)
    out = run_decode(q, k, v, lengths, block_size, scale)
    seqlens = torch.tensor(lengths)
    args = dict(causal=True, scale=scale, q_positions=seqlens[:, None] - Sq + torch.arange(Sq), k_lengths=seqlens)
    ref = attention_plain(q.double(), k.double(), v.double(), **args)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_by_rule(out, ref, attention_plain(q, k, v, **args), atol=ATOL[dtype])
    return out


def run_prefill(q, k, v, q_lens, k_lens, block_size, scale=None):
    """q (total_q, Hq, D) packed; k, v dense (B, S, Hkv, D) laid out as a pool."""
    k_cache, tables = make_pool(k, k_lens, block_size)
    v_cache = _same_layout(v, k_cache, tables, k_lens)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return paged_prefill_attention(q, k_cache, v_cache, tables, cu, torch.tensor(k_lens, dtype=torch.int32),
                                   softmax_scale=scale)


def prefill_reference(q, k, v, q_lens, k_lens, scale=None):
    """Row by row with attention_plain (bottom-right causal), in q's dtype."""
    out, start = [], 0
    for b, (q_len, k_len) in enumerate(zip(q_lens, k_lens)):
        if q_len:
            rows = q[None, start: start + q_len]
            out.append(attention_plain(rows, k[b: b + 1, :k_len], v[b: b + 1, :k_len], True, scale)[0])
        start += q_len
    return torch.cat(out)


def check_prefill(case, dtype, block_size, scale=None):
    """case = (Hq, Hkv, D, q_lens, k_lens)."""
    Hq, Hkv, D, q_lens, k_lens = case
    q = torch.randn(sum(q_lens), Hq, D, dtype=dtype)
    k, v = dense_kv(len(k_lens), max(k_lens), Hkv, D, dtype)
    out = run_prefill(q, k, v, q_lens, k_lens, block_size, scale)
    ref = prefill_reference(q.double(), k.double(), v.double(), q_lens, k_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_by_rule(out, ref, prefill_reference(q, k, v, q_lens, k_lens, scale), atol=ATOL[dtype])
    return out


# (Sq, Hq, Hkv, D, lengths): GQA 1/4/8 and MQA, ragged lengths including 1 (or Sq), odd head dims
DECODE_CASES = [
    (1, 4, 1, 32, [1, 40, 17]),
    (1, 8, 2, 80, [33, 33]),
    (4, 8, 1, 64, [4, 29]),
    (8, 16, 2, 128, [70, 8, 9]),
    (3, 6, 6, 40, [5, 21]),
]
# (Hq, Hkv, D, q_lens, k_lens): whole prompts (q_len == k_len), chunks over a cached prefix, one
# query, an empty row
PREFILL_CASES = [
    (4, 1, 32, [7, 1, 13], [7, 30, 40]),
    (8, 2, 80, [20, 0, 5], [20, 3, 37]),
    (2, 2, 64, [33], [33]),
    (8, 1, 128, [3, 16], [19, 16]),
]


# ---------------------------------------------------------------------------------------------------
# The references (the CPU path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_reference(case, dtype, reference_kernels):
    check_decode(case, dtype, block_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_reference(case, dtype, reference_kernels):
    check_prefill(case, dtype, block_size=16)


@pytest.mark.parametrize("case", DECODE_CASES[:4])
def test_decode_reference_block_size_1_vs_16(case, reference_kernels):
    outs = []
    for block_size in (1, 16, 7):
        torch.manual_seed(1)
        outs.append(check_decode(case, torch.float32, block_size))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", PREFILL_CASES[:2])
def test_prefill_reference_block_size_1_vs_16(case, reference_kernels):
    outs = []
    for block_size in (1, 16):
        torch.manual_seed(1)
        outs.append(check_prefill(case, torch.float32, block_size))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_reference_softmax_scale(reference_kernels):
    check_decode((2, 4, 2, 32, [9, 3]), torch.float32, 4, scale=0.3)
    check_prefill((4, 2, 32, [5, 2], [9, 2]), torch.float32, 4, scale=0.3)


# ---------------------------------------------------------------------------------------------------
# Validation


def _decode_args(**changes):
    args = dict(q=torch.randn(2, 1, 4, 32), k_cache=torch.randn(6, 4, 2, 32), v_cache=torch.randn(6, 4, 2, 32),
                block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seqlens=torch.tensor([3, 8], dtype=torch.int32))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, match", [
    (dict(seqlens=torch.tensor([3, 8])), "seqlens must have dtype"),
    (dict(seqlens=torch.tensor([3], dtype=torch.int32)), "seqlens must have 2 rows"),
    (dict(seqlens=torch.tensor([0, 8], dtype=torch.int32)), "seqlens must be in"),
    (dict(seqlens=torch.tensor([3, 9], dtype=torch.int32)), "seqlens must be in"),
    (dict(block_tables=torch.tensor([[0, 1], [2, 3]])), "block_tables must have dtype"),
    (dict(block_tables=torch.tensor([0, 1], dtype=torch.int32)), "block_tables must have 2 dimensions"),
    (dict(block_tables=torch.tensor([[0, 1], [2, 6]], dtype=torch.int32)), r"block_tables\[1, 1\] = 6"),
    (dict(block_tables=torch.tensor([[-1, 1], [2, 3]], dtype=torch.int32)), r"block_tables\[0, 0\] = -1"),
    (dict(q=torch.randn(2, 9, 4, 32)), "1..8 queries"),
    (dict(q=torch.randn(2, 4, 4, 32)), "seqlens must be in"),
    (dict(q=torch.randn(2, 1, 3, 32)), "multiple of k_cache heads"),
    (dict(q=torch.randn(2, 1, 4, 16)), "head dim"),
    (dict(v_cache=torch.randn(6, 4, 2, 32, dtype=torch.float16)), "v_cache must have the same dtype"),
    (dict(v_cache=torch.randn(6, 8, 2, 32)), "v_cache must have the shape"),
    (dict(q=torch.randn(2, 4, 32)), "q must have 4 dimensions"),
])
def test_decode_bad_inputs(changes, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**_decode_args(**changes))


def test_decode_ignores_junk_past_the_used_blocks(reference_kernels):
    args = _decode_args(block_tables=torch.tensor([[0, -7], [2, 3]], dtype=torch.int32))  # row 0 uses 1 block
    assert torch.isfinite(paged_decode_attention(**args)).all()


def _prefill_args(**changes):
    args = dict(q=torch.randn(5, 4, 32), k_cache=torch.randn(6, 4, 2, 32), v_cache=torch.randn(6, 4, 2, 32),
                block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
                seqlens_k=torch.tensor([3, 8], dtype=torch.int32))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 2, 5])), "cu_seqlens_q must have dtype"),
    (dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens_q must have 3 rows"),
    (dict(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32)), "cu_seqlens_q must rise from 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32)), "total_q=5"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32)), "cu_seqlens_q must rise"),
    (dict(seqlens_k=torch.tensor([1, 8], dtype=torch.int32)), "seqlens_k must be in"),
    (dict(seqlens_k=torch.tensor([3, 9], dtype=torch.int32)), "seqlens_k must be in"),
    (dict(seqlens_k=torch.tensor([3, 8])), "seqlens_k must have dtype"),
    (dict(block_tables=torch.tensor([[0, 1]], dtype=torch.int32)), "block_tables must have 2 rows"),
    (dict(block_tables=torch.tensor([[9, 1], [2, 3]], dtype=torch.int32)), "is not a block of the pool"),
    (dict(q=torch.randn(5, 4, 64)), "head dim"),
    (dict(q=torch.randn(1, 5, 4, 32)), "q must have 3 dimensions"),
    (dict(k_cache=torch.randn(6, 4, 2, 32).double()), "k_cache must have dtype"),
])
def test_prefill_bad_inputs(changes, match):
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(**_prefill_args(**changes))
