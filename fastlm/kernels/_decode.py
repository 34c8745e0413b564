"""Triton kernels of split-KV decode attention (flash-decoding): a split kernel and a combine kernel.

q (B, Sq, Hq, D) with small Sq, caches (B, S_max, Hkv, D), cache_seqlens (B,) int32. Query s of
sequence b sits at position L_b - Sq + s and sees cache entries 0..that position.
The split kernel handles one (batch, KV head, chunk of the cache): the group's query heads times the
Sq queries form the M rows of one tl.dot (padded to BLOCK_H >= 16), so each K/V byte is read once.
It writes an fp32 partial output and its log2-domain LSE per (row, chunk); the combine kernel merges
the chunks by their LSE. Chunks past a sequence's length write LSE = -inf and weigh nothing.
Below the kernels: the launch configuration, the launcher, and LAUNCHES (what the compile check builds).
The reference, the custom op and the public function are in attention.py.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import (LOG2E, Launch, cdiv, device_guard, dot_precision, head_dim_block,
                                   last_dim_contiguous, sm_count)


@triton.jit
def _decode_split(Q, K, V, SEQLENS, O_PART, LSE_PART,  # q (B,Sq,Hq,D); caches (B,S_max,Hkv,D); partials fp32
                  stride_qb, stride_qs, stride_qh,  # strides of q
                  stride_kb, stride_ks, stride_kh,  # strides of k_cache
                  stride_vb, stride_vs, stride_vh,  # strides of v_cache
                  n_kv_heads, group, seqlen_q, max_seqlen,  # Hkv, Hq // Hkv, Sq, S_max
                  n_splits, chunk, qk_scale,  # chunks per sequence, keys per chunk, softmax_scale * log2(e)
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    bhk = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    # lengths are validated on the host when possible; clamp so a graph replay never reads past S_max
    length = tl.minimum(tl.load(SEQLENS + b), max_seqlen)

    rows = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)  # row r = query s * group + head g
    s = rows // group
    h = hk * group + rows % group
    row_ok = rows < group * seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b * stride_qb + s[:, None] * stride_qs + h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    q_pos = length - seqlen_q + s

    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    k_ptrs = K + b * stride_kb + hk * stride_kh + (lo + offs_n)[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + (lo + offs_n)[:, None].to(tl.int64) * stride_vs + offs_d[None, :]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < hi) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_H, BLOCK_N)
        visible = (cols[None, :] < hi) & (cols[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    store_split_partial(O_PART, LSE_PART, acc, l_i, m_i, b, s, h, split, row_ok, offs_d,
                        n_kv_heads * group, seqlen_q, n_splits, HEAD_DIM)


@triton.jit
def store_split_partial(O_PART, LSE_PART, acc, l_i, m_i, b, s, h, split, row_ok, offs_d,
                        n_q_heads, seqlen_q, n_splits, HEAD_DIM: tl.constexpr):
    """One KV chunk's normalized output and log2-sum-exp into the partials (B, Sq, Hq, n_splits[, D]) that
    _decode_combine merges; a chunk past the row's length (l = 0) stores lse -inf: it weighs nothing."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    part = ((b * seqlen_q + s) * n_q_heads + h) * n_splits + split
    tl.store(LSE_PART + part, lse, mask=row_ok)
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _decode_combine(O_PART, LSE_PART, O,  # partials (B, Sq, Hq, n_splits[, D]) fp32; o (B, Sq, Hq, D)
                    stride_ob, stride_os, stride_oh,  # strides of o
                    n_q_heads, seqlen_q, n_splits,  # Hq, Sq, chunks per sequence
                    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the chunks of one (b, s, h) row: out = sum_c 2^(lse_c - m) o_c / sum_c 2^(lse_c - m)."""
    row = tl.program_id(0).to(tl.int64)  # (b * Sq + s) * Hq + h
    h = row % n_q_heads
    s = (row // n_q_heads) % seqlen_q
    b = row // (n_q_heads * seqlen_q)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(LSE_PART + row * n_splits + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    denom = tl.sum(w, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    o_mask = (offs_s[:, None] < n_splits) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O_PART + (row * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=o_mask, other=0.0)
    out = tl.sum(o * w[:, None], 0) / denom
    tl.store(O + b * stride_ob + s * stride_os + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)



# ---------------------------------------------------------------------------------------------------
# Launch configuration and the launcher

MAX_ROWS = 64  # query rows (group x Sq) per program; larger groups take several programs
MAX_SPLITS = 128


def decode_config(head_dim, dtype, rows):
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) of the split kernel for `rows` = group x Sq."""
    block_h = min(MAX_ROWS, max(16, 1 << (rows - 1).bit_length()))
    block_n = 64 if head_dim_block(head_dim) <= 128 and dtype != torch.float32 else 32
    return block_h, block_n, 4, 3


def decode_splits(batch, n_kv_heads, max_seqlen, block_n, n_sms=132):
    """(n_splits, chunk): enough chunks to give every SM about four programs (latency hiding); depends on
    shapes only, never on the lengths, so a captured CUDA graph stays valid."""
    n_blocks = cdiv(max_seqlen, block_n)
    want = max(1, cdiv(4 * n_sms, batch * n_kv_heads))
    splits = max(1, min(want, MAX_SPLITS, n_blocks))
    chunk = cdiv(n_blocks, splits) * block_n
    return cdiv(max_seqlen, chunk), chunk


def combine_config(n_splits, head_dim):
    """(BLOCK_S, num_warps) of the combine kernel. Its (BLOCK_S, BLOCK_D) fp32 tile lives in registers:
    at most 128 values per thread (128 splits x D=256 on 4 warps spilled)."""
    block_s = max(2, 1 << (n_splits - 1).bit_length())
    return block_s, max(4, min(16, block_s * head_dim_block(head_dim) // 4096))


def launch_decode(q, k_cache, v_cache, cache_seqlens, scale):
    """o (B, Sq, Hq, D) in q's dtype: q's Sq new tokens over the first cache_seqlens[b] cache entries."""
    B, Sq, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    block_h, block_n, warps, stages = decode_config(D, q.dtype, group * Sq)
    n_splits, chunk = decode_splits(B, Hkv, S_max, block_n, sm_count(q.device))
    o_part = torch.empty((B, Sq, Hq, n_splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Sq, Hq, n_splits), dtype=torch.float32, device=q.device)
    o = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    block_s, combine_warps = combine_config(n_splits, D)
    with device_guard(q):
        _decode_split[(B * Hkv, n_splits, cdiv(group * Sq, block_h))](
            q, k_cache, v_cache, cache_seqlens, o_part, lse_part, *q.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], Hkv, group, Sq, S_max, n_splits, chunk, scale * LOG2E,
            BLOCK_H=block_h, BLOCK_N=block_n, HEAD_DIM=D, BLOCK_D=head_dim_block(D), PREC=dot_precision(q.dtype),
            num_warps=warps, num_stages=stages)
        _decode_combine[(B * Sq * Hq,)](o_part, lse_part, o, *o.stride()[:3], Hq, Sq, n_splits,
                                        BLOCK_S=block_s, HEAD_DIM=D, BLOCK_D=head_dim_block(D),
                                        num_warps=combine_warps)
    return o


# ---------------------------------------------------------------------------------------------------
# Configurations the compile check builds: bf16 for group x Sq row counts 4..32 and head dims 64..256,
# fp16 for one row; the combine kernel at MAX_SPLITS chunks.


def _launches(head_dim, dtype, rows):
    bh, bn, warps, stages = decode_config(head_dim, dtype, rows)
    block_s, combine_warps = combine_config(MAX_SPLITS, head_dim)
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim))
    return [Launch(_decode_split, dtype, dict(BLOCK_H=bh, BLOCK_N=bn, PREC=dot_precision(dtype), **shape), warps,
                   stages, fp32=("O_PART", "LSE_PART"), int32=("SEQLENS",), mma=True, tag=f"D={head_dim},{bh}x{bn}"),
            Launch(_decode_combine, dtype, dict(BLOCK_S=block_s, **shape), combine_warps,
                   fp32=("O_PART", "LSE_PART"), tag=f"D={head_dim}")]


LAUNCHES = [launch for head_dim, dtype, rows in ((64, torch.bfloat16, 4), (128, torch.bfloat16, 8),
                                                 (128, torch.bfloat16, 32), (256, torch.bfloat16, 8),
                                                 (128, torch.float16, 1))
            for launch in _launches(head_dim, dtype, rows)]
