"""Attention: flash-attention prefill (forward + backward) and split-KV decode attention.

    out[b, i, h] = softmax(scale * q[b, i, h] . k[b, :, h // G]^T + mask) @ v[b, :, h // G]

Shapes (flash-attn's layout): q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), Hq a multiple of Hkv
(G = Hq // Hkv: GQA / MQA, K/V are read in place, never copied per query head).
Head dims up to 256 (any D; non-powers of two such as 80 and 96 are padded to the next power of two
with masks); any Sq, Sk >= 1; fp32, fp16, bf16 (fp32 statistics and accumulation throughout).
Causal masks align bottom-right: query i sits at position Sk - Sq + i and sees keys j <= Sk - Sq + i
(prefill of new tokens after a cached prefix). With Sq > Sk the first Sq - Sk queries see no key:
their output is defined as 0 (and their gradient as 0).

- flash_attention: online softmax in the log2 domain; backward saving the LSE (see _flash.py).
- decode_attention: q (B, Sq <= MAX_DECODE_QUERIES, Hq, D), caches (B, S_max, Hkv, D), cache_seqlens (B,)
  int32 counting the valid entries including the Sq new tokens; query s at position L_b - Sq + s.
  Split-KV (flash-decoding) with an LSE combine kernel (see _decode.py).

This file, top to bottom: the PyTorch references (the CPU path: SDPA with an explicit mask where needed;
the materialized-softmax backward), the custom ops with their fakes and autograd, the public functions.
    fastlm::flash_attn_fwd(q, k, v, causal, scale) -> (o, lse)
    fastlm::flash_attn_bwd(do, q, k, v, o, lse, causal, scale) -> (dq, dk, dv)
    fastlm::decode_attn(q, k_cache, v_cache, cache_seqlens, scale) -> o
Each op runs the Triton launcher when use_triton(q) (fastlm.kernels._utils: the dispatch rule), else the
reference; its reference forward returns a zero lse (the reference backward recomputes the softmax).
decode_attn's gradient is the reference formula on every device (decoding has no backward kernel).
The public functions validate their arguments and call the ops on the Triton path and whenever
torch.compile traces them; eager CPU calls the references directly (eager_reference: no op dispatch).
References: Dao et al., FlashAttention-2 (2023); Triton's fused-attention tutorial; flash-decoding.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from fastlm.kernels._decode import launch_decode
from fastlm.kernels._flash import launch_flash_bwd, launch_flash_fwd
from fastlm.kernels._utils import check_tensor, eager_reference, use_triton

MAX_HEAD_DIM = 256
MAX_DECODE_QUERIES = 8  # new tokens per sequence decode_attention takes (decode steps, speculation)


# ---------------------------------------------------------------------------------------------------
# PyTorch references


def attention_ref(q, k, v, causal=True, softmax_scale=None, q_positions=None, k_lengths=None):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D). Materialized softmax in fp32.
    Causal masks align bottom-right: query i sits at position Sk - Sq + i, unless q_positions (B, Sq)
    gives the positions; k_lengths (B,) masks keys >= the length. Rows with no visible key give 0."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().transpose(1, 2)  # (B, Hq, Sq, D)
    kf = k.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Sk, D)
    vf = v.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    visible = _visible_keys(B, Sq, Sk, causal, q_positions, k_lengths, q.device)  # (B, 1, Sq, Sk)
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    o = p @ vf  # (B, Hq, Sq, D)
    return o.transpose(1, 2).to(q.dtype)


def _visible_keys(B, Sq, Sk, causal, q_positions=None, k_lengths=None, device=None):
    """Boolean (B, 1, Sq, Sk): which keys each query sees."""
    cols = torch.arange(Sk, device=device)
    visible = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        if q_positions is None:
            q_positions = torch.arange(Sq, device=device) + (Sk - Sq)
        q_positions = q_positions.reshape(-1, 1, Sq, 1)
        visible = visible & (cols <= q_positions)
    if k_lengths is not None:
        visible = visible & (cols < k_lengths.reshape(B, 1, 1, 1))
    return visible


def _sdpa(q, k, v, visible, scale):
    """torch SDPA on (B, S, H, D) tensors with a boolean mask; GQA without copying K/V."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=visible, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    o = o.transpose(1, 2)  # (B, Sq, Hq, D)
    return o.masked_fill(~visible.any(-1).transpose(1, 2).unsqueeze(-1), 0.0)  # fully masked rows -> 0


def _flash_ref(q, k, v, causal, scale):
    Sq, Sk = q.shape[1], k.shape[1]
    if causal and Sq not in (1, Sk):  # bottom-right alignment needs an explicit mask
        return _sdpa(q, k, v, _visible_keys(1, Sq, Sk, True, device=q.device), scale)
    # Sq == 1 sees every key; Sq == Sk is SDPA's own (top-left) causal mask: its fused kernels
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal and Sq > 1, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _decode_ref(q, k_cache, v_cache, cache_seqlens, scale):
    if q.device.type == "cpu" and q.dtype != torch.float32:  # CPU SDPA is ~6x slower in bf16 at decode sizes
        n = int(cache_seqlens.max())
        return _decode_ref(q.float(), k_cache[:, :n].float(), v_cache[:, :n].float(), cache_seqlens, scale).to(q.dtype)
    lengths = cache_seqlens.to(device=q.device, dtype=torch.long)
    if q.device.type == "cpu" and bool((lengths == lengths[0]).all()):  # one length: no mask tensor
        n = int(lengths[0])
        return _flash_ref(q, k_cache[:, :n], v_cache[:, :n], True, scale)
    s_used = int(lengths.max()) if q.device.type == "cpu" else k_cache.shape[1]  # no sync on GPU
    return _sdpa(q, k_cache[:, :s_used], v_cache[:, :s_used], _decode_visible(q, lengths, s_used), scale)


def _decode_visible(q, lengths, n_keys):
    """Boolean (B, 1, Sq, n_keys): query s of row b sits at lengths[b] - Sq + s and sees the keys up to it."""
    Sq = q.shape[1]
    positions = lengths[:, None] - Sq + torch.arange(Sq, device=q.device)  # (B, Sq)
    return _visible_keys(q.shape[0], Sq, n_keys, True, positions, lengths, q.device)


def _attention_bwd_ref(do, q, k, v, visible, scale):
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


# ---------------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees (one opaque op per launcher, a fake for shapes, an autograd formula)


@custom_op("fastlm::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """o (B, Sq, Hq, D); lse (B, Hq, Sq) fp32, zero on the reference path."""
    if use_triton(q):
        return launch_flash_fwd(q, k, v, causal, scale)
    o = _flash_ref(q, k, v, causal, scale).contiguous()  # a fresh tensor, laid out as the fake's
    return o, q.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale):
    B, Sq, Hq, D = q.shape
    return q.new_empty(B, Sq, Hq, D), q.new_empty(B, Hq, Sq, dtype=torch.float32)


@custom_op("fastlm::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (GQA: dk, dv summed over each key head's group), in the inputs' dtypes."""
    if use_triton(q):
        return launch_flash_bwd(do, q, k, v, o, lse, causal, scale)
    return _attention_bwd_ref(do, q, k, v, _visible_keys(1, q.shape[1], k.shape[1], causal, device=q.device), scale)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attn_fwd_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _flash_attn_fwd_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_flash_attn_fwd_grad, setup_context=_flash_attn_fwd_setup_context)


@custom_op("fastlm::decode_attn", mutates_args=())
def decode_attn(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    """o (B, Sq, Hq, D): q's Sq new tokens over the first cache_seqlens[b] cache entries."""
    if use_triton(q):
        return launch_decode(q, k_cache, v_cache, cache_seqlens, scale)
    return _decode_ref(q, k_cache, v_cache, cache_seqlens, scale).contiguous()


@decode_attn.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return q.new_empty(q.shape)


def _decode_attn_setup_context(ctx, inputs, output):
    q, k_cache, v_cache, cache_seqlens, scale = inputs
    ctx.save_for_backward(q, k_cache, v_cache, cache_seqlens)
    ctx.scale = scale


def _decode_attn_grad(ctx, do):
    """No backward kernel: the reference formula over the whole cache with the decode mask."""
    q, k_cache, v_cache, cache_seqlens = ctx.saved_tensors
    visible = _decode_visible(q, cache_seqlens.to(torch.long), k_cache.shape[1])
    dq, dk, dv = _attention_bwd_ref(do, q, k_cache, v_cache, visible, ctx.scale)
    return dq, dk, dv, None, None


decode_attn.register_autograd(_decode_attn_grad, setup_context=_decode_attn_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions (argument checks first)


def _check_qkv(q, k, v, q_name="q", k_name="k", v_name="v", max_sq=None):
    check_tensor(q_name, q, ndim=4)
    check_tensor(k_name, k, ndim=4, like=(q_name, q))
    check_tensor(v_name, v, ndim=4, like=(q_name, q))
    B, Sq, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{v_name} must have the shape of {k_name} {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"{k_name} must have batch size {B} like {q_name}, got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{k_name} must have head dim {D} like {q_name}, got {k.shape[3]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{q_name} head dim must be in 1..{MAX_HEAD_DIM}, got {D}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{q_name} heads ({Hq}) must be a multiple of {k_name} heads ({Hkv})")
    if B == 0 or Sq == 0 or k.shape[1] == 0:
        raise ValueError(f"{q_name}, {k_name} must have batch and sequence sizes >= 1, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if max_sq is not None and Sq > max_sq:
        raise ValueError(f"{q_name} must have at most {max_sq} queries per sequence, got {Sq}")


def _resolve_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return float(softmax_scale)


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    """Attention over full sequences (prefill / training): q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D)
    -> (B, Sq, Hq, D). causal masks align bottom-right; softmax_scale defaults to 1/sqrt(D).
    Differentiable in q, k, v."""
    _check_qkv(q, k, v)
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if eager_reference(q):
        return _flash_ref(q, k, v, bool(causal), scale)
    return flash_attn_fwd(q, k, v, bool(causal), scale)[0]


def _check_seqlens(cache_seqlens, q, S_max):
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), shape=(q.shape[0],))
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on the same device as q ({q.device}), got {cache_seqlens.device}")
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # reading values would sync; the kernel clamps lengths to S_max
    bad = (cache_seqlens < q.shape[1]) | (cache_seqlens > S_max)
    if bool(bad.any()):
        raise ValueError(f"cache_seqlens must be in [Sq={q.shape[1]}, S_max={S_max}] (the new tokens are "
                         f"counted), got {cache_seqlens.tolist()}")


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None):
    """Attention of a few new tokens per sequence over a KV cache: q (B, Sq <= 8, Hq, D), caches
    (B, S_max, Hkv, D), cache_seqlens (B,) int32 valid entries per sequence including the Sq new
    tokens (0 < length <= S_max). Query s sits at position cache_seqlens[b] - Sq + s -> (B, Sq, Hq, D)."""
    _check_qkv(q, k_cache, v_cache, "q", "k_cache", "v_cache", max_sq=MAX_DECODE_QUERIES)
    _check_seqlens(cache_seqlens, q, k_cache.shape[1])
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if eager_reference(q):
        return _decode_ref(q, k_cache, v_cache, cache_seqlens, scale)
    return decode_attn(q, k_cache, v_cache, cache_seqlens, scale)
