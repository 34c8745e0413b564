"""Attention (placeholder: reference only; Triton flash/decode kernels pending)."""
import math

import torch


def attention_ref(q, k, v, causal=True, softmax_scale=None, q_positions=None, k_lengths=None):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D). Materialized softmax in fp32.
    Causal masks align bottom-right: query i sits at position Sk - Sq + i."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().transpose(1, 2)  # (B, Hq, Sq, D)
    kf = k.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Sk, D)
    vf = v.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if causal:
        qpos = torch.arange(Sq, device=q.device) + (Sk - Sq)
        mask = torch.arange(Sk, device=q.device)[None, :] > qpos[:, None]
        s = s.masked_fill(mask, float("-inf"))
    o = torch.softmax(s, dim=-1) @ vf  # (B, Hq, Sq, D)
    return o.transpose(1, 2).to(q.dtype)


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    return attention_ref(q, k, v, causal, softmax_scale)


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None):
    outs = []
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        outs.append(attention_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], True, softmax_scale))
    return torch.cat(outs)


def compile_specs():
    return []
