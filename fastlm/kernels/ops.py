"""fastlm's kernels as PyTorch custom operators (torch.library.custom_op), so code calling them compiles
with torch.compile(fullgraph=True) and no graph break: the compiler sees one opaque op per launcher, a
fake (meta) implementation giving output shapes and dtypes, and an autograd formula that calls the
backward op.

    fastlm::norm_fwd(x, weight, bias?, residual?, eps, is_rms) -> (y, h, mean, rstd)
    fastlm::norm_bwd(dy, dh?, h, weight, mean, rstd, eps, has_bias, is_rms) -> (dx, dweight, dbias)
    fastlm::flash_attn_fwd(q, k, v, causal, scale) -> (o, lse)
    fastlm::flash_attn_bwd(do, q, k, v, o, lse, causal, scale) -> (dq, dk, dv)
    fastlm::decode_attn(q, k_cache, v_cache, cache_seqlens, scale) -> o

Custom-op outputs may not be None nor alias an input, so absent outputs are empty tensors: h is (0,)
without a residual (h would be x itself), mean is (0,) for RMSNorm, dbias is (0,) without a bias.

Each op dispatches by the house rule at run time (inside the op, where the compiler does not look):
Triton launchers for CUDA tensors or under TRITON_INTERPRET=1, else the PyTorch reference. The
reference forwards return zeros for the statistics the kernels save (mean, rstd, lse), with the same
shapes: their backwards recompute what they need (norms: the row statistics from h; attention: the
materialized softmax). decode_attn's gradient is that attention formula on every device (decoding has
no backward kernel).

The public functions (fastlm.kernels.layer_norm, rms_norm, flash_attention, decode_attention) validate
their arguments, then call `norm`, `flash_attn` and `decode_attn` below on the Triton path and whenever
torch.compile traces them; eager CPU calls the references directly (plain torch: autograd is torch's,
and the op dispatch, ~15-20 us a call, would show in a CPU decode step). This module imports the kernel
files only inside the op bodies, so they can import it without a cycle.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from fastlm.kernels._utils import use_triton


# ------------------------------------------------------------------------------------------------ norms

@custom_op("fastlm::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
             is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = norm(h) for h = x (+ residual); mean, rstd: fp32 per row (mean empty for RMSNorm)."""
    from fastlm.kernels import norms

    N = x.shape[-1]
    if use_triton(x):
        r2 = None if residual is None else norms._rows(residual, N)
        y, h, mean, rstd = norms._norm_forward(norms._rows(x, N), weight, bias, r2, eps, is_rms)
    else:
        y, h, mean, rstd = _norm_forward_ref(x, weight, bias, residual, eps, is_rms)
    h = h.reshape(x.shape) if h is not None else x.new_empty(0)
    return y.reshape(x.shape), h, mean, rstd


@norm_fwd.register_fake
def _(x, weight, bias, residual, eps, is_rms):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else M, dtype=torch.float32)
    return x.new_empty(x.shape), h, mean, x.new_empty(M, dtype=torch.float32)


def _norm_forward_ref(x, weight, bias, residual, eps, is_rms):
    """The reference (fastlm.kernels.norms' *_ref). Its statistics are zeros of the kernels' shapes: the
    reference backward recomputes them (cheaper here, on the CPU decode path, than saving them)."""
    from fastlm.kernels import norms

    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out = norms.rms_norm_ref(x, weight, eps, residual) if is_rms else norms.layer_norm_ref(x, weight, bias, eps, residual)
    y, h = out if residual is not None else (out, None)
    return y, h, x.new_zeros(0 if is_rms else M, dtype=torch.float32), x.new_zeros(M, dtype=torch.float32)


@custom_op("fastlm::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
             eps: float, has_bias: bool, is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of norm_fwd: dx (= dresidual) in h's dtype, dweight and dbias in weight's dtype."""
    from fastlm.kernels import norms

    N = h.shape[-1]
    dy = dy.to(h.dtype)
    dh = None if dh is None else dh.to(h.dtype)
    if use_triton(h):
        dh2 = None if dh is None else norms._rows(dh, N)
        dx, dw, db = norms._norm_backward(norms._rows(dy, N), dh2, norms._rows(h, N), weight, mean, rstd,
                                          has_bias, is_rms)
    else:
        dx, dw, db = _norm_backward_ref(dy, dh, h, weight, eps, has_bias, is_rms)
    db = db.to(weight.dtype) if has_bias else weight.new_empty(0)
    return dx.reshape(h.shape), dw.to(weight.dtype), db


@norm_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, eps, has_bias, is_rms):
    return h.new_empty(h.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else 0)


def _norm_backward_ref(dy, dh, h, weight, eps, has_bias, is_rms):
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
    return dx.to(h.dtype), (dyf * xhat).sum(0), (dyf.sum(0) if has_bias else None)


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.eps, ctx.is_rms = eps, is_rms
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw, db = norm_bwd(dy, dh if ctx.has_residual else None, h, weight, mean, rstd, ctx.eps, ctx.has_bias,
                          ctx.is_rms)
    return dx, dw, (db if ctx.has_bias else None), (dx if ctx.has_residual else None), None, None


norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def norm(x, weight, bias, residual, eps, is_rms):
    """y, or (y, h) with a residual: what layer_norm / rms_norm return (arguments already validated)."""
    y, h, _, _ = norm_fwd(x, weight, bias, residual, eps, is_rms)
    return y if residual is None else (y, h)


# -------------------------------------------------------------------------------------------- attention

@custom_op("fastlm::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """o (B, Sq, Hq, D); lse (B, Hq, Sq) fp32, zero on the reference path."""
    from fastlm.kernels import attention

    if use_triton(q):
        return attention._flash_fwd(q, k, v, causal, scale)
    o = attention._flash_torch(q, k, v, causal, scale).contiguous()  # a fresh tensor, laid out as the fake's
    return o, q.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale):
    B, Sq, Hq, D = q.shape
    return q.new_empty(B, Sq, Hq, D), q.new_empty(B, Hq, Sq, dtype=torch.float32)


@custom_op("fastlm::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (GQA: dk, dv summed over each key head's group), in the inputs' dtypes."""
    from fastlm.kernels import attention

    if use_triton(q):
        return attention._flash_bwd(do, q, k, v, o, lse, causal, scale)
    visible = attention._visible_keys(1, q.shape[1], k.shape[1], causal, device=q.device)
    return _attention_backward_ref(do, q, k, v, visible, scale)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_backward_ref(do, q, k, v, visible, scale):
    """Materialized-softmax backward in fp32: dS = P * (dP - rowsum(dO * O)); visible (B|1, 1, Sq, Sk)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf = q.float().transpose(1, 2)  # (B, Hq, Sq, D)
    kf = k.float().transpose(1, 2).repeat_interleave(G, dim=1)  # (B, Hq, Sk, D)
    vf = v.float().transpose(1, 2).repeat_interleave(G, dim=1)
    dof = do.float().transpose(1, 2)  # (B, Hq, Sq, D)
    s = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # (B, Hq, Sq, Sk); rows seeing no key -> 0
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = ((ds.transpose(-1, -2) @ qf) * scale).view(B, Hkv, G, Sk, D).sum(2)  # (B, Hkv, Sk, D)
    dv = (p.transpose(-1, -2) @ dof).view(B, Hkv, G, Sk, D).sum(2)
    return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


def _flash_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _flash_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def flash_attn(q, k, v, causal, scale):
    """o: what flash_attention returns (arguments already validated)."""
    return flash_attn_fwd(q, k, v, causal, scale)[0]


@custom_op("fastlm::decode_attn", mutates_args=())
def decode_attn(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    """o (B, Sq, Hq, D): q's Sq new tokens over the first cache_seqlens[b] cache entries."""
    from fastlm.kernels import attention

    if use_triton(q):
        return attention._decode_triton(q, k_cache, v_cache, cache_seqlens, scale)
    return attention._decode_torch(q, k_cache, v_cache, cache_seqlens, scale).contiguous()


@decode_attn.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return q.new_empty(q.shape)


def _decode_visible(q, k_cache, cache_seqlens):
    from fastlm.kernels import attention

    Sq = q.shape[1]
    lengths = cache_seqlens.to(torch.long)
    positions = lengths[:, None] - Sq + torch.arange(Sq, device=q.device)  # (B, Sq)
    return attention._visible_keys(q.shape[0], Sq, k_cache.shape[1], True, positions, lengths, q.device)


def _decode_setup_context(ctx, inputs, output):
    q, k_cache, v_cache, cache_seqlens, scale = inputs
    ctx.save_for_backward(q, k_cache, v_cache, cache_seqlens)
    ctx.scale = scale


def _decode_backward(ctx, do):
    """No backward kernel: the reference formula over the whole cache with the decode mask."""
    q, k_cache, v_cache, cache_seqlens = ctx.saved_tensors
    visible = _decode_visible(q, k_cache, cache_seqlens)
    dq, dk, dv = _attention_backward_ref(do, q, k_cache, v_cache, visible, ctx.scale)
    return dq, dk, dv, None, None


decode_attn.register_autograd(_decode_backward, setup_context=_decode_setup_context)
