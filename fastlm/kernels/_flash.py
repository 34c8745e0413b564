"""Triton kernels of flash attention (prefill): forward, and backward as delta / dK-dV / dQ kernels.

Layout: q, o (B, Sq, Hq, D); k, v (B, Sk, Hkv, D); last dim contiguous, the rest by strides.
Scores live in the log2 domain: qk_scale = softmax_scale * log2(e), so exp2 replaces exp and the
saved log-sum-exp (LSE, (B, Hq, Sq) fp32) is m + log2(l). Fully masked rows (causal with Sq > Sk)
get output 0 and LSE = +inf, so the backward's exp2(s - LSE) is 0 for them.
Causal masks align bottom-right: query i sees keys j <= i + (Sk - Sq).
Grids put (batch x heads) on axis 0 (no 65535 limit) and sequence blocks on axis 1; consecutive
programs are neighbouring heads, which share K/V under GQA (L2 reuse).
Below the kernels: their launch configurations (one helper per kernel, used by the launchers and by
LAUNCHES, the list the compile check builds) and the host launchers. The reference, the custom ops
and the public function are in attention.py.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import (LOG2E, Launch, cdiv, device_guard, dot_precision, gpu_arch, head_dim_block,
                                   last_dim_contiguous, sm_count)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filling rows >= n_rows (if CHECK_ROWS) and columns >= HEAD_DIM."""
    if HEAD_DIM == BLOCK_D:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _query_block(IS_CAUSAL: tl.constexpr):
    """Causal: the last query blocks see the most keys, so launch them first (shorter tail)."""
    if IS_CAUSAL:
        return tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        return tl.program_id(1)


@triton.jit
def _online_softmax_step(acc, l_i, m_i, qk, v, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the online softmax: qk (rows, BLOCK_N) in log2 units (masked keys at -inf when
    MASKED), v (BLOCK_N, D) -> the updated (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                    lo, hi, seqlen_k, causal_offset, qk_scale,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED blocks apply the key-boundary and causal masks;
    the others are known to be fully visible (the bulk of the work, no mask arithmetic)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, cols, seqlen_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
            qk = tl.where(visible, qk, float("-inf"))
        v = _load_rows(v_ptrs, cols, seqlen_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, MASKED, PREC)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i, k_ptrs, v_ptrs


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,  # q/o (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), LSE (B, Hq, Sq) fp32
              stride_qb, stride_qs, stride_qh,  # strides of q
              stride_kb, stride_ks, stride_kh,  # strides of k
              stride_vb, stride_vs, stride_vh,  # strides of v
              stride_ob, stride_os, stride_oh,  # strides of o
              n_q_heads, group, seqlen_q, seqlen_k,  # Hq, Hq // Hkv, Sq, Sk
              qk_scale,  # softmax_scale * log2(e)
              IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    start_m = _query_block(IS_CAUSAL) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_q_heads
    h = bh % n_q_heads
    hk = h // group  # GQA: read the shared K/V head in place
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    q = _load_rows(q_ptrs, offs_m, seqlen_q, offs_d, True, HEAD_DIM, BLOCK_D)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

    causal_offset = seqlen_k - seqlen_q
    if IS_CAUSAL:  # keys past the last row's diagonal are never visible; before the first row's, always
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + causal_offset), 0)
        full = tl.maximum(tl.minimum(seqlen_k, start_m + causal_offset + 1), 0)
    else:
        hi = seqlen_k
        full = seqlen_k
    full = full // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i, k_ptrs, v_ptrs = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d, 0, full,
        seqlen_k, causal_offset, qk_scale, False, IS_CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)
    acc, l_i, m_i, k_ptrs, v_ptrs = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d, full, hi,
        seqlen_k, causal_offset, qk_scale, True, IS_CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)

    empty = l_i == 0.0  # fully masked row: output 0, LSE +inf
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    _store_rows(o_ptrs, acc.to(O.dtype.element_ty), offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,  # o, do (B, Sq, H, D) same strides; DELTA (B, H, Sq) fp32
                    stride_b, stride_s, stride_h,  # strides of o and do
                    n_heads, seqlen_q,  # H, Sq
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term."""
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off = b * stride_b + h * stride_h + offs_m[:, None].to(tl.int64) * stride_s + offs_d[None, :]
    o = _load_rows(O + off, offs_m, seqlen_q, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + off, offs_m, seqlen_q, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,  # q/do (B,Sq,Hq,D); k/v (B,Sk,Hkv,D); LSE/DELTA (B,Hq,Sq)
                   stride_qb, stride_qs, stride_qh,  # strides of q and do
                   stride_kb, stride_ks, stride_kh,  # strides of k, v and of each dk/dv slice
                   stride_split,  # dk/dv: (n_split, B, Sk, Hkv, D) partial sums, slice stride (0: one slice)
                   n_kv_heads, group, heads_per_program, seqlen_q, seqlen_k,  # Hkv, Hq // Hkv, ., Sq, Sk
                   qk_scale, softmax_scale,  # softmax_scale * log2(e), softmax_scale
                   IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """dK, dV of one key block, summed in registers over `heads_per_program` query heads of its KV
    group (no atomics, no per-query-head copies). When the group is split over several programs
    (small batch x KV heads: more parallelism), each writes its fp32 slice, summed on the host."""
    start_n = tl.program_id(1) * BLOCK_N
    n_split = group // heads_per_program
    pid = tl.program_id(0).to(tl.int64)  # (b * Hkv + hk) * n_split + split
    split = pid % n_split
    b = pid // n_split // n_kv_heads
    hk = pid // n_split % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = b * stride_kb + hk * stride_kh + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
    k = _load_rows(K + kv_off, offs_n, seqlen_k, offs_d, True, HEAD_DIM, BLOCK_D)
    v = _load_rows(V + kv_off, offs_n, seqlen_k, offs_d, True, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    causal_offset = seqlen_k - seqlen_q
    lo = 0
    if IS_CAUSAL:  # queries before the block's first key's diagonal see none of it
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    # Padded query rows load q = dO = 0 and padded key rows are never stored, so only the causal
    # mask is needed here; fully masked rows have LSE = +inf, hence p = 0.
    for g in range(split * heads_per_program, (split + 1) * heads_per_program):
        h = hk * group + g
        bh = b * n_kv_heads * group + h
        q_off = b * stride_qb + h * stride_qh + (lo + offs_m)[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
        q_ptrs = Q + q_off
        do_ptrs = DO + q_off
        for start_m in range(lo, seqlen_q, BLOCK_M):
            rows = start_m + offs_m
            q = _load_rows(q_ptrs, rows, seqlen_q, offs_d, True, HEAD_DIM, BLOCK_D)
            lse = tl.load(LSE + bh * seqlen_q + rows, mask=rows < seqlen_q, other=0.0)
            pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
            if IS_CAUSAL:
                pt = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, pt, 0.0)
            do = _load_rows(do_ptrs, rows, seqlen_q, offs_d, True, HEAD_DIM, BLOCK_D)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            delta = tl.load(DELTA + bh * seqlen_q + rows, mask=rows < seqlen_q, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
            q_ptrs += BLOCK_M * stride_qs
            do_ptrs += BLOCK_M * stride_qs
    out_off = split * stride_split + kv_off
    _store_rows(DK + out_off, (dk * softmax_scale).to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, HEAD_DIM,
                BLOCK_D)
    _store_rows(DV + out_off, dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,  # q/do/dq (B,Sq,Hq,D); k/v (B,Sk,Hkv,D); LSE/DELTA (B,Hq,Sq)
                 stride_qb, stride_qs, stride_qh,  # strides of q, do, dq
                 stride_kb, stride_ks, stride_kh,  # strides of k and v
                 n_q_heads, group, seqlen_q, seqlen_k,  # Hq, Hq // Hkv, Sq, Sk
                 qk_scale, softmax_scale,  # softmax_scale * log2(e), softmax_scale
                 IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """dQ of one query block, iterating over the key blocks it can see."""
    start_m = _query_block(IS_CAUSAL) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_q_heads
    h = bh % n_q_heads
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    q = _load_rows(Q + q_off, offs_m, seqlen_q, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + q_off, offs_m, seqlen_q, offs_d, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
    delta = tl.load(DELTA + bh * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
    causal_offset = seqlen_k - seqlen_q
    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + causal_offset), 0)
    kv_off = b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    k_ptrs = K + kv_off
    v_ptrs = V + kv_off
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, cols, seqlen_k, offs_d, True, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_ptrs, cols, seqlen_k, offs_d, True, HEAD_DIM, BLOCK_D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        visible = cols[None, :] < seqlen_k  # padded keys: p could overflow, and inf * 0 = nan
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_ks
    _store_rows(DQ + q_off, (dq * softmax_scale).to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D)



# ---------------------------------------------------------------------------------------------------
# Launch configurations


def flash_fwd_config(head_dim, dtype, arch=80):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel: the largest tiles that
    compile without register spills (see LAUNCHES). sm_80's mma keeps whole K/V tiles as register
    fragments, so it takes BLOCK_N = 32 at D = 128; sm_90's wgmma reads them from shared memory."""
    block_d = head_dim_block(head_dim)
    if dtype == torch.float32:  # no tensor cores (IEEE fp32): small tiles
        return (16, 32, 4, 1) if block_d <= 128 else (16, 16, 4, 1)
    if block_d <= 64:
        return (128, 128, 8, 3) if arch >= 90 else (128, 64, 8, 3)
    if block_d <= 128:
        return (128, 64, 8, 3) if arch >= 90 else (128, 32, 8, 3)
    return (128, 32, 8, 2) if arch >= 90 else (64, 32, 8, 2)


DKDV_CONFIGS = {64: (32, 64, 8, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)}
DELTA_BLOCK_M = 64


def flash_bwd_config(head_dim, dtype, kernel):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward `kernel` ("dkdv" or "dq").
    dK/dV keeps four (BLOCK_N, D) tiles live (k, v, dk, dv), so its tiles are smaller."""
    block_d = head_dim_block(head_dim)
    if dtype == torch.float32:
        return 16, 16, 4, 1
    if kernel == "dq":
        if block_d <= 64:
            return 64, 64, 4, 2
        return (64, 64, 8, 2) if block_d <= 128 else (32, 32, 4, 1)
    return DKDV_CONFIGS[max(block_d, 64)]


def dkdv_group_splits(programs, group, n_sms):
    """Split each GQA group over 2, 4, ... dK/dV programs while there are fewer than two per SM."""
    n_split = 1
    while group % (2 * n_split) == 0 and programs * n_split < 2 * n_sms:
        n_split *= 2
    return n_split


# ---------------------------------------------------------------------------------------------------
# Host launchers


def launch_flash_fwd(q, k, v, causal, scale):
    """o (B, Sq, Hq, D) in q's dtype, lse (B, Hq, Sq) fp32 (log2 domain, +inf for fully masked rows)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    o = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = flash_fwd_config(D, q.dtype, gpu_arch(q.device))
    with device_guard(q):
        _attn_fwd[(B * Hq, cdiv(Sq, block_m))](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            Hq, Hq // Hkv, Sq, Sk, scale * LOG2E, IS_CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
            HEAD_DIM=D, BLOCK_D=head_dim_block(D), PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def launch_flash_bwd(do, q, k, v, o, lse, causal, scale):
    """dq, dk, dv in the inputs' dtypes (GQA: dk, dv summed over each key head's group)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    shape = dict(HEAD_DIM=D, BLOCK_D=head_dim_block(D))
    common = dict(IS_CAUSAL=causal, PREC=dot_precision(q.dtype), **shape)
    with device_guard(q):
        _attn_bwd_delta[(B * Hq, cdiv(Sq, DELTA_BLOCK_M))](o, do, delta, *o.stride()[:3], Hq, Sq,
                                                             BLOCK_M=DELTA_BLOCK_M, num_warps=4, **shape)
        block_m, block_n, warps, stages = flash_bwd_config(D, q.dtype, "dkdv")
        n_split = dkdv_group_splits(B * Hkv * cdiv(Sk, block_n), Hq // Hkv, sm_count(q.device))
        if n_split > 1:  # fp32 partial sums over slices of each GQA group, added below
            dk = torch.empty((n_split,) + k.shape, dtype=torch.float32, device=k.device)
            dv = torch.empty_like(dk)
        _attn_bwd_dkdv[(B * Hkv * n_split, cdiv(Sk, block_n))](
            q, k, v, do, dk, dv, lse, delta, *q.stride()[:3], *k.stride()[:3], dk.stride(0) if n_split > 1 else 0,
            Hkv, Hq // Hkv, Hq // Hkv // n_split, Sq, Sk, scale * LOG2E, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
        if n_split > 1:
            dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
        block_m, block_n, warps, stages = flash_bwd_config(D, q.dtype, "dq")
        _attn_bwd_dq[(B * Hq, cdiv(Sq, block_m))](
            q, k, v, do, dq, lse, delta, *q.stride()[:3], *k.stride()[:3], Hq, Hq // Hkv, Sq, Sk,
            scale * LOG2E, scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Configurations the compile check builds: bf16 for every head-dim class (64, odd 80, 128, 256) and both
# passes; fp16 and non-causal for D=128; the dK/dV kernel writing fp32 partial sums (GQA group split).
# fp32 (IEEE FMA, not tensor cores) is a correctness path and not listed.


def _fwd_launches(head_dim, dtype, causal=True):
    constexprs = dict(IS_CAUSAL=causal, PREC=dot_precision(dtype), HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim))
    by_config = {}  # one launch per distinct configuration, with the archs that pick it
    for arch in (80, 90):
        by_config.setdefault(flash_fwd_config(head_dim, dtype, arch), []).append(arch)
    tag = f"D={head_dim}{'' if causal else ',full'}"
    return [Launch(_attn_fwd, dtype, dict(constexprs, BLOCK_M=bm, BLOCK_N=bn), warps, stages, fp32=("LSE",),
                   mma=True, targets=tuple(archs), tag=f"{tag},{bm}x{bn}")
            for (bm, bn, warps, stages), archs in by_config.items()]


def _bwd_launches(head_dim, dtype, split_group=False):
    constexprs = dict(IS_CAUSAL=True, PREC=dot_precision(dtype), HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim))
    launches = []
    for name, kernel in (("dkdv", _attn_bwd_dkdv),) + ((("dq", _attn_bwd_dq),) if not split_group else ()):
        bm, bn, warps, stages = flash_bwd_config(head_dim, dtype, name)
        partials = ("DK", "DV") if split_group else ()
        launches.append(Launch(kernel, dtype, dict(constexprs, BLOCK_M=bm, BLOCK_N=bn), warps, stages,
                               fp32=("LSE", "DELTA") + partials, mma=True,
                               tag=f"D={head_dim},{bm}x{bn}{',split' if split_group else ''}"))
    return launches


def _delta_launch(head_dim, dtype):
    return Launch(_attn_bwd_delta, dtype, dict(BLOCK_M=DELTA_BLOCK_M, HEAD_DIM=head_dim,
                                               BLOCK_D=head_dim_block(head_dim)), 4, fp32=("DELTA",),
                  tag=f"D={head_dim}")


LAUNCHES = [launch for head_dim in (64, 80, 128, 256) for launch in
            _fwd_launches(head_dim, torch.bfloat16) + _bwd_launches(head_dim, torch.bfloat16)
            + [_delta_launch(head_dim, torch.bfloat16)]]
LAUNCHES += _fwd_launches(128, torch.float16) + _bwd_launches(128, torch.float16)
LAUNCHES += _fwd_launches(128, torch.bfloat16, causal=False)
LAUNCHES += _bwd_launches(64, torch.bfloat16, split_group=True) + _bwd_launches(128, torch.bfloat16, split_group=True)
