"""Attention: flash-attention prefill (forward + backward) and split-KV decode attention.

    out[b, i, h] = softmax(scale * q[b, i, h] . k[b, :, h // G]^T + mask) @ v[b, :, h // G]

Shapes (flash-attn's layout): q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), Hq a multiple of Hkv
(G = Hq // Hkv: GQA / MQA, K/V are read in place, never copied per query head).
Head dims up to 256 (any D; non-powers of two such as 80 and 96 are padded to the next power of two
with masks); any Sq, Sk >= 1; fp32, fp16, bf16 (fp32 statistics and accumulation throughout).
Causal masks align bottom-right: query i sits at position Sk - Sq + i and sees keys j <= Sk - Sq + i
(prefill of new tokens after a cached prefix). With Sq > Sk the first Sq - Sk queries see no key:
their output is defined as 0 (and their gradient as 0).

- flash_attention: online softmax in the log2 domain (exp2, log2(e) folded into the scale); backward
  (custom op fastlm::flash_attn_bwd) saving the LSE (delta = rowsum(dO * O); a dK/dV kernel over query
  blocks that sums the GQA group in registers; a dQ kernel).
- decode_attention: q (B, Sq <= 8, Hq, D), caches (B, S_max, Hkv, D), cache_seqlens (B,) int32 counting
  the valid entries including the Sq new tokens; query s at position L_b - Sq + s. Split-KV
  (flash-decoding) with an LSE combine kernel; see _decode.py.

Dispatch (fastlm.kernels._utils.use_triton): CUDA -> Triton; CPU -> torch (scaled_dot_product_attention
with an explicit mask), or the Triton kernels under TRITON_INTERPRET=1. The Triton path, and every
path under torch.compile, goes through the custom ops of fastlm/kernels/ops.py (no graph breaks).
References: Dao et al., FlashAttention-2 (2023); Triton's fused-attention tutorial; flash-decoding.
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from fastlm.kernels import ops
from fastlm.kernels._decode import _decode_combine, _decode_split
from fastlm.kernels._flash import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd
from fastlm.kernels._utils import check_tensor, triton_dtype_name, use_triton

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_DECODE_QUERIES = 8


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


# ---------------------------------------------------------------------------------------------------
# Validation and the CPU path


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


def _sdpa(q, k, v, visible, scale):
    """torch SDPA on (B, S, H, D) tensors with a boolean mask; GQA without copying K/V."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=visible, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    o = o.transpose(1, 2)  # (B, Sq, Hq, D)
    return o.masked_fill(~visible.any(-1).transpose(1, 2).unsqueeze(-1), 0.0)  # fully masked rows -> 0


def _flash_torch(q, k, v, causal, scale):
    Sq, Sk = q.shape[1], k.shape[1]
    if causal and Sq not in (1, Sk):  # bottom-right alignment needs an explicit mask
        return _sdpa(q, k, v, _visible_keys(1, Sq, Sk, True, device=q.device), scale)
    # Sq == 1 sees every key; Sq == Sk is SDPA's own (top-left) causal mask: its fused kernels
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal and Sq > 1, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _decode_torch(q, k_cache, v_cache, cache_seqlens, scale):
    if q.device.type == "cpu" and q.dtype != torch.float32:  # CPU SDPA is ~6x slower in bf16 at decode sizes
        n = int(cache_seqlens.max())
        return _decode_torch(q.float(), k_cache[:, :n].float(), v_cache[:, :n].float(), cache_seqlens, scale).to(q.dtype)
    Sq = q.shape[1]
    lengths = cache_seqlens.to(device=q.device, dtype=torch.long)
    if q.device.type == "cpu" and bool((lengths == lengths[0]).all()):  # one length: no mask tensor
        n = int(lengths[0])
        return _flash_torch(q, k_cache[:, :n], v_cache[:, :n], True, scale)
    s_used = int(lengths.max()) if q.device.type == "cpu" else k_cache.shape[1]  # no sync on GPU
    positions = lengths[:, None] - Sq + torch.arange(Sq, device=q.device)  # (B, Sq)
    visible = _visible_keys(q.shape[0], Sq, s_used, True, positions, lengths, q.device)
    return _sdpa(q, k_cache[:, :s_used], v_cache[:, :s_used], visible, scale)


# ---------------------------------------------------------------------------------------------------
# Launch configuration: one helper per kernel family, used by the launchers and by compile_specs()


def _block_d(head_dim):
    return max(16, 1 << (head_dim - 1).bit_length())


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32


def flash_fwd_config(head_dim, dtype, arch=80):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel: the largest tiles that
    compile without register spills (see compile_specs). sm_80's mma keeps whole K/V tiles as
    register fragments, so it takes BLOCK_N = 32 at D = 128; sm_90's wgmma reads them from shared memory."""
    block_d = _block_d(head_dim)
    if dtype == torch.float32:  # no tensor cores (IEEE fp32): small tiles
        return (16, 32, 4, 1) if block_d <= 128 else (16, 16, 4, 1)
    if block_d <= 64:
        return (128, 128, 8, 3) if arch >= 90 else (128, 64, 8, 3)
    if block_d <= 128:
        return (128, 64, 8, 3) if arch >= 90 else (128, 32, 8, 3)
    return (128, 32, 8, 2) if arch >= 90 else (64, 32, 8, 2)


def flash_bwd_config(head_dim, dtype, kernel):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward `kernel` ("dkdv" or "dq").
    dK/dV keeps four (BLOCK_N, D) tiles live (k, v, dk, dv), so its tiles are smaller."""
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        return 16, 16, 4, 1
    if kernel == "dq":
        if block_d <= 64:
            return 64, 64, 4, 2
        return (64, 64, 8, 2) if block_d <= 128 else (32, 32, 4, 1)
    return DKDV_CONFIGS[min(block_d, 256)] if block_d >= 64 else DKDV_CONFIGS[64]


DKDV_CONFIGS = {64: (32, 64, 8, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)}
DELTA_BLOCK_M = 64
DECODE_MAX_ROWS = 64  # query rows (group x Sq) per program; larger groups take several programs
DECODE_MAX_SPLITS = 128


def decode_config(head_dim, dtype, rows):
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) of the split kernel for `rows` = group x Sq."""
    block_h = min(DECODE_MAX_ROWS, max(16, 1 << (rows - 1).bit_length()))
    block_n = 64 if _block_d(head_dim) <= 128 and dtype != torch.float32 else 32
    return block_h, block_n, 4, 3


def decode_splits(batch, n_kv_heads, max_seqlen, block_n, n_sms=132):
    """(n_splits, chunk): enough chunks to give every SM about four programs (latency hiding); depends on shapes only,
    never on the lengths, so a captured CUDA graph stays valid."""
    n_blocks = -(-max_seqlen // block_n)
    want = max(1, -(-4 * n_sms // (batch * n_kv_heads)))
    splits = max(1, min(want, DECODE_MAX_SPLITS, n_blocks))
    chunk = -(-n_blocks // splits) * block_n
    return -(-max_seqlen // chunk), chunk


# ---------------------------------------------------------------------------------------------------
# Host launchers


def _cdiv(a, b):
    return -(-a // b)


def _device_guard(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _cuda_arch(index):
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _arch(device):
    """Compute capability as 80, 90, ...; the interpreter runs the sm_80 configurations."""
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 80


def _sm_count(device):
    """Streaming multiprocessors (an H100's 132 for the interpreter): sizes the split grids."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_fwd(q, k, v, causal, scale):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    o = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = flash_fwd_config(D, q.dtype, _arch(q.device))
    with _device_guard(q):
        _attn_fwd[(B * Hq, _cdiv(Sq, block_m))](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            Hq, Hq // Hkv, Sq, Sk, scale * LOG2E, IS_CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
            HEAD_DIM=D, BLOCK_D=_block_d(D), PREC=_dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal, scale):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    shape = dict(HEAD_DIM=D, BLOCK_D=_block_d(D))
    common = dict(IS_CAUSAL=causal, PREC=_dot_precision(q.dtype), **shape)
    with _device_guard(q):
        _attn_bwd_delta[(B * Hq, _cdiv(Sq, DELTA_BLOCK_M))](o, do, delta, *o.stride()[:3], Hq, Sq,
                                                              BLOCK_M=DELTA_BLOCK_M, num_warps=4, **shape)
        block_m, block_n, warps, stages = flash_bwd_config(D, q.dtype, "dkdv")
        n_split = dkdv_group_splits(B * Hkv * _cdiv(Sk, block_n), Hq // Hkv, _sm_count(q.device))
        if n_split > 1:  # fp32 partial sums over slices of each GQA group, added below
            dk = torch.empty((n_split,) + k.shape, dtype=torch.float32, device=k.device)
            dv = torch.empty_like(dk)
        _attn_bwd_dkdv[(B * Hkv * n_split, _cdiv(Sk, block_n))](
            q, k, v, do, dk, dv, lse, delta, *q.stride()[:3], *k.stride()[:3], dk.stride(0) if n_split > 1 else 0,
            Hkv, Hq // Hkv, Hq // Hkv // n_split, Sq, Sk, scale * LOG2E, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
        if n_split > 1:
            dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
        block_m, block_n, warps, stages = flash_bwd_config(D, q.dtype, "dq")
        _attn_bwd_dq[(B * Hq, _cdiv(Sq, block_m))](
            q, k, v, do, dq, lse, delta, *q.stride()[:3], *k.stride()[:3], Hq, Hq // Hkv, Sq, Sk,
            scale * LOG2E, scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


def dkdv_group_splits(programs, group, n_sms):
    """Split each GQA group over 2, 4, ... dK/dV programs while there are fewer than two per SM."""
    n_split = 1
    while group % (2 * n_split) == 0 and programs * n_split < 2 * n_sms:
        n_split *= 2
    return n_split


def _decode_triton(q, k_cache, v_cache, cache_seqlens, scale):
    B, Sq, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    block_h, block_n, warps, stages = decode_config(D, q.dtype, group * Sq)
    n_sms = _sm_count(q.device)
    n_splits, chunk = decode_splits(B, Hkv, S_max, block_n, n_sms)
    o_part = torch.empty((B, Sq, Hq, n_splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Sq, Hq, n_splits), dtype=torch.float32, device=q.device)
    o = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    with _device_guard(q):
        _decode_split[(B * Hkv, n_splits, _cdiv(group * Sq, block_h))](
            q, k_cache, v_cache, cache_seqlens, o_part, lse_part, *q.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], Hkv, group, Sq, S_max, n_splits, chunk, scale * LOG2E,
            BLOCK_H=block_h, BLOCK_N=block_n, HEAD_DIM=D, BLOCK_D=_block_d(D), PREC=_dot_precision(q.dtype),
            num_warps=warps, num_stages=stages)
        _decode_combine[(B * Sq * Hq,)](o_part, lse_part, o, *o.stride()[:3], Hq, Sq, n_splits,
                                        BLOCK_S=max(2, 1 << (n_splits - 1).bit_length()), HEAD_DIM=D,
                                        BLOCK_D=_block_d(D), num_warps=4)
    return o


# ---------------------------------------------------------------------------------------------------
# Public functions


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    """Attention over full sequences (prefill / training): q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D)
    -> (B, Sq, Hq, D). causal masks align bottom-right; softmax_scale defaults to 1/sqrt(D).
    Differentiable in q, k, v."""
    _check_qkv(q, k, v)
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if not torch.compiler.is_compiling() and not use_triton(q):
        return _flash_torch(q, k, v, bool(causal), scale)  # eager CPU: plain torch, no op dispatch
    return ops.flash_attn(q, k, v, bool(causal), scale)  # custom op (ops.py): autograd, compile


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
    if not torch.compiler.is_compiling() and not use_triton(q):
        return _decode_torch(q, k_cache, v_cache, cache_seqlens, scale)  # eager CPU: no op dispatch
    return ops.decode_attn(q, k_cache, v_cache, cache_seqlens, scale)  # custom op (ops.py): compile


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (fastlm.kernels.compile_check): the configurations the launchers pick


def _spec(name, fn, dtype, constexprs, warps, stages, expect_mma, fp32_outputs=()):
    import inspect

    from fastlm.kernels.compile_check import KernelSpec

    fp32_ptrs = {"LSE", "DELTA", "O_PART", "LSE_PART"} | set(fp32_outputs)
    signature, attrs = {}, {}
    for i, arg in enumerate(inspect.signature(getattr(fn, "fn", fn)).parameters):
        if arg not in constexprs and (arg.isupper() or arg.startswith("stride")):  # as the runtime specializes aligned pointers, strides
            attrs[(i,)] = [["tt.divisibility", 16]]
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "SEQLENS":
            signature[arg] = "*i32"
        elif arg.isupper():
            signature[arg] = "*fp32" if arg in fp32_ptrs else triton_dtype_name(dtype)
        else:
            signature[arg] = "fp32" if arg.endswith("scale") else "i32"
    return KernelSpec(name, fn, signature, constexprs, warps, stages, expect_mma, attrs)


def _flash_specs(head_dim, dtype, causal=True):
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim))
    tag = f"D={head_dim},{str(dtype).replace('torch.', '')}{'' if causal else ',full'}"
    blocks = dict(IS_CAUSAL=causal, PREC=_dot_precision(dtype), **shape)
    configs = {arch: flash_fwd_config(head_dim, dtype, arch) for arch in (80, 90)}
    specs = []
    for config in dict.fromkeys(configs.values()):
        bm, bn, warps, stages = config
        spec = _spec(f"attn_fwd[{tag},{bm}x{bn},w{warps}]", _attn_fwd, dtype, dict(blocks, BLOCK_M=bm, BLOCK_N=bn),
                     warps, stages, True)
        spec.targets = tuple(arch for arch, c in configs.items() if c == config)
        specs.append(spec)
    for name, fn in (("dkdv", _attn_bwd_dkdv), ("dq", _attn_bwd_dq)):
        bm, bn, warps, stages = flash_bwd_config(head_dim, dtype, name)
        specs.append(_spec(f"attn_bwd_{name}[{tag},{bm}x{bn},w{warps}]", fn, dtype,
                           dict(blocks, BLOCK_M=bm, BLOCK_N=bn), warps, stages, True))
    specs.append(_spec(f"attn_bwd_delta[{tag}]", _attn_bwd_delta, dtype, dict(BLOCK_M=DELTA_BLOCK_M, **shape), 4, 3,
                       False))
    return specs


def _dkdv_split_spec(head_dim, dtype):
    """The dK/dV kernel writing fp32 partial sums (GQA group split over programs)."""
    bm, bn, warps, stages = flash_bwd_config(head_dim, dtype, "dkdv")
    constexprs = dict(IS_CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, PREC=_dot_precision(dtype), HEAD_DIM=head_dim,
                      BLOCK_D=_block_d(head_dim))
    return _spec(f"attn_bwd_dkdv[D={head_dim},{str(dtype).replace('torch.', '')},{bm}x{bn},w{warps},split]",
                 _attn_bwd_dkdv, dtype, constexprs, warps, stages, True, fp32_outputs=("DK", "DV"))


def _decode_specs(head_dim, dtype, rows):
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim))
    tag = f"D={head_dim},{str(dtype).replace('torch.', '')}"
    bh, bn, warps, stages = decode_config(head_dim, dtype, rows)
    blocks = dict(BLOCK_H=bh, BLOCK_N=bn, PREC=_dot_precision(dtype), **shape)
    return [_spec(f"decode_split[{tag},{bh}x{bn}]", _decode_split, dtype, blocks, warps, stages, True),
            _spec(f"decode_combine[{tag}]", _decode_combine, dtype, dict(BLOCK_S=64, **shape), 4, 3, False)]


def compile_specs():
    """bf16 for every head-dim class (64, odd 80, 128, 256) and both passes; fp16 and non-causal for
    D=128; decode for group x Sq row counts 1..32. fp32 (IEEE FMA, not tensor cores) is a
    correctness path and not listed."""
    specs = []
    for head_dim in (64, 80, 128, 256):
        specs += _flash_specs(head_dim, torch.bfloat16)
    specs += [s for s in _flash_specs(128, torch.float16) if "delta" not in s.name]
    specs += [s for s in _flash_specs(128, torch.bfloat16, causal=False) if s.name.startswith("attn_fwd")]
    specs += [_dkdv_split_spec(64, torch.bfloat16), _dkdv_split_spec(128, torch.bfloat16)]
    for head_dim, rows in ((64, 4), (128, 8), (128, 32), (256, 8)):
        specs += _decode_specs(head_dim, torch.bfloat16, rows)
    specs += _decode_specs(128, torch.float16, 1)
    unique = {}
    for spec in specs:  # one compile per distinct configuration
        unique.setdefault((spec.name, spec.constexprs.get("IS_CAUSAL")), spec)
    return list(unique.values())
