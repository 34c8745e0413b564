"""Triton kernels of weight-only quantized linear layers: y = x @ dequantize(W).T (+ bias).

Formats (see fastlm/kernels/quant.py for the full description and the PyTorch reference):
  int8: W int8 (N, K), scale fp32 (N,):                w[n, k] = q[n, k] * scale[n]
  int4: W uint8 (N, Kp / 2), two values per byte (low nibble = even k, high nibble = odd k),
        scale, zero fp32 (N, Kp / G) for groups of G consecutive k:
                                                        w[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G]
        Kp = K rounded up to a multiple of G (the padded columns meet x's masked zeros).
x (M, K) fp32/fp16/bf16 with unit stride along K; y (M, N) in x's dtype; accumulation in fp32. The
kernels name the sizes n_rows, n_out, n_in (M, N, K): uppercase parameters are pointers (compile_check).

Two kernels per format, chosen by the number of rows M:
  - GEMV (M <= GEMV_MAX_ROWS, decode): one program per (block of BLOCK_N outputs, row of x); the weight
    tile is dequantized to fp32 and multiplied element-wise, reduced once at the end (int8) or per
    group (int4). Decoding reads every weight byte once per row; rows of the same block run together, so
    repeated reads come from L2.
  - GEMM (prefill): (BLOCK_M, BLOCK_N) tiles with tensor-core tl.dot on the raw integer values converted
    to x's dtype (exact: |q| <= 127 and q - 8 in -8..7 are exact in fp16/bf16); the scale is applied to the
    fp32 result, per output channel (int8) or per group step (int4, whose zero adds rowsum(x) * zero).
    int4 splits x's tile into even and odd columns (tl.split) to meet the two nibbles of each byte.
Below the kernels: the launch configuration (gemv_config / gemm_config), the host launchers
(launch_int8_linear / launch_int4_linear) and LAUNCHES (what the compile check builds). The formats'
reference, the custom ops and the public functions are in quant.py; the CPU paths in _quant_cpu.py.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import Launch, cdiv, device_guard, dot_precision, last_dim_contiguous, sm_count

GEMV_MAX_ROWS = 16


@triton.jit
def _int8_gemv(X, W, SCALE, BIAS, Y,  # x (M, K); w int8 (N, K); scale (N,); bias (N,) or x; y (M, N)
               n_out, n_in, stride_xm, stride_wn, stride_ym,  # N, K; row strides of x, w and y
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(X + m * stride_xm + k, mask=k < n_in, other=0.0).to(tl.float32)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k[None, :] < n_in), other=0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, 1) * tl.load(SCALE + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def _int8_gemm(X, W, SCALE, BIAS, Y,  # as _int8_gemv
               n_rows, n_out, n_in, stride_xm, stride_wn, stride_ym,  # M, N, K; row strides of x, w and y
               HAS_BIAS: tl.constexpr, PREC: tl.constexpr,  # PREC: tl.dot input precision ("ieee" for fp32)
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < n_rows, offs_n < n_out
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k_ok = (k0 + offs_k) < n_in
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0).to(x.dtype)  # exact: |q| <= 127
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(SCALE + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_gemv(X, W, SCALE, ZERO, BIAS, Y,  # x (M, K); w uint8 (N, Kp/2); scale, zero (N, Kp/G); bias; y (M, N)
               n_out, n_in, n_groups, stride_xm, stride_wn, stride_ym,  # N, K, Kp / G; row strides of x, w, y
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    m = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    offs_k = tl.arange(0, GROUP)
    offs_b = tl.arange(0, GROUP // 2)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    sz_rows = offs_n.to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, n_groups):
        k = g * GROUP + offs_k
        x = tl.load(X + m * stride_xm + k, mask=k < n_in, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, [GROUP // 2, 2]))
        b = tl.load(w_rows + g * (GROUP // 2) + offs_b[None, :], mask=n_ok[:, None], other=0)
        lo = (b & 15).to(tl.float32) - 8.0
        hi = (b >> 4).to(tl.float32) - 8.0
        part = tl.sum(lo * x_even[None, :] + hi * x_odd[None, :], 1)
        scale = tl.load(SCALE + sz_rows + g, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(ZERO + sz_rows + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * scale + tl.sum(x, 0) * zero
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_gemm(X, W, SCALE, ZERO, BIAS, Y,  # as _int4_gemv
               n_rows, n_out, n_in, n_groups, stride_xm, stride_wn, stride_ym,  # as _int4_gemv, and M
               HAS_BIAS: tl.constexpr, PREC: tl.constexpr,  # PREC: tl.dot input precision ("ieee" for fp32)
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < n_rows, offs_n < n_out
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + tl.arange(0, BLOCK_K // 2)[None, :]
    sz_rows = offs_n.to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_groups * GROUP, BLOCK_K):  # BLOCK_K divides GROUP: one group per step
        x = tl.load(x_ptrs, mask=m_ok[:, None] & ((k0 + offs_k) < n_in)[None, :], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))
        b = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        lo = (b & 15).to(x.dtype) - 8.0  # exact in fp16/bf16
        hi = (b >> 4).to(x.dtype) - 8.0
        part = tl.dot(x_odd, tl.trans(hi), tl.dot(x_even, tl.trans(lo), input_precision=PREC), input_precision=PREC)
        g = k0 // GROUP
        scale = tl.load(SCALE + sz_rows + g, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(ZERO + sz_rows + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :] + tl.sum(x.to(tl.float32), 1)[:, None] * zero[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch configuration: the launchers and LAUNCHES both read these


def gemv_config(bits, outputs, sms, group_size=None):
    """(BLOCK_N, BLOCK_K or GROUP, num_warps) for `outputs` = rows x N values: narrow blocks when there
    are few outputs, so a decode step still gives each of the `sms` SMs two programs."""
    block_n = 32 if outputs >= 32 * 2 * sms else 16
    return (block_n, 128, 4) if bits == 8 else (block_n, group_size, 4)


def gemm_config(dtype, group_size=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); int4's BLOCK_K divides its group, and its
    per-group partial product doubles the fp32 tile held in registers: 8 warps (254 registers with 4)."""
    if dtype == torch.float32:  # IEEE FMA, no tensor cores: a correctness path
        bm, bn, bk, warps, stages = 32, 32, 32, 4, 2
    else:
        bm, bn, bk, warps, stages = 64, 128, 64, 4 if group_size is None else 8, 3
    return bm, bn, bk if group_size is None else min(bk, group_size), warps, stages


# ---------------------------------------------------------------------------------------------------
# Host launchers: x (M, K) 2-D, the format's tensors validated by quant.py


def launch_int8_linear(x, weight, scale, bias):
    """y (M, N) in x's dtype = x @ (weight * scale[:, None]).T (+ bias)."""
    M, K = x.shape
    N = weight.shape[0]
    x, weight, scale = last_dim_contiguous(x), last_dim_contiguous(weight), scale.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else scale  # never read without HAS_BIAS
    strides = (x.stride(0), weight.stride(0), y.stride(0))
    with device_guard(x):
        if M <= GEMV_MAX_ROWS:
            block_n, block_k, warps = gemv_config(8, M * N, sm_count(x.device))
            _int8_gemv[(cdiv(N, block_n), M)](x, weight, scale, bias_arg, y, N, K, *strides,
                                              HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                              num_warps=warps)
        else:
            bm, bn, bk, warps, stages = gemm_config(x.dtype)
            _int8_gemm[(cdiv(M, bm), cdiv(N, bn))](x, weight, scale, bias_arg, y, M, N, K, *strides,
                                                   HAS_BIAS=bias is not None, PREC=dot_precision(x.dtype),
                                                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                                   num_stages=stages)
    return y


def launch_int4_linear(x, packed, scale, zero, bias):
    """y (M, N) in x's dtype = x @ dequantize_int4(packed, scale, zero).T (+ bias)."""
    M, K = x.shape
    N, n_groups = scale.shape
    group = 2 * packed.shape[1] // n_groups
    x, packed = last_dim_contiguous(x), last_dim_contiguous(packed)
    scale, zero = scale.contiguous(), zero.contiguous()  # the kernels index them as (N, n_groups) rows
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else scale
    strides = (x.stride(0), packed.stride(0), y.stride(0))
    with device_guard(x):
        if M <= GEMV_MAX_ROWS:
            block_n, _, warps = gemv_config(4, M * N, sm_count(x.device), group)
            _int4_gemv[(cdiv(N, block_n), M)](x, packed, scale, zero, bias_arg, y, N, K, n_groups, *strides,
                                              HAS_BIAS=bias is not None, BLOCK_N=block_n, GROUP=group,
                                              num_warps=warps)
        else:
            bm, bn, bk, warps, stages = gemm_config(x.dtype, group)
            _int4_gemm[(cdiv(M, bm), cdiv(N, bn))](x, packed, scale, zero, bias_arg, y, M, N, K, n_groups, *strides,
                                                   HAS_BIAS=bias is not None, PREC=dot_precision(x.dtype),
                                                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=group,
                                                   num_warps=warps, num_stages=stages)
    return y


# ---------------------------------------------------------------------------------------------------
# Configurations the compile check builds: the launchers' choices for bf16 and fp16 with bias, on an
# H100's 132 SMs: the GEMVs for a small (768) and a large (16 x 4096) output, int4 in groups of 32 and
# 128 (64 in bf16 at the small size); the GEMMs for every int4 group size.

def _gemv_launch(bits, dtype, outputs, group=None):
    block_n, block_k, warps = gemv_config(bits, outputs, 132, group)
    if bits == 8:
        return Launch(_int8_gemv, dtype, dict(HAS_BIAS=True, BLOCK_N=block_n, BLOCK_K=block_k), warps,
                      fp32=("SCALE",), int8=("W",), tag=f"BLOCK_N={block_n}")
    return Launch(_int4_gemv, dtype, dict(HAS_BIAS=True, BLOCK_N=block_n, GROUP=group), warps,
                  fp32=("SCALE", "ZERO"), uint8=("W",), tag=f"G={group},BLOCK_N={block_n}")


def _gemm_launch(dtype, group=None):
    bm, bn, bk, warps, stages = gemm_config(dtype, group)
    constexprs = dict(HAS_BIAS=True, PREC=dot_precision(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if group is None:
        return Launch(_int8_gemm, dtype, constexprs, warps, stages, fp32=("SCALE",), int8=("W",), mma=True,
                      tag=f"{bm}x{bn}x{bk}")
    return Launch(_int4_gemm, dtype, dict(constexprs, GROUP=group), warps, stages, fp32=("SCALE", "ZERO"),
                  uint8=("W",), mma=True, tag=f"G={group},{bm}x{bn}x{bk}")


_DTYPES = (torch.bfloat16, torch.float16)
LAUNCHES = ([_gemv_launch(8, d, n) for d in _DTYPES for n in (768, 16 * 4096)]
            + [_gemv_launch(4, d, n, g) for d in _DTYPES for n in (768, 16 * 4096) for g in (32, 128)]
            + [_gemv_launch(4, torch.bfloat16, 768, 64)]
            + [_gemm_launch(d) for d in _DTYPES]
            + [_gemm_launch(d, g) for d in _DTYPES for g in (32, 64, 128)])
