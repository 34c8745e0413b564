"""Paged attention (decode and varlen prefill over a block pool) against an fp64 reference on the dense
K/V the pool was built from, by the comparison rule; the same K/V laid out with different block sizes
gives the same output. Physical blocks are placed at random, unused table entries hold junk, and free
pool slots hold NaN, so reading anything but the row's own tokens shows."""
import pytest
import torch

from fastlm.kernels import paged_decode_attention, paged_prefill_attention
from fastlm.kernels._paged import paged_decode_config
from fastlm.kernels._decode import decode_splits
from tests.compare import assert_close_by_rule, ops_run
from tests.kernels.test_attention import ATOL, ON_CUDA, attention_plain, poisoned_outputs  # noqa: F401


def make_pool(dense, lengths, block_size, tables=None, consecutive=False):
    """Lay dense (B, S, Hkv, D) out as a pool (num_blocks, block_size, Hkv, D) -> (pool, tables): each row's
    first lengths[b] tokens in randomly placed blocks (consecutive=True: each row's blocks in order, one
    after the other, as the engine's block manager hands them out), tables int32 (B, max_blocks) with junk
    past the used entries, free slots NaN. With tables given (another tensor's layout), only the pool is new."""
    B, S = dense.shape[:2]
    used = [-(-length // block_size) for length in lengths]
    if tables is None:
        tables = torch.randint(-3, 1000, (B, -(-S // block_size) + 1), dtype=torch.int32)  # junk
        rows = torch.arange(B).repeat_interleave(torch.tensor(used))
        cols = torch.cat([torch.arange(n) for n in used])
        ids = torch.arange(1, len(rows) + 1) if consecutive else torch.randperm(sum(used) + 2)[: len(rows)]
        tables[rows, cols] = ids.to(torch.int32)  # 2 blocks no row owns
    n_blocks = sum(used) + 2
    pool = torch.full((n_blocks, block_size) + dense.shape[2:], float("nan"), dtype=dense.dtype)
    slots = pool.view(n_blocks * block_size, *dense.shape[2:])
    for b, length in enumerate(lengths):
        p = torch.arange(length)
        slots[tables[b, p // block_size].long() * block_size + p % block_size] = dense[b, :length]
    return pool, tables


def dense_kv(B, S, Hkv, D, dtype):
    return torch.randn(B, S, Hkv, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype)


def run_decode(q, k, v, lengths, block_size, scale=None, consecutive=False):
    k_cache, tables = make_pool(k, lengths, block_size, consecutive=consecutive)
    v_cache, _ = make_pool(v, lengths, block_size, tables)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return paged_decode_attention(q, k_cache, v_cache, tables, seqlens, softmax_scale=scale)


def check_decode(case, dtype, block_size, scale=None, consecutive=False):
    """case = (Sq, Hq, Hkv, D, lengths); returns the output for cross-layout comparisons."""
    Sq, Hq, Hkv, D, lengths = case
    B, S = len(lengths), max(lengths)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype)
    k, v = dense_kv(B, S, Hkv, D, dtype)
    out = run_decode(q, k, v, lengths, block_size, scale, consecutive)
    seqlens = torch.tensor(lengths)
    args = dict(causal=True, scale=scale, q_positions=seqlens[:, None] - Sq + torch.arange(Sq), k_lengths=seqlens)
    ref = attention_plain(q.double(), k.double(), v.double(), **args)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_by_rule(out, ref, attention_plain(q, k, v, **args), atol=ATOL[dtype])
    return out


def check_decode_block_sizes_agree(case):
    """The same K/V laid out in blocks of 1, 16 and 7 tokens: the same output (each also checked by rule)."""
    outs = []
    for block_size in (1, 16, 7):
        torch.manual_seed(1)
        outs.append(check_decode(case, torch.float32, block_size))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-6)


def run_prefill(q, k, v, q_lens, k_lens, block_size, scale=None):
    """q (total_q, Hq, D) packed; k, v dense (B, S, Hkv, D) laid out as a pool."""
    k_cache, tables = make_pool(k, k_lens, block_size)
    v_cache, _ = make_pool(v, k_lens, block_size, tables)
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
    (1, 6, 2, 64, [45]),  # one row: the batch-1 CPU path
    (1, 8, 2, 80, [33, 33]),
    (4, 8, 1, 64, [4, 29]),
    (8, 16, 2, 128, [35, 8, 9]),
    (3, 6, 6, 40, [5, 21]),
]
# (Hq, Hkv, D, q_lens, k_lens): whole prompts (q_len == k_len, including 1), chunks over a cached prefix,
# one query, an empty row
PREFILL_CASES = [
    (4, 1, 32, [7, 1, 13, 1], [7, 30, 40, 1]),
    (8, 2, 80, [20, 0, 5], [20, 3, 37]),
    (2, 2, 64, [33], [33]),
    (8, 1, 128, [3, 16], [19, 16]),
    (2, 1, 32, [3, 17, 0, 1, 33, 16, 2, 5, 9], [5, 17, 4, 1, 40, 16, 30, 5, 12]),  # many rows: the tile search
]


# ---------------------------------------------------------------------------------------------------
# fastlm's C++ CPU decode kernel (one query per row, fp32/bf16; fastlm.kernels._cpu_ext)


ONE_QUERY_CASES = [case for case in DECODE_CASES if case[0] == 1] + [(1, 12, 12, 64, [80]), (1, 5, 1, 17, [3, 1, 50]),
                                                                    # GQA rows around the 16-token chunks
                                                                    (1, 6, 2, 32, [16, 1, 31, 32, 33, 5, 48, 2, 17]),
                                                                    # head sizes built as constants (64, 128)
                                                                    # or not, K/V read in place (G == 1)
                                                                    (1, 4, 4, 128, [16, 1, 33]), (1, 8, 2, 128, [20, 47]),
                                                                    (1, 3, 3, 40, [17, 2, 48, 31])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ONE_QUERY_CASES)
@pytest.mark.parametrize("consecutive", [False, True])
def test_decode_cpp(case, dtype, consecutive, cpp_kernels):
    _, ops = ops_run(lambda: check_decode(case, dtype, block_size=16, consecutive=consecutive))
    assert "fastlm_cpu::paged_decode" in ops


@pytest.mark.parametrize("case", ONE_QUERY_CASES[:3])
def test_decode_cpp_block_sizes_agree(case, cpp_kernels):
    check_decode_block_sizes_agree(case)


def test_decode_cpp_softmax_scale_and_junk_past_the_used_blocks(cpp_kernels):
    args = _decode_args(q=torch.randn(2, 1, 4, 32), block_tables=torch.tensor([[0, -7], [2, 3]], dtype=torch.int32))
    out = paged_decode_attention(**args, softmax_scale=0.3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTLM_KERNELS", "reference")
        ref = paged_decode_attention(**args, softmax_scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tables,seqlens,match", [
    ([[0, 7], [2, 3]], [5, 8], r"block_tables\[0, 1\] = 7 outside the pool of 6 blocks"),
    ([[0, 1], [-1, 3]], [5, 8], r"block_tables\[1, 0\] = -1"),
    ([[0, 1], [2, 3]], [5, 9], r"seqlens\[1\] = 9 outside \[1, 8\]"),
])
def test_decode_cpp_never_reads_outside_the_pool(tables, seqlens, match, cpp_kernels):
    """With check_values=False (the engine checked its tables once per step) bad values still raise."""
    args = _decode_args(q=torch.randn(2, 1, 4, 32), block_tables=torch.tensor(tables, dtype=torch.int32),
                        seqlens=torch.tensor(seqlens, dtype=torch.int32), check_values=False)
    with pytest.raises(RuntimeError, match=match):
        paged_decode_attention(**args)


def test_decode_table_check_in_cpp_agrees_with_the_aten_one(cpp_kernels):
    """check_decode_values' one C++ pass flags exactly the tables the aten checks reject (boundaries
    included: lengths Sq and capacity, entries past the used ones), and the messages stay the aten ones."""
    from fastlm.kernels.paged_attention import _bad_table_entries, check_decode_values

    gen = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(6, 4, 1, 8)  # 6 blocks of 4 slots
    for _ in range(300):
        B, W, Sq = (int(torch.randint(low, high, (1,), generator=gen)) for low, high in ((1, 5), (1, 4), (1, 3)))
        tables = torch.randint(-1, 8, (B, W), generator=gen, dtype=torch.int32)
        seqlens = torch.randint(0, W * 4 + 2, (B,), generator=gen, dtype=torch.int32)
        expected = (bool(((seqlens < Sq) | (seqlens > W * 4)).any())
                    or bool(_bad_table_entries(tables, seqlens, k_cache).any()))
        assert torch.ops.fastlm_cpu.decode_tables_bad(tables, seqlens, 6, 4, Sq, W * 4) == expected, (tables, seqlens, Sq)
        if expected:
            with pytest.raises(ValueError, match="seqlens must be in|is not a block of the pool"):
                check_decode_values(Sq, k_cache, tables, seqlens)
        else:
            check_decode_values(Sq, k_cache, tables, seqlens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_op_runs_the_cpp_kernel_on_views_of_qkv(dtype, cpp_kernels):
    """fastlm::paged_kv_write (the op compiled steps call) writes rows of strided k/v views in C++."""
    k_cache, v_cache = torch.zeros(3, 7, 2, 24, dtype=dtype), torch.zeros(3, 7, 2, 24, dtype=dtype)
    qkv = torch.randn(4, 6, 24).to(dtype)
    k, v = qkv[:, 2:4], qkv[:, 4:6]  # like a fused qkv projection's slices: rows 144 values apart
    slots = torch.tensor([20, 0, 13, 7])
    _, ops = ops_run(lambda: torch.ops.fastlm.paged_kv_write(k_cache, v_cache, slots, k, v))
    assert "aten::index_copy_" not in ops
    assert torch.equal(k_cache.view(-1, 2, 24)[slots], k) and torch.equal(v_cache.view(-1, 2, 24)[slots], v)
    assert k_cache.view(-1, 2, 24)[[1, 2, 8, 19]].abs().sum() == 0  # nothing else written
    transposed = torch.randn(2, 24, 4).to(dtype).permute(2, 0, 1)  # not rows: the index_copy_ path
    torch.ops.fastlm.paged_kv_write(k_cache, v_cache, slots, transposed, transposed)
    assert torch.equal(k_cache.view(-1, 2, 24)[slots], transposed)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 21 outside the pool of 21 slots"):
        torch.ops.fastlm.paged_kv_write(k_cache, v_cache, torch.tensor([0, 21, 1, 2]), k, v)


def test_decode_cpp_traced_by_torch_compile(cpp_kernels):
    args = _decode_args(q=torch.randn(2, 1, 4, 32), check_values=False)
    compiled = torch.compile(lambda **a: paged_decode_attention(**a) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**args), paged_decode_attention(**args) * 2)


# ---------------------------------------------------------------------------------------------------
# The references (the CPU path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_reference(case, dtype, reference_kernels):
    check_decode(case, dtype, block_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, 6, 2, 40, [37]), (1, 4, 4, 32, [80, 70, 9]), (1, 8, 2, 64, [70, 70])])
def test_decode_reference_reads_consecutive_blocks_in_place(case, dtype, reference_kernels):
    """Each row's blocks one after the other (the engine's usual layout: read as a view of the pool, no
    gather): one row (the batch-1 path), several rows (the per-row loop)."""
    check_decode(case, dtype, block_size=16, consecutive=True)


def test_decode_reference_rejects_consecutive_ids_past_the_pool(reference_kernels):
    """Consecutive ids running past the pool are not read as a shorter slice: index_select rejects them."""
    args = _decode_args(block_tables=torch.tensor([[5, 6], [2, 3]], dtype=torch.int32),  # 6 blocks: 0..5
                        seqlens=torch.tensor([8, 5], dtype=torch.int32), check_values=False)
    with pytest.raises(IndexError):
        paged_decode_attention(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_reference(case, dtype, reference_kernels):
    check_prefill(case, dtype, block_size=16)


def shared_prefix_pool(dense, lengths, block_size, shared_tokens):
    """make_pool, then every row's first shared_tokens // block_size blocks pointed at row 0's (the
    rows' dense K/V copy row 0's there): the layout prefix caching gives a shared system prompt."""
    dense[:, :shared_tokens] = dense[:1, :shared_tokens]
    pool, tables = make_pool(dense, lengths, block_size)
    tables[:, :shared_tokens // block_size] = tables[:1, :shared_tokens // block_size]
    return pool, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,block_size", [(6, 2, 16), (4, 4, 8), (3, 1, 1)])
def test_decode_reference_cascade_over_a_shared_prefix(dtype, Hq, Hkv, block_size, reference_kernels):
    """Rows sharing their first blocks take the cascade path (the prefix attended once, merged by
    log-sum-exp), including a row that is nothing but the shared prefix; same answer as fp64."""
    from fastlm.kernels.paged_attention import CASCADE_MIN_TOKENS, _shared_blocks

    shared, D = 80, 32
    lengths = [81, 80, 113, 150, 97]
    B, S = len(lengths), max(lengths)
    q = torch.randn(B, 1, Hq, D, dtype=dtype)
    k, v = dense_kv(B, S, Hkv, D, dtype)
    k_cache, tables = shared_prefix_pool(k, lengths, block_size, shared)
    v[:, :shared] = v[:1, :shared]
    v_cache, _ = make_pool(v, lengths, block_size, tables)
    assert _shared_blocks(tables, lengths, block_size) * block_size == shared >= CASCADE_MIN_TOKENS
    out = paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32))
    seqlens = torch.tensor(lengths)
    args = dict(causal=True, q_positions=seqlens[:, None] - 1, k_lengths=seqlens)
    ref = attention_plain(q.double(), k.double(), v.double(), **args)
    assert_close_by_rule(out, ref, attention_plain(q, k, v, **args), atol=ATOL[dtype])


def test_shared_blocks_counts_only_blocks_every_row_fills():
    from fastlm.kernels.paged_attention import _shared_blocks

    tables = torch.tensor([[3, 4, 5, 6, 7], [3, 4, 5, 6, 9], [3, 4, 5, 6, 8]], dtype=torch.int32)
    assert _shared_blocks(tables, [80, 80, 80], 16) == 4  # block 4 differs
    assert _shared_blocks(tables, [80, 63, 80], 16) == 0  # 3 full blocks of one row: under 64 tokens
    assert _shared_blocks(tables[:1], [80], 16) == 0  # one row: nothing to share
    assert _shared_blocks(torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4]], dtype=torch.int32), [64, 64], 16) == 0


@pytest.mark.parametrize("case", DECODE_CASES[:4])
def test_decode_reference_block_size_1_vs_16(case, reference_kernels):
    check_decode_block_sizes_agree(case)


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


@pytest.mark.skipif(ON_CUDA, reason="the CPU reference's scratch buffers (CUDA runs the kernels, no autograd)")
def test_reference_scratch_is_not_saved_for_backward(reference_kernels):
    """The CPU reference reuses gather buffers across calls, except under autograd: a second call before
    the first backward must not change the first gradient."""
    lengths, D = [9, 30], 32
    k, v = dense_kv(2, 30, 2, D, torch.float32)
    k_cache, tables = make_pool(k, lengths, 4)
    v_cache, _ = make_pool(v, lengths, 4, tables)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(2, 1, 4, D, requires_grad=True)
    out = paged_decode_attention(q, k_cache, v_cache, tables, seqlens)
    paged_decode_attention(torch.randn(2, 1, 4, D), k_cache.flip(0), v_cache.flip(0), tables, seqlens)
    (dq,) = torch.autograd.grad(out.sum(), q)
    q64 = q.detach().double().requires_grad_()
    positions = seqlens[:, None].long() - 1
    ref = attention_plain(q64, k.double(), v.double(), True, q_positions=positions, k_lengths=seqlens)
    (dq64,) = torch.autograd.grad(ref.sum(), q64)
    torch.testing.assert_close(dq, dq64.float(), rtol=1e-4, atol=1e-5)


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


# ---------------------------------------------------------------------------------------------------
# The Triton kernels (the interpreter on CPU; compiled with FASTLM_TEST_DEVICE=cuda)

TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 under the interpreter: bf16_dot
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="GPU-sized, too slow for the interpreter: runs on a GPU "
                                "(benchmarks/gpu_check.py); test_decode_triton / test_prefill_triton run "
                                "bf16 through the same kernels at small sizes")


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_triton(case, dtype, bf16_dot):
    check_decode(case, dtype, block_size=16)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES + [(2, 1, 32, [130, 5], [140, 5])])  # a row over 2 fp16 tiles
def test_prefill_triton(case, dtype, bf16_dot):
    check_prefill(case, dtype, block_size=16)


def test_decode_triton_block_sizes_agree():
    """Pages of 16 and 32 tokens (and 1, 3) over the same K/V give the same output."""
    outs = []
    for block_size in (16, 32, 1, 3):
        torch.manual_seed(1)
        outs.append(check_decode((2, 8, 2, 64, [45, 2]), torch.float16, block_size))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-3)


def test_prefill_triton_block_sizes_agree():
    outs = []
    for block_size in (16, 32, 5):
        torch.manual_seed(1)
        outs.append(check_prefill((4, 2, 32, [9, 20], [40, 20]), torch.float32, block_size))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


def test_decode_triton_many_splits():
    """A long row over many KV chunks (LSE combine), beside a row of length 1 whose other chunks are empty."""
    n_splits, _ = decode_splits(2, 1, 320, paged_decode_config(32, torch.float32, 4)[1])
    assert n_splits >= 8
    check_decode((1, 4, 1, 32, [320, 1]), torch.float32, block_size=16)


@pytest.mark.usefixtures("poisoned_outputs")
def test_triton_outputs_fully_written():
    check_decode((3, 6, 2, 80, [50, 3]), torch.float16, block_size=16)
    check_prefill((6, 2, 80, [17, 3], [17, 30]), torch.float16, block_size=16)


@needs_cuda
@pytest.mark.parametrize("case", [(1, 32, 8, 128, [32768, 1, 20000, 4097])])
def test_decode_bf16_cuda(case):
    check_decode(case, torch.bfloat16, block_size=16)


@needs_cuda
@pytest.mark.parametrize("case", [(32, 8, 128, [2048, 1, 700], [4096, 1, 700])])
def test_prefill_bf16_cuda(case):
    check_prefill(case, torch.bfloat16, block_size=16)


# ---------------------------------------------------------------------------------------------------
# Custom ops: fakes and schemas (opcheck), and torch.compile without graph breaks


def _small_problem():
    k, v = dense_kv(2, 20, 2, 32, torch.float32)
    k_cache, tables = make_pool(k, [20, 5], 4)
    v_cache, _ = make_pool(v, [20, 5], 4, tables)
    return k_cache.nan_to_num(), v_cache.nan_to_num(), tables.clamp(0, k_cache.shape[0] - 1)


@pytest.mark.parametrize("path", ["reference", "triton"])  # on CPU "triton" is the interpreter
def test_opcheck_paged_ops(path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    k_cache, v_cache, tables = _small_problem()
    ops = torch.ops.fastlm
    torch.library.opcheck(ops.paged_decode_attn.default,
                          (torch.randn(2, 2, 4, 32), k_cache, v_cache, tables, torch.tensor([20, 5], dtype=torch.int32),
                           0.2))
    torch.library.opcheck(ops.paged_prefill_attn.default,
                          (torch.randn(9, 4, 32), k_cache, v_cache, tables, torch.tensor([0, 6, 9], dtype=torch.int32),
                           torch.tensor([20, 5], dtype=torch.int32), 0.2))


def test_compiles_without_graph_breaks(reference_kernels):
    k_cache, v_cache, tables = _small_problem()
    seqlens, cu = torch.tensor([20, 5], dtype=torch.int32), torch.tensor([0, 6, 9], dtype=torch.int32)

    def step(q_decode, q_prefill):
        return (paged_decode_attention(q_decode, k_cache, v_cache, tables, seqlens).sum()
                + paged_prefill_attention(q_prefill, k_cache, v_cache, tables, cu, seqlens).sum())

    inputs = (torch.randn(2, 1, 4, 32), torch.randn(9, 4, 32))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), step(*inputs))
