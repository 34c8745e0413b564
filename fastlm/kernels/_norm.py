"""Triton kernels of LayerNorm and RMSNorm with a fused residual add, and their host launchers.

Math, per row of N features (statistics in fp32 whatever the input dtype):
    h = x (+ residual, rounded to x.dtype, so the fused add equals the unfused one)
    LayerNorm: y = (h - mean(h)) * rstd * w + b,   rstd = 1 / sqrt(var(h) + eps)   (biased variance)
    RMSNorm:   y = h * rstd * w,                   rstd = 1 / sqrt(mean(h^2) + eps)
Backward, with xhat = (h - mean) * rstd (RMSNorm: h * rstd):
    dh = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy))   (RMSNorm: no last term)
         + the gradient flowing into the h output, if any;   dx = dresidual = dh
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)   (per-program fp32 partials, summed in torch)

Shapes/dtypes: x (..., N) fp32/fp16/bf16; weight/bias (N,), residual like x. Rows up to MAX_FUSED_N
(backward: MAX_FUSED_N_BWD) features live in registers (several rows per program when N is small);
longer rows are processed in chunks of CHUNK_N (two passes over the row, the statistics merged chunk by
chunk with Chan's formula so that a large mean does not cancel); the chunked backward accumulates dW/dB
in its program's partial row in memory. The public functions, references and custom ops are in norms.py.
References: flash-attention ops/triton/layer_norm.py, Liger-Kernel ops/rms_norm.py, Triton tutorial 05.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import Launch, device_guard, program_slots, rows

MAX_FUSED_N = 8192  # longest row the forward holds in registers whole
MAX_FUSED_N_BWD = 4096  # same for the backward (8192 spills registers on sm_90)
CHUNK_N = 4096  # chunk length of the looped kernels for longer rows
MIN_TILE = 1024  # short rows: several rows per program so a program handles at least this many elements


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _norm_fwd(
    X, R, W, B, Y, H,  # x, residual, weight, bias, out y, out h = x + residual
    MEAN, RSTD,  # per-row fp32 statistics saved for the backward
    stride_x, stride_r, stride_y, stride_h,  # row strides in elements (last dim contiguous)
    n_rows, n_cols, eps,  # rows, features, epsilon
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows per program, power of two >= n_cols
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(H.dtype.element_ty)  # round h to x's dtype: fused == unfused
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    if IS_RMS:
        hc = h
    else:
        mean = tl.sum(h, axis=1) / n_cols
        hc = tl.where(mask, h - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = hc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_chunked(
    X, R, W, B, Y, H,  # x, residual, weight, bias, out y, out h = x + residual
    MEAN, RSTD,  # per-row fp32 statistics saved for the backward
    stride_x, stride_r, stride_y, stride_h,  # row strides in elements (last dim contiguous)
    n_cols, eps,  # features, epsilon
    BLOCK_N: tl.constexpr,  # chunk length
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mean = 0.0
    m2 = 0.0  # sum of squared deviations from mean (RMSNorm: sum of squares)
    for start in range(0, n_cols, BLOCK_N):  # pass 1: h and the statistics, merged chunk by chunk
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = (h + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h, mask=mask)
            h = h.to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(h * h, axis=0)
        else:  # Chan et al.: merge the chunk's exact mean / M2 into the running ones
            n_chunk = tl.minimum(n_cols - start, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(h, axis=0) / n_chunk
            d = tl.where(mask, h - chunk_mean, 0.0)
            delta = chunk_mean - mean
            n_seen = start * 1.0  # as fp32
            mean += delta * n_chunk / (n_seen + n_chunk)
            m2 += tl.sum(d * d, axis=0) + delta * delta * n_seen * n_chunk / (n_seen + n_chunk)
    rstd = 1.0 / tl.sqrt(m2 / n_cols + eps)
    tl.store(RSTD + row, rstd)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # pass 2 reads h back: make the block's stores visible to all its threads
    for start in range(0, n_cols, BLOCK_N):  # pass 2: normalize
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        if HAS_RESIDUAL:
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if not IS_RMS:
            h = h - mean
        y = h * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(
    H, W, DY, DH, DX,  # normalized input h, weight, grad of y, grad of the h output, out grad of h
    MEAN, RSTD,  # per-row statistics from the forward
    DW_PART, DB_PART,  # out (programs, n_cols) fp32 partial sums of dweight / dbias
    stride_h, stride_dy, stride_dh, stride_dx,  # row strides in elements
    n_rows, n_cols, rows_per_program,  # rows, features, rows handled by one program (multiple of BLOCK_M)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows per step, power of two >= n_cols
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / n_cols
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * n_cols + cols, db, mask=col_ok)


@triton.jit
def _norm_bwd_chunked(
    H, W, DY, DH, DX,  # normalized input h, weight, grad of y, grad of the h output, out grad of h
    MEAN, RSTD,  # per-row statistics from the forward
    DW_PART, DB_PART,  # in/out (programs, n_cols) fp32 partial sums, zero-initialized, one row per program
    stride_h, stride_dy, stride_dh, stride_dx,  # row strides in elements
    n_rows, n_cols, rows_per_program,  # rows, features, rows handled by one program
    BLOCK_N: tl.constexpr,  # chunk length
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
        rstd = tl.load(RSTD + row)
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(MEAN + row)
        c1 = 0.0
        c2 = 0.0
        for start in range(0, n_cols, BLOCK_N):  # pass 1: the row sums the gradient needs
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            wdy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32) * \
                tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            c1 += tl.sum((h - mean) * rstd * wdy, axis=0)
            c2 += tl.sum(wdy, axis=0)
        c1 = c1 / n_cols
        if IS_RMS:
            c2 = 0.0
        else:
            c2 = c2 / n_cols
        for start in range(0, n_cols, BLOCK_N):  # pass 2: dx, and dw/db into this program's partials
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            xhat = (tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            dx = (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            part = pid * n_cols + cols
            tl.store(DW_PART + part, tl.load(DW_PART + part, mask=mask) + dy * xhat, mask=mask)
            if HAS_BIAS:
                tl.store(DB_PART + part, tl.load(DB_PART + part, mask=mask) + dy, mask=mask)


# ----------------------------------------------------------------------------- host launchers
@dataclasses.dataclass(frozen=True)
class NormConfig:
    block_m: int  # rows per program step (1 for chunked)
    block_n: int  # whole-row block, or chunk length when chunked
    num_warps: int
    chunked: bool


def norm_config(n_cols: int, backward: bool = False) -> NormConfig:
    """The one place that picks block sizes and warps, for the launchers and LAUNCHES.
    The backward holds more values per element (h, dy, w, xhat, dw/db accumulators), so it switches
    to the chunked kernel earlier: its 8192-wide block spills on sm_90 even with 16 warps."""
    if n_cols > (MAX_FUSED_N_BWD if backward else MAX_FUSED_N):
        return NormConfig(1, CHUNK_N, 16, True)
    block_n = max(triton.next_power_of_2(n_cols), 128)
    block_m = max(MIN_TILE // block_n, 1)
    return NormConfig(block_m, block_n, min(max(block_m * block_n // 256, 4), 16), False)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every buffer a kernel writes in full (tests swap it for a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def launch_norm_fwd(x, weight, bias, residual, eps, is_rms):
    """x, residual: (..., N). Returns y (x's shape), h = x + residual (x's shape; None without a
    residual), mean (M,) fp32 (empty for RMSNorm) and rstd (M,) fp32 for M = x.numel() // N rows."""
    n_cols = x.shape[-1]
    x2 = rows(x, n_cols)
    r2 = rows(residual, n_cols) if residual is not None else None
    n_rows = x2.shape[0]
    y = _empty((n_rows, n_cols), x.dtype, x.device)
    h = _empty((n_rows, n_cols), x.dtype, x.device) if residual is not None else None
    mean = _empty((n_rows if not is_rms else 0,), torch.float32, x.device)
    rstd = _empty((n_rows,), torch.float32, x.device)
    if n_rows > 0:
        cfg = norm_config(n_cols)
        w = weight.contiguous()
        # absent optional tensors: pass any valid pointer; the constexpr flags keep the kernel off it
        r_, h_ = (r2, h) if r2 is not None else (x2, y)
        b_ = bias.contiguous() if bias is not None else w
        flags = dict(IS_RMS=is_rms, HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, num_warps=cfg.num_warps)
        args = (x2, r_, w, b_, y, h_, rstd if is_rms else mean, rstd,
                x2.stride(0), r_.stride(0), y.stride(0), h_.stride(0))
        with device_guard(x):
            if cfg.chunked:
                _norm_fwd_chunked[(n_rows,)](*args, n_cols, eps, BLOCK_N=cfg.block_n, **flags)
            else:
                _norm_fwd[(triton.cdiv(n_rows, cfg.block_m),)](*args, n_rows, n_cols, eps, BLOCK_M=cfg.block_m,
                                                               BLOCK_N=cfg.block_n, **flags)
    return y.reshape(x.shape), (h.reshape(x.shape) if h is not None else None), mean, rstd


def launch_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias, is_rms):
    """dy, dh (or None), h: (..., N) in h's dtype. Returns dx (h's shape and dtype), dweight (N,) fp32,
    dbias (N,) fp32 or None."""
    n_cols = h.shape[-1]
    dy2, h2 = rows(dy, n_cols), rows(h, n_cols)
    dh2 = rows(dh, n_cols) if dh is not None else None
    n_rows = h2.shape[0]
    cfg = norm_config(n_cols, backward=True)
    programs = max(min(triton.cdiv(n_rows, cfg.block_m), program_slots(h.device)), 1)
    rows_per_program = max(triton.cdiv(triton.cdiv(n_rows, programs), cfg.block_m), 1) * cfg.block_m
    programs = max(triton.cdiv(n_rows, rows_per_program), 1)
    dx = _empty((n_rows, n_cols), h.dtype, h.device)
    dw_part = _empty((programs, n_cols), torch.float32, h.device)
    db_part = _empty((programs, n_cols), torch.float32, h.device) if has_bias else dw_part
    if cfg.chunked or n_rows == 0:  # the chunked kernel adds into its partial row
        dw_part.zero_()
        db_part.zero_()
    if n_rows > 0:
        dh_ = dh2 if dh2 is not None else dy2
        args = (h2, weight.contiguous(), dy2, dh_, dx, rstd if is_rms else mean, rstd, dw_part, db_part,
                h2.stride(0), dy2.stride(0), dh_.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program)
        flags = dict(IS_RMS=is_rms, HAS_BIAS=has_bias, HAS_DH=dh2 is not None, num_warps=cfg.num_warps)
        with device_guard(h):
            if cfg.chunked:
                _norm_bwd_chunked[(programs,)](*args, BLOCK_N=cfg.block_n, **flags)
            else:
                _norm_bwd[(programs,)](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags)
    return dx.reshape(h.shape), dw_part.sum(0), (db_part.sum(0) if has_bias else None)


# ----------------------------------------------------------------------------- configurations the compile check builds
def _launch(n_cols, dtype, is_rms, backward) -> Launch:
    """The launch of a row length n_cols, in its heaviest flag set (LayerNorm with bias; residual /
    incoming dh)."""
    cfg = norm_config(n_cols, backward)
    kernel = [[_norm_fwd, _norm_fwd_chunked], [_norm_bwd, _norm_bwd_chunked]][backward][cfg.chunked]
    constexprs = dict(IS_RMS=is_rms, HAS_BIAS=not is_rms, BLOCK_N=cfg.block_n,
                      **({"HAS_DH": True} if backward else {"HAS_RESIDUAL": True}))
    if not cfg.chunked:
        constexprs["BLOCK_M"] = cfg.block_m
    return Launch(kernel, dtype, constexprs, cfg.num_warps, fp32=("MEAN", "RSTD", "DW_PART", "DB_PART"),
                  tag=f"{'rms' if is_rms else 'ln'},BLOCK={cfg.block_m}x{cfg.block_n}")


# (row length, dtype, is_rms): one length per register bucket (128 .. 8192) and the chunked kernels for
# LayerNorm in fp16; RMSNorm in bf16 and LayerNorm in fp32 on the largest buckets.
_CHUNKED_N = MAX_FUSED_N + 1
COMPILE_CASES = [(128 * 2**i, torch.float16, False) for i in range(7)] + [
    (_CHUNKED_N, torch.float16, False),
    (MAX_FUSED_N_BWD, torch.bfloat16, True), (MAX_FUSED_N, torch.bfloat16, True), (_CHUNKED_N, torch.bfloat16, True),
    (MAX_FUSED_N_BWD, torch.float32, False), (MAX_FUSED_N, torch.float32, False), (_CHUNKED_N, torch.float32, False)]
LAUNCHES = [_launch(n, dtype, is_rms, backward) for n, dtype, is_rms in COMPILE_CASES for backward in (False, True)]
