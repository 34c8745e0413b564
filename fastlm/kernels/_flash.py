"""Triton kernels of flash attention (prefill): forward, and backward as delta / dK-dV / dQ kernels.

Layout: q, o (B, Sq, Hq, D); k, v (B, Sk, Hkv, D); last dim contiguous, the rest by strides.
Scores live in the log2 domain: qk_scale = softmax_scale * log2(e), so exp2 replaces exp and the
saved log-sum-exp (LSE, (B, Hq, Sq) fp32) is m + log2(l). Fully masked rows (causal with Sq > Sk)
get output 0 and LSE = +inf, so the backward's exp2(s - LSE) is 0 for them.
Causal masks align bottom-right: query i sees keys j <= i + (Sk - Sq).
Grids put (batch x heads) on axis 0 (no 65535 limit) and sequence blocks on axis 1; consecutive
programs are neighbouring heads, which share K/V under GQA (L2 reuse).
The host side (configs, launchers, autograd) is in attention.py.
"""
import triton
import triton.language as tl


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
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptrs, cols, seqlen_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
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
