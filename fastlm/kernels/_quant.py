"""Triton kernels of weight-only quantized linear layers: y = x @ dequantize(W).T (+ bias).

Formats (see fastlm/kernels/quant.py for the full description and the PyTorch reference):
  int8: W int8 (N, K), scale fp32 (N,):                w[n, k] = q[n, k] * scale[n]
  int4: W uint8 (N, Kp / 2), two values per byte (low nibble = even k, high nibble = odd k),
        scale, zero fp32 (N, Kp / G) for groups of G consecutive k:
                                                        w[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G]
        Kp = K rounded up to a multiple of G (the padded columns meet x's masked zeros).
x (M, K) fp32/fp16/bf16 with unit stride along K; y (M, N) in x's dtype; accumulation in fp32.

Two kernels per format, chosen by the number of rows M:
  - GEMV (M <= GEMV_MAX_ROWS, decode): one program per (block of BLOCK_N outputs, row of x); the weight
    tile is dequantized to fp32 and multiplied element-wise, reduced once at the end (int8) or per
    group (int4). Decoding reads every weight byte once per row; rows of the same block run together, so
    repeated reads come from L2.
  - GEMM (prefill): (BLOCK_M, BLOCK_N) tiles with tensor-core tl.dot on the raw integer values converted
    to x's dtype (exact: |q| <= 127 and q - 8 in -8..7 are exact in fp16/bf16); the scale is applied to the
    fp32 result, per output channel (int8) or per group step (int4, whose zero adds rowsum(x) * zero).
    int4 splits x's tile into even and odd columns (tl.split) to meet the two nibbles of each byte.
The launchers below reshape to 2-D, choose blocks through gemv_config / gemm_config, and launch; the
compile check builds COMPILE_CONFIGS (plain data) through compile_specs().
"""
import contextlib

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 16


@triton.jit
def _int8_gemv(X, W, SCALE, BIAS, Y,  # x (M, K); w int8 (N, K); scale (N,); bias (N,) or x; y (M, N)
               N, K, stride_xm, stride_ym,  # sizes; row strides of x and y
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = W + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(X + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k[None, :] < K), other=0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, 1) * tl.load(SCALE + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def _int8_gemm(X, W, SCALE, BIAS, Y,  # as _int8_gemv
               M, N, K, stride_xm, stride_ym,  # sizes; row strides of x and y
               HAS_BIAS: tl.constexpr, PREC: tl.constexpr,  # PREC: tl.dot input precision ("ieee" for fp32)
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
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
               N, K, n_groups, stride_xm, stride_ym,  # sizes (Kp = n_groups * GROUP); row strides of x, y
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    m = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, GROUP)
    offs_b = tl.arange(0, GROUP // 2)
    w_rows = W + offs_n.to(tl.int64)[:, None] * (n_groups * (GROUP // 2))
    sz_rows = offs_n.to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, n_groups):
        k = g * GROUP + offs_k
        x = tl.load(X + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
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
               M, N, K, n_groups, stride_xm, stride_ym,  # sizes (Kp = n_groups * GROUP); row strides of x, y
               HAS_BIAS: tl.constexpr, PREC: tl.constexpr,  # PREC: tl.dot input precision ("ieee" for fp32)
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * (n_groups * (GROUP // 2)) + tl.arange(0, BLOCK_K // 2)[None, :]
    sz_rows = offs_n.to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_groups * GROUP, BLOCK_K):  # BLOCK_K divides GROUP: one group per step
        x = tl.load(x_ptrs, mask=m_ok[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
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
# Launch configuration: the launchers and the compile check both read these


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32


def gemv_config(bits, rows_times_n, group_size=None):
    """(BLOCK_N, BLOCK_K or GROUP, num_warps): narrow blocks when there are few outputs, so a decode step
    still gives every SM a few programs (~264 on an H100)."""
    block_n = 32 if rows_times_n >= 32 * 264 else 16
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
# Host launchers: x (M, K) with unit stride along K, the format's tensors validated by quant.py


def _cdiv(a, b):
    return -(-a // b)


def _device_guard(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def int8_linear_2d(x, weight, scale, bias):
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else scale  # never read without HAS_BIAS
    with _device_guard(x):
        if M <= GEMV_MAX_ROWS:
            block_n, block_k, warps = gemv_config(8, M * N)
            _int8_gemv[(_cdiv(N, block_n), M)](x, weight, scale, bias_arg, y, N, K, x.stride(0), y.stride(0),
                                                HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                                num_warps=warps)
        else:
            bm, bn, bk, warps, stages = gemm_config(x.dtype)
            _int8_gemm[(_cdiv(M, bm), _cdiv(N, bn))](x, weight, scale, bias_arg, y, M, N, K, x.stride(0), y.stride(0),
                                                     HAS_BIAS=bias is not None, PREC=_dot_precision(x.dtype),
                                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                                     num_stages=stages)
    return y


def int4_linear_2d(x, packed, scale, zero, bias):
    M, K = x.shape
    N, n_groups = scale.shape
    group = 2 * packed.shape[1] // n_groups
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else scale
    with _device_guard(x):
        if M <= GEMV_MAX_ROWS:
            block_n, _, warps = gemv_config(4, M * N, group)
            _int4_gemv[(_cdiv(N, block_n), M)](x, packed, scale, zero, bias_arg, y, N, K, n_groups, x.stride(0),
                                                y.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n, GROUP=group,
                                                num_warps=warps)
        else:
            bm, bn, bk, warps, stages = gemm_config(x.dtype, group)
            _int4_gemm[(_cdiv(M, bm), _cdiv(N, bn))](x, packed, scale, zero, bias_arg, y, M, N, K, n_groups,
                                                     x.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                                     PREC=_dot_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn,
                                                     BLOCK_K=bk, GROUP=group, num_warps=warps, num_stages=stages)
    return y


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (plain data): the launchers' choices for bf16 and fp16, with bias

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_CONFIGS = (
    [dict(kernel="_int8_gemv", dtype=d, bits=8, rows_times_n=n) for d in _DTYPES for n in (768, 16 * 4096)]
    + [dict(kernel="_int4_gemv", dtype=d, bits=4, rows_times_n=n, group=g) for d in _DTYPES
       for n in (768, 16 * 4096) for g in (32, 128)]
    + [dict(kernel="_int4_gemv", dtype="bf16", bits=4, rows_times_n=768, group=64)]
    + [dict(kernel="_int8_gemm", dtype=d) for d in _DTYPES]
    + [dict(kernel="_int4_gemm", dtype=d, group=g) for d in _DTYPES for g in (32, 64, 128)]
)
_SIGNATURES = {  # pointer and scalar arguments of each kernel, as the runtime specializes them
    "_int8_gemv": dict(X="*x", W="*i8", SCALE="*fp32", BIAS="*x", Y="*x", N="i32", K="i32", stride_xm="i32",
                       stride_ym="i32"),
    "_int4_gemv": dict(X="*x", W="*u8", SCALE="*fp32", ZERO="*fp32", BIAS="*x", Y="*x", N="i32", K="i32",
                       n_groups="i32", stride_xm="i32", stride_ym="i32"),
}
_SIGNATURES["_int8_gemm"] = dict(_SIGNATURES["_int8_gemv"], M="i32")
_SIGNATURES["_int4_gemm"] = dict(_SIGNATURES["_int4_gemv"], M="i32")


def _constexprs(config):
    dtype = _DTYPES[config["dtype"]]
    if config["kernel"].endswith("gemv"):
        block_n, block_k, warps = gemv_config(config["bits"], config["rows_times_n"], config.get("group"))
        sizes = dict(BLOCK_N=block_n, **({"BLOCK_K": block_k} if config["bits"] == 8 else {"GROUP": block_k}))
        return dict(HAS_BIAS=True, **sizes), warps, 3
    bm, bn, bk, warps, stages = gemm_config(dtype, config.get("group"))
    sizes = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **({"GROUP": config["group"]} if "group" in config else {}))
    return dict(HAS_BIAS=True, PREC=_dot_precision(dtype), **sizes), warps, stages


def compile_specs():
    """KernelSpecs of COMPILE_CONFIGS for fastlm.kernels.compile_check (GEMMs must use tensor cores)."""
    import inspect

    from fastlm.kernels.compile_check import KernelSpec

    specs = {}
    for config in COMPILE_CONFIGS:
        fn = globals()[config["kernel"]]
        constexprs, warps, stages = _constexprs(config)
        ptr = "*" + config["dtype"]
        params = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
        signature = {a: (ptr if t == "*x" else t) for a, t in _SIGNATURES[config["kernel"]].items()}
        signature = {a: signature.get(a, "constexpr") for a in params}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(params) if signature[a] != "constexpr"}
        tag = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith(("BLOCK", "GROUP")))
        name = f"{config['kernel'][1:]}[{config['dtype']},{tag}]"
        specs[name] = KernelSpec(name, fn, signature, constexprs, warps, stages, expect_mma=fn in (_int8_gemm, _int4_gemm),
                                 attrs=attrs)
    return list(specs.values())
