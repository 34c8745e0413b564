"""LayerNorm and RMSNorm with a fused residual add: Triton forward and backward kernels.

Math, per row of N features (statistics in fp32 whatever the input dtype):
    h = x (+ residual, rounded to x.dtype, so the fused add equals the unfused one)
    LayerNorm: y = (h - mean(h)) * rstd * w + b,   rstd = 1 / sqrt(var(h) + eps)   (biased variance)
    RMSNorm:   y = h * rstd * w,                   rstd = 1 / sqrt(mean(h^2) + eps)
With `residual` the functions return (y, h): the pre-norm block's add-and-norm in one pass, each input
read once and each output written once. Backward, with xhat = (h - mean) * rstd (RMSNorm: h * rstd):
    dh = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy))   (RMSNorm: no last term)
         + the gradient flowing into the h output, if any;   dx = dresidual = dh
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)   (per-program fp32 partials, summed in torch)

Shapes/dtypes: x (..., N) with 1 <= N <= 65536, fp32/fp16/bf16; weight/bias (N,), residual like x, all
of x's dtype and device. Rows up to MAX_FUSED_N (backward: MAX_FUSED_N_BWD) features live in
registers (several rows per program when N is small); longer rows are processed in chunks of CHUNK_N
(two passes over the row, the statistics merged chunk by chunk with Chan's formula so that a large
mean does not cancel); the chunked backward accumulates dW/dB in its program's partial row in memory.
References: flash-attention ops/triton/layer_norm.py, Liger-Kernel ops/rms_norm.py, Triton tutorial 05.
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlm.kernels import ops
from fastlm.kernels._utils import check_positive_float, check_tensor, triton_dtype_name, use_triton

MAX_N = 65536  # longest supported row
MAX_FUSED_N = 8192  # longest row the forward holds in registers whole
MAX_FUSED_N_BWD = 4096  # same for the backward (8192 spills registers on sm_90)
CHUNK_N = 4096  # chunk length of the looped kernels for longer rows
MIN_TILE = 1024  # short rows: several rows per program so a program handles at least this many elements


# ----------------------------------------------------------------------------- references (CPU path)
def layer_norm_ref(x, weight, bias=None, eps=1e-5, residual=None):
    # torch adds, and normalizes, fp16/bf16 values in fp32 internally and rounds once: the same result as
    # upcasting by hand, without the copies (this is the CPU decode path, where the copies show)
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, h)


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    h = x if residual is None else x + residual
    y = F.rms_norm(h, (h.shape[-1],), weight, eps)  # fp32 statistics inside, as layer_norm_ref
    return y if residual is None else (y, h)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _norm_fwd(
    X, R, W, B, Y, H,  # x, residual, weight, bias, out y, out h = x + residual
    MEAN, RSTD,  # per-row fp32 statistics saved for the backward
    stride_x, stride_r, stride_y, stride_h,  # row strides in elements (last dim contiguous)
    M, N, eps,  # rows, features, epsilon
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows per program, power of two >= N
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(H.dtype.element_ty)  # round h to x's dtype: fused == unfused
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    if IS_RMS:
        hc = h
    else:
        mean = tl.sum(h, axis=1) / N
        hc = tl.where(mask, h - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = hc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_chunked(
    X, R, W, B, Y, H,  # x, residual, weight, bias, out y, out h = x + residual
    MEAN, RSTD,  # per-row fp32 statistics saved for the backward
    stride_x, stride_r, stride_y, stride_h,  # row strides in elements (last dim contiguous)
    N, eps,  # features, epsilon
    BLOCK_N: tl.constexpr,  # chunk length
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mean = 0.0
    m2 = 0.0  # sum of squared deviations from mean (RMSNorm: sum of squares)
    for start in range(0, N, BLOCK_N):  # pass 1: h and the statistics, merged chunk by chunk
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = (h + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h, mask=mask)
            h = h.to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(h * h, axis=0)
        else:  # Chan et al.: merge the chunk's exact mean / M2 into the running ones
            n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(h, axis=0) / n_chunk
            d = tl.where(mask, h - chunk_mean, 0.0)
            delta = chunk_mean - mean
            n_seen = start * 1.0  # as fp32
            mean += delta * n_chunk / (n_seen + n_chunk)
            m2 += tl.sum(d * d, axis=0) + delta * delta * n_seen * n_chunk / (n_seen + n_chunk)
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    tl.store(RSTD + row, rstd)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # pass 2 reads h back: make the block's stores visible to all its threads
    for start in range(0, N, BLOCK_N):  # pass 2: normalize
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
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
    DW_PART, DB_PART,  # out (programs, N) fp32 partial sums of dweight / dbias
    stride_h, stride_dy, stride_dh, stride_dx,  # row strides in elements
    M, N, rows_per_program,  # rows, features, rows handled by one program (multiple of BLOCK_M)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows per step, power of two >= N
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
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
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * N + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, db, mask=col_ok)


@triton.jit
def _norm_bwd_chunked(
    H, W, DY, DH, DX,  # normalized input h, weight, grad of y, grad of the h output, out grad of h
    MEAN, RSTD,  # per-row statistics from the forward
    DW_PART, DB_PART,  # in/out (programs, N) fp32 partial sums, zero-initialized, one row per program
    stride_h, stride_dy, stride_dh, stride_dx,  # row strides in elements
    M, N, rows_per_program,  # rows, features, rows handled by one program
    BLOCK_N: tl.constexpr,  # chunk length
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    for row in range(row_start, tl.minimum(row_start + rows_per_program, M)):
        rstd = tl.load(RSTD + row)
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(MEAN + row)
        c1 = 0.0
        c2 = 0.0
        for start in range(0, N, BLOCK_N):  # pass 1: the row sums the gradient needs
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            wdy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32) * \
                tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            c1 += tl.sum((h - mean) * rstd * wdy, axis=0)
            c2 += tl.sum(wdy, axis=0)
        c1 = c1 / N
        if IS_RMS:
            c2 = 0.0
        else:
            c2 = c2 / N
        for start in range(0, N, BLOCK_N):  # pass 2: dx, and dw/db into this program's partials
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            xhat = (tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            dx = (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            part = pid * N + cols
            tl.store(DW_PART + part, tl.load(DW_PART + part, mask=mask) + dy * xhat, mask=mask)
            if HAS_BIAS:
                tl.store(DB_PART + part, tl.load(DB_PART + part, mask=mask) + dy, mask=mask)


# ----------------------------------------------------------------------------- host launchers
@dataclasses.dataclass(frozen=True)
class _LaunchConfig:
    block_m: int  # rows per program step (1 for chunked)
    block_n: int  # whole-row block, or chunk length when chunked
    num_warps: int
    chunked: bool


def _launch_config(N: int, backward: bool = False) -> _LaunchConfig:
    """The one place that picks block sizes and warps, for forward, backward and compile_specs.
    The backward holds more values per element (h, dy, w, xhat, dw/db accumulators), so it switches
    to the chunked kernel earlier: its 8192-wide block spills on sm_90 even with 16 warps."""
    if N > (MAX_FUSED_N_BWD if backward else MAX_FUSED_N):
        return _LaunchConfig(1, CHUNK_N, 16, True)
    block_n = max(triton.next_power_of_2(N), 128)
    block_m = max(MIN_TILE // block_n, 1)
    return _LaunchConfig(block_m, block_n, min(max(block_m * block_n // 256, 4), 16), False)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every buffer a kernel writes in full (tests swap it for a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """2-D (rows, N) view with a contiguous last dim (copies only when it has to)."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _program_slots(device: torch.device) -> int:
    """Backward programs: enough to fill the GPU a few times over (each writes one dW/dB partial row)."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _norm_forward(x2, w, b, r2, eps, is_rms):
    """x2, r2: (M, N) with contiguous last dim. Returns y (M, N), h (M, N) or None, mean, rstd."""
    M, N = x2.shape
    y = _empty((M, N), x2.dtype, x2.device)
    h = _empty((M, N), x2.dtype, x2.device) if r2 is not None else None
    mean = _empty((M if not is_rms else 0,), torch.float32, x2.device)
    rstd = _empty((M,), torch.float32, x2.device)
    if M == 0:
        return y, h, mean, rstd
    cfg = _launch_config(N)
    w = w.contiguous()
    # absent optional tensors: pass any valid pointer; the constexpr flags keep the kernel off it
    r_, h_ = (r2, h) if r2 is not None else (x2, y)
    b_ = b.contiguous() if b is not None else w
    common = dict(IS_RMS=is_rms, HAS_BIAS=b is not None, HAS_RESIDUAL=r2 is not None, num_warps=cfg.num_warps)
    args = (x2, r_, w, b_, y, h_, rstd if is_rms else mean, rstd, x2.stride(0), r_.stride(0), y.stride(0), h_.stride(0))
    if cfg.chunked:
        _norm_fwd_chunked[(M,)](*args, N, eps, BLOCK_N=cfg.block_n, **common)
    else:
        _norm_fwd[(triton.cdiv(M, cfg.block_m),)](*args, M, N, eps, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                                     **common)
    return y, h, mean, rstd


def _norm_backward(dy2, dh2, h2, w, mean, rstd, has_bias, is_rms):
    """dy2, dh2 (or None), h2: (M, N). Returns dx (M, N) in h's dtype, dw fp32 (N,), db fp32 (N,) or None."""
    M, N = h2.shape
    cfg = _launch_config(N, backward=True)
    programs = max(min(triton.cdiv(M, cfg.block_m), _program_slots(h2.device)), 1)
    rows_per_program = max(triton.cdiv(triton.cdiv(M, programs), cfg.block_m), 1) * cfg.block_m
    programs = max(triton.cdiv(M, rows_per_program), 1)
    dx = _empty((M, N), h2.dtype, h2.device)
    dw_part = _empty((programs, N), torch.float32, h2.device)
    db_part = _empty((programs, N), torch.float32, h2.device) if has_bias else dw_part
    if cfg.chunked or M == 0:  # the chunked kernel adds into its partial row
        dw_part.zero_()
        db_part.zero_()
    if M > 0:
        dh_ = dh2 if dh2 is not None else dy2
        args = (h2, w.contiguous(), dy2, dh_, dx, rstd if is_rms else mean, rstd, dw_part, db_part,
                h2.stride(0), dy2.stride(0), dh_.stride(0), dx.stride(0), M, N, rows_per_program)
        common = dict(IS_RMS=is_rms, HAS_BIAS=has_bias, HAS_DH=dh2 is not None, num_warps=cfg.num_warps)
        if cfg.chunked:
            _norm_bwd_chunked[(programs,)](*args, BLOCK_N=cfg.block_n, **common)
        else:
            _norm_bwd[(programs,)](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common)
    return dx, dw_part.sum(0), (db_part.sum(0) if has_bias else None)


# ----------------------------------------------------------------------------- public API
def _validate(x, weight, bias, residual, eps):
    check_tensor("x", x, min_ndim=1)
    N = x.shape[-1]
    if not 1 <= N <= MAX_N:
        raise ValueError(f"x's last dimension must be between 1 and {MAX_N}, got {N}")
    check_tensor("weight", weight, shape=(N,), like=("x", x))
    if bias is not None:
        check_tensor("bias", bias, shape=(N,), like=("x", x))
    if residual is not None:
        check_tensor("residual", residual, shape=x.shape, like=("x", x))
    return check_positive_float("eps", eps)


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dim of x (..., N), statistics in fp32, output in x's dtype.

    With `residual` (same shape as x), returns (layer_norm(h), h) for h = x + residual, fused in one
    pass; gradients flow into x, residual, weight, bias, and from both outputs.
    """
    eps = _validate(x, weight, bias, residual, eps)
    if not torch.compiler.is_compiling() and not use_triton(x):
        return layer_norm_ref(x, weight, bias, eps, residual)  # eager CPU: plain torch, no op dispatch
    return ops.norm(x, weight, bias, residual, eps, is_rms=False)  # custom op (ops.py): autograd, compile


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm (Llama's) over the last dim of x (..., N), statistics in fp32, output in x's dtype.

    With `residual`, returns (rms_norm(h), h) for h = x + residual, fused in one pass.
    """
    eps = _validate(x, weight, None, residual, eps)
    if not torch.compiler.is_compiling() and not use_triton(x):
        return rms_norm_ref(x, weight, eps, residual)  # eager CPU: plain torch, no op dispatch
    return ops.norm(x, weight, None, residual, eps, is_rms=True)  # custom op (ops.py): autograd, compile


def _check_hidden_size(hidden_size):
    if not isinstance(hidden_size, int) or not 1 <= hidden_size <= MAX_N:
        raise ValueError(f"hidden_size must be an int between 1 and {MAX_N}, got {hidden_size!r}")


class LayerNorm(torch.nn.Module):
    """Drop-in for torch.nn.LayerNorm over the last dim (same state dict: weight, bias if bias=True)."""

    def __init__(self, hidden_size, eps=1e-5, bias=True, device=None, dtype=None):
        super().__init__()
        _check_hidden_size(hidden_size)
        self.hidden_size, self.eps = hidden_size, check_positive_float("eps", eps)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x, residual=None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(torch.nn.Module):
    """Llama-style RMSNorm (state dict: weight only)."""

    def __init__(self, hidden_size, eps=1e-6, device=None, dtype=None):
        super().__init__()
        _check_hidden_size(hidden_size)
        self.hidden_size, self.eps = hidden_size, check_positive_float("eps", eps)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}"


# ----------------------------------------------------------------------------- ahead-of-time compile specs
def _spec(fn, dtype, cfg: _LaunchConfig, flags: dict):
    from fastlm.kernels.compile_check import KernelSpec

    constexprs = dict(flags, BLOCK_N=cfg.block_n)
    if not cfg.chunked:
        constexprs["BLOCK_M"] = cfg.block_m
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("MEAN", "RSTD", "DW_PART", "DB_PART"):
            signature[arg] = "*fp32"
        elif arg.isupper() and arg not in ("M", "N"):  # uppercase names are pointers
            signature[arg] = triton_dtype_name(dtype)
        else:
            signature[arg] = "fp32" if arg == "eps" else "i32"
    kind = "rms" if flags["IS_RMS"] else "ln"
    label = f"{fn.__name__}[{kind},BLOCK={cfg.block_m}x{cfg.block_n},w{cfg.num_warps},{str(dtype)[6:]}]"
    return KernelSpec(label, fn, signature, constexprs, num_warps=cfg.num_warps)


def compile_specs():
    """Every (kernel, block/warps bucket) the launchers use, in its heaviest flag set (LayerNorm with
    bias, residual / incoming dh) in fp16; plus RMSNorm and bf16 / fp32 on the largest buckets."""
    register_sizes = [128 * 2**i for i in range(7)]  # one N per register bucket: 128 .. 8192
    chunked = MAX_FUSED_N + 1
    cases = [(n, torch.float16, False) for n in register_sizes + [chunked]] + [
        (MAX_FUSED_N_BWD, torch.bfloat16, True), (MAX_FUSED_N, torch.bfloat16, True), (chunked, torch.bfloat16, True),
        (MAX_FUSED_N_BWD, torch.float32, False), (MAX_FUSED_N, torch.float32, False), (chunked, torch.float32, False)]
    specs, seen = [], set()
    for n, dtype, is_rms in cases:
        flags = dict(IS_RMS=is_rms, HAS_BIAS=not is_rms)
        for backward in (False, True):
            cfg = _launch_config(n, backward)
            fn = [[_norm_fwd, _norm_fwd_chunked], [_norm_bwd, _norm_bwd_chunked]][backward][cfg.chunked]
            spec = _spec(fn, dtype, cfg, dict(flags, **({"HAS_DH": True} if backward else {"HAS_RESIDUAL": True})))
            if spec.name not in seen:
                seen.add(spec.name)
                specs.append(spec)
    return specs
