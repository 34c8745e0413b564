"""LayerNorm and RMSNorm with a fused residual add: layer_norm, rms_norm and the modules.

    LayerNorm: y = (h - mean(h)) / sqrt(var(h) + eps) * w + b,   RMSNorm: y = h / sqrt(mean(h^2) + eps) * w
over the last dim, statistics in fp32 whatever the input dtype, output in x's dtype. With `residual`
the functions return (y, h) for h = x + residual (rounded to x's dtype): the pre-norm block's add-and-norm
in one pass, each input read once and each output written once.
Shapes/dtypes: x (..., N) with 1 <= N <= MAX_N, fp32/fp16/bf16; weight/bias (N,), residual like x, all of
x's dtype and device. The kernels, their math and limits: _norm.py.

This file, top to bottom: the PyTorch references (the CPU path), the custom ops with their fakes and
autograd, the public functions, the nn.Modules.
    fastlm::norm_fwd(x, weight, bias?, residual?, eps, is_rms) -> (y, h, mean, rstd)
    fastlm::norm_bwd(dy, dh?, h, weight, mean, rstd, eps, has_bias, is_rms) -> (dx, dweight, dbias)
Custom-op outputs may not be None nor alias an input, so absent outputs are empty tensors: h is (0,)
without a residual (h would be x itself), mean is (0,) for RMSNorm, dbias is (0,) without a bias.
Each op runs the Triton launcher when use_triton(x) (fastlm.kernels._utils: the dispatch rule), else the
reference; the reference forward returns zeros for the statistics (the reference backward recomputes
them from h: cheaper, on the CPU decode path, than saving them). The public functions call the op on the
Triton path only; the CPU calls the references directly, eagerly (no op dispatch, and autograd is
torch's) and under torch.compile, which then fuses them into its own loops instead of calling an opaque
op (on the development AMD EPYC a compiled GPT-2 decode step spent ~20 us in each of its 25 norm ops).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from fastlm.kernels._norm import launch_norm_bwd, launch_norm_fwd
from fastlm.kernels._utils import check_positive_float, check_tensor, use_triton

MAX_N = 65536  # longest supported row


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


def _norm_ref(x, weight, bias, residual, eps, is_rms):
    """y, h (None without a residual): the reference of either norm."""
    out = rms_norm_ref(x, weight, eps, residual) if is_rms else layer_norm_ref(x, weight, bias, eps, residual)
    return out if residual is not None else (out, None)


def _norm_bwd_ref(dy, dh, h, weight, eps, has_bias, is_rms):
    """The kernels' formula in fp32 torch, statistics recomputed from h:
    dh = rstd * (w*dy - xhat*mean(xhat*w*dy) [- mean(w*dy) for LayerNorm]) + the incoming dh."""
    N = h.shape[-1]
    hf, dyf = h.float().reshape(-1, N), dy.float().reshape(-1, N)
    if not is_rms:
        hf = hf - hf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = hf * rstd
    wdy = dyf * weight.float()
    dx = wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)
    if not is_rms:
        dx = dx - wdy.mean(-1, keepdim=True)
    dx = dx * rstd
    if dh is not None:
        dx = dx + dh.float().reshape(-1, N)
    return dx.to(h.dtype).reshape(h.shape), (dyf * xhat).sum(0), (dyf.sum(0) if has_bias else None)


# ----------------------------------------------------------------------------- custom ops
@custom_op("fastlm::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
             is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = norm(h) for h = x (+ residual); mean, rstd: fp32 per row (mean empty for RMSNorm)."""
    if use_triton(x):
        y, h, mean, rstd = launch_norm_fwd(x, weight, bias, residual, eps, is_rms)
    else:
        y, h = _norm_ref(x, weight, bias, residual, eps, is_rms)
        n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        mean, rstd = x.new_zeros(0 if is_rms else n_rows, dtype=torch.float32), x.new_zeros(n_rows, dtype=torch.float32)
    return y, (h if h is not None else x.new_empty(0)), mean, rstd


@norm_fwd.register_fake
def _(x, weight, bias, residual, eps, is_rms):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else n_rows, dtype=torch.float32)
    return x.new_empty(x.shape), h, mean, x.new_empty(n_rows, dtype=torch.float32)


@custom_op("fastlm::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
             eps: float, has_bias: bool, is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of norm_fwd: dx (= dresidual) in h's dtype, dweight and dbias in weight's dtype."""
    dy = dy.to(h.dtype)
    dh = None if dh is None else dh.to(h.dtype)
    if use_triton(h):
        dx, dw, db = launch_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias, is_rms)
    else:
        dx, dw, db = _norm_bwd_ref(dy, dh, h, weight, eps, has_bias, is_rms)
    return dx, dw.to(weight.dtype), (db.to(weight.dtype) if has_bias else weight.new_empty(0))


@norm_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, eps, has_bias, is_rms):
    return h.new_empty(h.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else 0)


def _norm_fwd_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.eps, ctx.is_rms = eps, is_rms
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _norm_fwd_grad(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw, db = norm_bwd(dy, dh if ctx.has_residual else None, h, weight, mean, rstd, ctx.eps, ctx.has_bias,
                          ctx.is_rms)
    return dx, dw, (db if ctx.has_bias else None), (dx if ctx.has_residual else None), None, None


norm_fwd.register_autograd(_norm_fwd_grad, setup_context=_norm_fwd_setup_context)


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
    if not use_triton(x):  # CPU: plain torch, eager (no op dispatch) or traced (fused by the compiler)
        return layer_norm_ref(x, weight, bias, eps, residual)
    y, h, _, _ = norm_fwd(x, weight, bias, residual, eps, False)
    return y if residual is None else (y, h)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm (Llama's) over the last dim of x (..., N), statistics in fp32, output in x's dtype.

    With `residual`, returns (rms_norm(h), h) for h = x + residual, fused in one pass.
    """
    eps = _validate(x, weight, None, residual, eps)
    if not use_triton(x):  # CPU: plain torch, eager (no op dispatch) or traced (fused by the compiler)
        return rms_norm_ref(x, weight, eps, residual)
    y, h, _, _ = norm_fwd(x, weight, None, residual, eps, True)
    return y if residual is None else (y, h)


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
