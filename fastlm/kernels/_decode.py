"""Triton kernels of split-KV decode attention (flash-decoding): a split kernel and a combine kernel.

q (B, Sq, Hq, D) with small Sq, caches (B, S_max, Hkv, D), cache_seqlens (B,) int32. Query s of
sequence b sits at position L_b - Sq + s and sees cache entries 0..that position.
The split kernel handles one (batch, KV head, chunk of the cache): the group's query heads times the
Sq queries form the M rows of one tl.dot (padded to BLOCK_H >= 16), so each K/V byte is read once.
It writes an fp32 partial output and its log2-domain LSE per (row, chunk); the combine kernel merges
the chunks by their LSE. Chunks past a sequence's length write LSE = -inf and weigh nothing.
The host side is in attention.py.
"""
import triton
import triton.language as tl


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

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    part = ((b * seqlen_q + s) * (n_kv_heads * group) + h) * n_splits + split  # partials (B, Sq, Hq, n_splits)
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
