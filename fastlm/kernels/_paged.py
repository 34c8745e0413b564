"""Triton kernels of paged attention: split-KV decode and varlen prefill reading K/V through block tables.

Pool: k_cache, v_cache (num_blocks, PAGE_SIZE, Hkv, D), last dim contiguous, both with the same strides.
Token t of row b lives in block BLOCK_TABLES[b, t // PAGE_SIZE] (int32) at slot t % PAGE_SIZE; a K/V tile
of BLOCK_N tokens is one gather: a block id per token, then D-contiguous rows (16-byte loads). Any
PAGE_SIZE >= 1 works (a compile-time constant: powers of two turn // and % into shifts and masks).
Table entries past a row's length are never read.

- _paged_decode_split: flash-decoding. One program per (row, KV head, chunk of keys): the GQA group's
  query heads times the Sq queries form the M rows of one tl.dot (padded to BLOCK_H >= 16), so each K/V
  byte is read once per group. It writes fp32 partials (B, Sq, Hq, n_splits[, D]) and log2-domain LSEs;
  _decode.py's combine kernel merges them. Query s sits at position L_b - Sq + s.
- _paged_prefill: flash attention over packed varlen queries (cu_seqlens_q), causal bottom-right:
  row b's query i sits at position Lk_b - Lq_b + i. One program per (query tile, query head). The grid
  has total_q // BLOCK_M + B tiles (row b's tiles start at cu[b] // BLOCK_M + b: an upper bound that needs
  no host sync); each program finds its row by binary search over cu_seqlens_q, spare tiles exit.
  Key tiles left of the causal diagonal run without masks.

Scores are in the log2 domain (qk_scale = softmax_scale * log2(e)); fp32 statistics and accumulation,
one cast on store. The host launchers and their configurations follow the kernels.
References: Dao et al., FlashAttention-2; flash-decoding; vLLM's paged attention (Kwon et al., 2023).
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels import _decode  # its LSE combine kernel (referenced through the module: listed there)
from fastlm.kernels._decode import decode_config, decode_splits, store_split_partial
from fastlm.kernels._flash import _load_rows, _online_softmax_step, _store_rows, flash_fwd_config
from fastlm.kernels._utils import LOG2E, Launch, device_guard, dot_precision, gpu_arch, head_dim_block, sm_count


@triton.jit
def _paged_attend(acc, l_i, m_i, q, K, V, TABLE, head_off, stride_b, stride_s, q_pos, offs_n, offs_d,
                  lo, hi, seqlen_k, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of the rows of q over keys [lo, hi) of one sequence, gathered through its block
    table row TABLE. MASKED tiles hide keys >= seqlen_k and keys after each row's position q_pos; the
    others are known to be fully visible."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            block = tl.load(TABLE + cols // PAGE_SIZE, mask=cols < seqlen_k, other=0)
        else:
            block = tl.load(TABLE + cols // PAGE_SIZE)
        tokens = block.to(tl.int64) * stride_b + (cols % PAGE_SIZE) * stride_s + head_off  # (BLOCK_N,)
        k = _load_rows(K + tokens[:, None] + offs_d[None, :], cols, seqlen_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (rows, BLOCK_N), log2 units
        if MASKED:
            visible = (cols[None, :] < seqlen_k) & (cols[None, :] <= q_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        v = _load_rows(V + tokens[:, None] + offs_d[None, :], cols, seqlen_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, MASKED, PREC)
    return acc, l_i, m_i


@triton.jit
def _paged_decode_split(Q, K, V, BLOCK_TABLES, SEQLENS, O_PART, LSE_PART,  # q (B,Sq,Hq,D); pool; int32; fp32 partials
                        stride_qb, stride_qs, stride_qh,  # strides of q
                        stride_b, stride_s, stride_h, stride_tb,  # pool strides (block, slot, head); table row stride
                        n_kv_heads, group, seqlen_q, max_seqlen,  # Hkv, Hq // Hkv, Sq, max_blocks * PAGE_SIZE
                        n_splits, chunk, qk_scale,  # chunks per row, keys per chunk, softmax_scale * log2(e)
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    bhk = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    length = tl.minimum(tl.load(SEQLENS + b), max_seqlen)  # clamped: a graph replay never reads past the table

    rows = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)  # row r = query s * group + head g
    s = rows // group
    h = hk * group + rows % group
    row_ok = rows < group * seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + s[:, None] * stride_qs + h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    acc, l_i, m_i = _paged_attend(acc, l_i, m_i, q, K, V, BLOCK_TABLES + b * stride_tb, hk * stride_h,
                                  stride_b, stride_s, length - seqlen_q + s, tl.arange(0, BLOCK_N), offs_d,
                                  lo, hi, hi, qk_scale, True, BLOCK_N, PAGE_SIZE, HEAD_DIM, BLOCK_D, PREC)

    store_split_partial(O_PART, LSE_PART, acc, l_i, m_i, b, s, h, split, row_ok, offs_d,
                        n_kv_heads * group, seqlen_q, n_splits, HEAD_DIM)


@triton.jit
def _row_of_tile(CU_SEQLENS_Q, tile, n_rows, BLOCK_M: tl.constexpr):
    """The last row b with cu[b] // BLOCK_M + b <= tile (where row b's tiles start), by binary search."""
    lo = tile * 0
    hi = lo + n_rows - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        starts_before = tl.load(CU_SEQLENS_Q + mid) // BLOCK_M + mid <= tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid - 1)
    return lo


@triton.jit
def _paged_prefill(Q, K, V, BLOCK_TABLES, CU_SEQLENS_Q, SEQLENS_K, O,  # q, o (total_q,Hq,D); pool; int32 index
                   stride_qt, stride_qh, stride_ot, stride_oh,  # strides of q and o
                   stride_b, stride_s, stride_h, stride_tb,  # pool strides (block, slot, head); table row stride
                   n_rows, group, max_seqlen, qk_scale,  # B, Hq // Hkv, max_blocks * PAGE_SIZE, softmax_scale * log2(e)
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = _row_of_tile(CU_SEQLENS_Q, tile, n_rows, BLOCK_M)
    q_start = tl.load(CU_SEQLENS_Q + b)
    q_len = tl.load(CU_SEQLENS_Q + b + 1) - q_start
    m_block = tile - (q_start // BLOCK_M + b)
    if m_block * BLOCK_M >= q_len:  # a spare tile of the upper-bound grid
        return
    seqlen_k = tl.minimum(tl.load(SEQLENS_K + b), max_seqlen)  # unchecked under torch.compile: stay in the table
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = _load_rows(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], offs_m, q_len, offs_d,
                   True, HEAD_DIM, BLOCK_D)
    q_pos = seqlen_k - q_len + offs_m

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    table = BLOCK_TABLES + b.to(tl.int64) * stride_tb
    head_off = (h // group).to(tl.int64) * stride_h
    offs_n = tl.arange(0, BLOCK_N)
    n_full = (seqlen_k - q_len + m_block * BLOCK_M + 1) // BLOCK_N * BLOCK_N  # keys every row of the tile sees
    hi = tl.minimum(seqlen_k, seqlen_k - q_len + (m_block + 1) * BLOCK_M)
    acc, l_i, m_i = _paged_attend(acc, l_i, m_i, q, K, V, table, head_off, stride_b, stride_s, q_pos, offs_n, offs_d,
                                  0, n_full, seqlen_k, qk_scale, False, BLOCK_N, PAGE_SIZE, HEAD_DIM, BLOCK_D, PREC)
    acc, l_i, m_i = _paged_attend(acc, l_i, m_i, q, K, V, table, head_off, stride_b, stride_s, q_pos, offs_n, offs_d,
                                  n_full, hi, seqlen_k, qk_scale, True, BLOCK_N, PAGE_SIZE, HEAD_DIM, BLOCK_D, PREC)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    _store_rows(O + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------------
# Launch configurations (used by the launchers; LAUNCHES at the end lists them for the compile check)


def paged_decode_config(head_dim, dtype, rows):
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) of the split kernel for rows = group x Sq: the dense
    decode kernel's tiles (the gather adds one block-id load per token)."""
    return decode_config(head_dim, dtype, rows)


def paged_prefill_config(head_dim, dtype, arch=80):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel: the dense forward's tiles."""
    return flash_fwd_config(head_dim, dtype, arch)


# ---------------------------------------------------------------------------------------------------
# Host launchers (arguments validated by the public functions)


def _pool_views(k_cache, v_cache):
    """K and V with a contiguous last dim and the same strides (the kernels take one set)."""
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        return k_cache.contiguous(), v_cache.contiguous()
    return k_cache, v_cache


def paged_decode(q, k_cache, v_cache, block_tables, seqlens, scale):
    B, Sq, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache, v_cache = _pool_views(k_cache, v_cache)
    block_h, block_n, warps, stages = paged_decode_config(D, q.dtype, group * Sq)
    max_seqlen = block_tables.shape[1] * page
    n_splits, chunk = decode_splits(B, Hkv, max_seqlen, block_n, sm_count(q.device))  # shapes only: graph-safe
    o_part = torch.empty((B, Sq, Hq, n_splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Sq, Hq, n_splits), dtype=torch.float32, device=q.device)
    o = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    with device_guard(q):
        _paged_decode_split[(B * Hkv, n_splits, triton.cdiv(group * Sq, block_h))](
            q, k_cache, v_cache, block_tables, seqlens, o_part, lse_part, *q.stride()[:3], *k_cache.stride()[:3],
            block_tables.stride(0), Hkv, group, Sq, max_seqlen, n_splits, chunk, scale * LOG2E,
            BLOCK_H=block_h, BLOCK_N=block_n, PAGE_SIZE=page, HEAD_DIM=D, BLOCK_D=head_dim_block(D),
            PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
        _decode._decode_combine[(B * Sq * Hq,)](o_part, lse_part, o, *o.stride()[:3], Hq, Sq, n_splits,
                                        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), HEAD_DIM=D,
                                        BLOCK_D=head_dim_block(D), num_warps=4)
    return o


def paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale):
    total_q, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    B = seqlens_k.shape[0]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache, v_cache = _pool_views(k_cache, v_cache)
    o = torch.empty((total_q, Hq, D), dtype=q.dtype, device=q.device)
    block_m, block_n, warps, stages = paged_prefill_config(D, q.dtype, gpu_arch(q.device))
    with device_guard(q):
        _paged_prefill[(total_q // block_m + B, Hq)](
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, o, *q.stride()[:2], *o.stride()[:2],
            *k_cache.stride()[:3], block_tables.stride(0), B, Hq // Hkv, block_tables.shape[1] * page, scale * LOG2E,
            BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=page, HEAD_DIM=D, BLOCK_D=head_dim_block(D),
            PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o


# ---------------------------------------------------------------------------------------------------
# Configurations the compile check builds (fastlm.kernels.compile_check): bf16 for the head-dim classes
# (64, odd 80, 128, 256), fp16 at D=128; decode for group x Sq row counts 1..32; pages of PAGE_SIZE.
# fp32 (IEEE FMA, no tensor cores) is a correctness path and not listed. The LSE combine kernel is
# _decode.py's (listed there).

PAGE_SIZE = 16  # the engine's default block size


def _decode_launch(head_dim, dtype, rows):
    bh, bn, warps, stages = paged_decode_config(head_dim, dtype, rows)
    constexprs = dict(BLOCK_H=bh, BLOCK_N=bn, PAGE_SIZE=PAGE_SIZE, HEAD_DIM=head_dim,
                      BLOCK_D=head_dim_block(head_dim), PREC=dot_precision(dtype))
    return Launch(_paged_decode_split, dtype, constexprs, warps, stages, fp32=("O_PART", "LSE_PART"),
                  int32=("BLOCK_TABLES", "SEQLENS"), mma=True, tag=f"D={head_dim},{bh}x{bn},page{PAGE_SIZE}")


def _prefill_launches(head_dim, dtype):
    configs = {arch: paged_prefill_config(head_dim, dtype, arch) for arch in (80, 90)}
    launches = []
    for config in dict.fromkeys(configs.values()):
        bm, bn, warps, stages = config
        constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, PAGE_SIZE=PAGE_SIZE, HEAD_DIM=head_dim,
                          BLOCK_D=head_dim_block(head_dim), PREC=dot_precision(dtype))
        launches.append(Launch(_paged_prefill, dtype, constexprs, warps, stages,
                               int32=("BLOCK_TABLES", "CU_SEQLENS_Q", "SEQLENS_K"), mma=True,
                               targets=tuple(arch for arch, c in configs.items() if c == config),
                               tag=f"D={head_dim},{bm}x{bn},page{PAGE_SIZE}"))
    return launches


LAUNCHES = ([launch for head_dim in (64, 80, 128, 256) for launch in _prefill_launches(head_dim, torch.bfloat16)]
            + _prefill_launches(128, torch.float16)
            + [_decode_launch(head_dim, dtype, rows) for head_dim, dtype, rows in
               ((64, torch.bfloat16, 4), (128, torch.bfloat16, 8), (128, torch.bfloat16, 32), (256, torch.bfloat16, 8),
                (128, torch.float16, 1))])
