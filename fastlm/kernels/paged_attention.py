"""Paged attention: attention whose K/V live in a pool of fixed-size blocks addressed by block tables.

KV pool (per layer): k_cache, v_cache (num_blocks, block_size, Hkv, D). Token p of sequence b lives in
block block_tables[b, p // block_size] at offset p % block_size; table entries past a sequence's used
blocks are ignored (any value). Hq is a multiple of Hkv (GQA / MQA).

- paged_decode_attention(q (B, Sq <= 8, Hq, D), ..., seqlens (B,)) -> (B, Sq, Hq, D): seqlens[b] counts
  the valid tokens including the Sq new ones (already written to the pool); query s sits at position
  seqlens[b] - Sq + s and sees keys j <= that position.
- paged_prefill_attention(q (total_q, Hq, D), ..., cu_seqlens_q (B + 1,), seqlens_k (B,)) -> (total_q, Hq, D):
  varlen prefill chunks over a cached prefix; row b's queries are q[cu[b]:cu[b+1]], its keys the first
  seqlens_k[b] tokens of its blocks; causal, bottom-right aligned (query i at position
  seqlens_k[b] - q_len_b + i).

fp32 / fp16 / bf16, D <= 256, any block_size >= 1, softmax in fp32. Inference only (no gradient
through the Triton path). Dispatch (fastlm.kernels._utils.use_triton): CUDA -> the Triton kernels of
_paged.py (split-KV decode with an LSE combine; flash-attention prefill reading K/V through the block
table); CPU -> the references below (gather the rows' tokens with index_select into per-thread scratch buffers,
then torch SDPA in fp32), or the Triton kernels under TRITON_INTERPRET=1. One exception on CPU: decode with
one query per row (fp32/bf16) runs fastlm's C++ kernel (fastlm.kernels._cpu_ext) where it builds, unless
FASTLM_KERNELS=reference or the interpreter is on.
"""
import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from fastlm.kernels import _cpu_ext, _paged
from fastlm.kernels._utils import check_tensor, native_cpu, use_triton
from fastlm.kernels.attention import MAX_DECODE_QUERIES, MAX_HEAD_DIM, _resolve_scale


# ---------------------------------------------------------------------------------------------------
# PyTorch references (fp32 compute; the CPU path)


WORKSPACE_MAX_ELEMENTS = 1 << 23  # per scratch buffer (32 MB in fp32; at most 4 per thread); larger: per call
_workspace = threading.local()


def _scratch(name, shape, dtype, device):
    """A per-thread CPU buffer reused across calls: a fresh multi-MB tensor page-faults on every call
    (glibc hands it back to the OS on free), which cost ~10x the attention itself in a CPU decode step."""
    numel = math.prod(shape)
    if numel > WORKSPACE_MAX_ELEMENTS or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def _gather_tokens(name, cache, block_tables, lengths, n_tokens, reuse):
    """(B, n_tokens, Hkv, D) fp32: token p of each row for p < n_tokens, in order; with reuse, in a scratch
    buffer valid until the next call on this thread. Slots past a row's length repeat its token 0 (finite:
    free pool slots and table entries past the used blocks may hold anything; the caller masks them)."""
    B = block_tables.shape[0]
    block_size = cache.shape[1]
    p = torch.arange(n_tokens, device=block_tables.device)
    p = p.expand(B, n_tokens).masked_fill(p >= lengths[:, None], 0)  # (B, n_tokens)
    slots = (block_tables.gather(1, p // block_size).long() * block_size + p % block_size).flatten()
    tokens = cache.view(-1, *cache.shape[2:]) if cache.is_contiguous() else cache.flatten(0, 1)
    if reuse:
        shape = (B * n_tokens,) + cache.shape[2:]
        gathered = torch.index_select(tokens, 0, slots, out=_scratch(name, shape, cache.dtype, cache.device))
        if cache.dtype != torch.float32:
            gathered = _scratch(name + "32", shape, torch.float32, cache.device).copy_(gathered)
    else:  # autograd records the gather (index_select's out= variant has no derivative)
        gathered = tokens.index_select(0, slots).float()
    return gathered.view(B, n_tokens, *cache.shape[2:])


def _reuse_scratch(*tensors):
    """Scratch buffers must not be saved for a backward: reuse them only without autograd."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _sdpa_fp32(q, k, v, scale, mask=None, causal=False):
    """SDPA on (B, S, H, D) fp32 tensors; GQA without copying K/V -> (B, Sq, Hq, D)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def paged_decode_ref(q, k_cache, v_cache, block_tables, seqlens, softmax_scale=None):
    """The reference of paged_decode_attention (arguments as there, not validated): one index_select per
    cache over the tokens of every row, then one batched SDPA with the ragged causal mask. The CPU decode
    of one token per row (the engine's decode steps) goes row by row instead (see _decode_rows_cpu)."""
    B, Sq, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if q.device.type == "cpu" and Sq == 1 and _reuse_scratch(q, k_cache, v_cache):
        return _decode_rows_cpu(q, k_cache, v_cache, block_tables, seqlens.tolist(), scale)
    lengths = seqlens.to(device=q.device, dtype=torch.long)
    on_cpu = q.device.type == "cpu"  # reading lengths syncs: only on CPU, else every table slot
    n_tokens = int(lengths.max()) if on_cpu else block_tables.shape[1] * k_cache.shape[1]
    reuse = _reuse_scratch(q, k_cache, v_cache)
    k = _gather_tokens("k", k_cache, block_tables, lengths, n_tokens, reuse)  # (B, n_tokens, Hkv, D)
    v = _gather_tokens("v", v_cache, block_tables, lengths, n_tokens, reuse)
    if on_cpu and Sq == 1 and bool((lengths == n_tokens).all()):  # one length: no mask (faster kernels)
        return _sdpa_fp32(q.float(), k, v, scale).to(q.dtype)
    positions = lengths[:, None] - Sq + torch.arange(Sq, device=q.device)  # (B, Sq), < lengths
    visible = torch.arange(n_tokens, device=q.device) <= positions[..., None]  # (B, Sq, Sk)
    return _sdpa_fp32(q.float(), k, v, scale, mask=visible[:, None]).to(q.dtype)


CASCADE_MIN_TOKENS = 64  # a prefix shared by every decode row from this long is attended once (cascade)


def _decode_rows_cpu(q, k_cache, v_cache, block_tables, lengths, scale):
    """CPU decode, one row at a time: the row's blocks gathered, then fp32 attention without a mask.
    No (B, longest) padding or mask: at the engine's batch sizes (tens of rows of hundreds of tokens) this
    is several times faster than the batched gather + masked SDPA. fp32 even for a bf16/fp16 pool: torch's
    CPU flash kernel takes ~7x longer for one bf16 query than the fp32 copy plus the fp32 kernel
    (torch 2.13, 12 heads x 512 keys: 277 us vs 38 us).
    Cascade: when every row starts with the same blocks (a shared system prompt, the n samples of one
    prompt: prefix caching shares them), that prefix is gathered once and attended by all the rows'
    queries in one call; each row then attends only its own tail, and the two parts merge by their
    log-sum-exps (as FlashInfer's and vLLM's cascade attention)."""
    B, _, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv  # the query heads of a KV head attend as G queries of it: no K/V head repeat
    q32 = q.float().view(B, Hkv, G, D)
    shared = _shared_blocks(block_tables, lengths, block_size)
    if B == 1:  # batch-1 decode: one attention call, nothing to merge (4 fewer ops per layer)
        return _attend_row(q32, k_cache, v_cache, block_tables[0], lengths[0], scale).view(1, 1, Hq, D).to(q.dtype)
    start = shared * block_size
    out = torch.empty((B, Hkv, G, D), dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hkv, G), float("-inf"), device=q.device)
    for b, length in enumerate(lengths):
        if length == start:
            out[b] = 0.0
            continue
        blocks = _row_blocks(block_tables[b, shared:-(-length // block_size)], k_cache)
        k = _gather_rows(k_cache, blocks, length - start)  # (tail, Hkv, D) fp32
        v = _gather_rows(v_cache, blocks, length - start)
        o, l = _attend_lse(q32[b:b + 1], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale)
        out[b], lse[b] = o[0], l[0]
    if shared:
        blocks = _row_blocks(block_tables[0, :shared], k_cache)
        k = _gather_rows(k_cache, blocks, start).transpose(0, 1)[None]  # (1, Hkv, start, D)
        v = _gather_rows(v_cache, blocks, start).transpose(0, 1)[None]
        queries = q32.transpose(0, 1).reshape(1, Hkv, B * G, D)  # every row's queries at once
        o, l = _attend_lse(queries, k, v, scale)
        o, l = o[0].view(Hkv, B, G, D).transpose(0, 1), l[0].view(Hkv, B, G).transpose(0, 1)
        top = torch.maximum(lse, l)
        w_tail, w_shared = torch.exp(lse - top), torch.exp(l - top)
        out = (out * w_tail[..., None] + o * w_shared[..., None]) / (w_tail + w_shared)[..., None]
    return out.view(B, 1, Hq, D).to(q.dtype)


def _attend_row(q32, k_cache, v_cache, table, length, scale):
    """One row's fp32 attention over its first length tokens: q32 (1, Hkv, G, D) -> (1, Hkv, G, D)."""
    blocks = _row_blocks(table[:-(-length // k_cache.shape[1])], k_cache)
    k = _gather_rows(k_cache, blocks, length).transpose(0, 1)[None]  # (1, Hkv, length, D)
    v = _gather_rows(v_cache, blocks, length).transpose(0, 1)[None]
    return _attend_lse(q32, k, v, scale)[0]


def _shared_blocks(block_tables, lengths, block_size) -> int:
    """How many leading blocks every row shares (0 below CASCADE_MIN_TOKENS or for a single row); only
    blocks every row fills completely count."""
    most = min(lengths) // block_size
    if len(lengths) < 2 or most * block_size < CASCADE_MIN_TOKENS:
        return 0
    same = (block_tables[:, :most] == block_tables[:1, :most]).all(dim=0)  # (most,)
    shared = int(same.int().cumprod(0).sum())
    return shared if shared * block_size >= CASCADE_MIN_TOKENS else 0


def _row_blocks(table, cache):
    """A row's blocks (table: their int32 ids, at least one) as _gather_rows takes them: a slice of the
    pool when the ids are consecutive and in range (a sequence usually is: the block manager hands out the
    lowest free ids in order), else the ids as int64 (index_select, which also rejects bad ids)."""
    ids = table.tolist()
    first = ids[0]
    if (cache.is_contiguous() and 0 <= first and first + len(ids) <= cache.shape[0]
            and ids == list(range(first, first + len(ids)))):
        return slice(first, first + len(ids))
    return table.long()


def _gather_rows(cache, blocks, n_tokens):
    """The first n_tokens tokens of the given blocks (_row_blocks), (n_tokens, Hkv, D) fp32: consecutive
    blocks are read in place (a view; fp32 needs no copy at all), others gathered (~40 us for a few
    blocks in a CPU decode step, mostly cache misses and thread start-up)."""
    rows = cache[blocks] if isinstance(blocks, slice) else cache.index_select(0, blocks)
    return rows.view(-1, *cache.shape[2:])[:n_tokens].float()


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_lse(q, k, v, scale):
    """fp32 attention without a mask, q (1, H, Sq, D), k/v (1, H, Sk, D) -> (out (1, H, Sq, D),
    log-sum-exp of the scaled scores (1, H, Sq))."""
    if _flash_cpu is not None:
        o, lse = _flash_cpu(q, k, v, 0.0, False, scale=scale)[:2]
        return o, lse
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v), lse


def paged_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, softmax_scale=None):
    """The reference of paged_prefill_attention (arguments as there, not validated): per row, gather its
    tokens and run SDPA with the bottom-right causal mask (prefill is compute-bound: the loop over rows
    costs little next to it)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    reuse = _reuse_scratch(q, k_cache, v_cache)
    cu = cu_seqlens_q.tolist()
    for b, length in enumerate(seqlens_k.tolist()):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        lengths = seqlens_k[b: b + 1].long()
        k = _gather_tokens("k", k_cache, block_tables[b: b + 1], lengths, length, reuse)  # (1, Sk, Hkv, D)
        v = _gather_tokens("v", v_cache, block_tables[b: b + 1], lengths, length, reuse)
        out[start:end] = _causal_fp32(q[None, start:end].float(), k, v, scale)[0].to(q.dtype)
    return out


def _causal_fp32(q, k, v, scale):
    """Bottom-right causal attention of one row: q (1, Sq, Hq, D), k/v (1, Sk, Hkv, D), Sq <= Sk."""
    Sq, Sk = q.shape[1], k.shape[1]
    if Sq == 1:
        return _sdpa_fp32(q, k, v, scale)
    if Sq == Sk:  # SDPA's own (top-left) causal mask coincides
        return _sdpa_fp32(q, k, v, scale, causal=True)
    positions = torch.arange(Sq, device=q.device) + (Sk - Sq)
    visible = torch.arange(Sk, device=q.device) <= positions[:, None]  # (Sq, Sk)
    return _sdpa_fp32(q, k, v, scale, mask=visible)


# ---------------------------------------------------------------------------------------------------
# Custom ops (the Triton path and every path under torch.compile): the launchers or the references


@custom_op("fastlm::paged_decode_attn", mutates_args=())
def paged_decode_attn(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seqlens: Tensor,
                      scale: float) -> Tensor:
    """o (B, Sq, Hq, D) of paged_decode_attention (arguments already validated)."""
    if use_triton(q):
        return _paged.paged_decode(q, k_cache, v_cache, block_tables, seqlens, scale)
    return paged_decode_ref(q, k_cache, v_cache, block_tables, seqlens, scale).contiguous()


@paged_decode_attn.register_fake
def _(q, k_cache, v_cache, block_tables, seqlens, scale):
    return q.new_empty(q.shape)


@custom_op("fastlm::paged_prefill_attn", mutates_args=())
def paged_prefill_attn(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
                       seqlens_k: Tensor, scale: float) -> Tensor:
    """o (total_q, Hq, D) of paged_prefill_attention (arguments already validated)."""
    if use_triton(q):
        return _paged.paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale)
    return paged_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale)


@paged_prefill_attn.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale):
    return q.new_empty(q.shape)


def _write_kv(k_cache, v_cache, slot_mapping, k, v):
    """k/v (N, Hkv, D) written to the pool's flat slots (arguments already validated)."""
    Hkv, D = k.shape[1:]
    k_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, v)


# fastlm::paged_kv_write, the op torch.compile sees: the pools are graph inputs written in place, not
# functionalized into a copy of the whole pool per layer and step. Defined through torch.library.Library
# rather than @custom_op: a call costs ~6 us instead of ~19 us (24 calls per step of a 12-layer model).
_LIBRARY = torch.library.Library("fastlm", "FRAGMENT")
_LIBRARY.define("paged_kv_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor k, Tensor v) -> ()")
_LIBRARY.impl("paged_kv_write", _write_kv, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlm::paged_kv_write")
def _(k_cache, v_cache, slot_mapping, k, v):
    return None


# ---------------------------------------------------------------------------------------------------
# Validation


def _check_pool(q, k_cache, v_cache, q_heads_dim):
    check_tensor("k_cache", k_cache, ndim=4, like=("q", q))
    check_tensor("v_cache", v_cache, ndim=4, like=("q", q))
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    n_blocks, block_size, Hkv, D = k_cache.shape
    if n_blocks == 0 or block_size == 0:
        raise ValueError(f"k_cache must have at least one block of at least one token, got {tuple(k_cache.shape)}")
    if q.shape[-1] != D:
        raise ValueError(f"k_cache must have head dim {q.shape[-1]} like q, got {D}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim must be in 1..{MAX_HEAD_DIM}, got {D}")
    Hq = q.shape[q_heads_dim]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k_cache heads ({Hkv})")


def _check_index(name, t, q, shape):
    """q: the query (or, in the value checks, the pool): the device t must be on."""
    check_tensor(name, t, ndim=len(shape), dtypes=(torch.int32,))
    if shape[0] is not None and t.shape[0] != shape[0]:
        raise ValueError(f"{name} must have {shape[0]} rows, got shape {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")


def can_read_values(q):
    """Checking values reads them back (a sync): skipped while compiling or capturing a CUDA graph."""
    return not (torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()))


def _bad_table_entries(block_tables, lengths, k_cache):
    """Boolean (B, max_blocks): entries a row uses (the first ceil(length / block_size)) that are not in
    [0, num_blocks)."""
    n_blocks, block_size = k_cache.shape[:2]
    used = torch.arange(block_tables.shape[1], device=lengths.device) * block_size < lengths[:, None].long()
    return used & ((block_tables < 0) | (block_tables >= n_blocks))


def _check_values(bad_lengths, lengths_error, bad_tables, block_tables, k_cache):
    """One host sync for every value check; the messages are built only on failure."""
    if not bool(bad_lengths | bad_tables.any()):
        return
    if bool(bad_lengths):
        raise ValueError(lengths_error())
    row, col = (int(i) for i in bad_tables.nonzero()[0])
    raise ValueError(f"block_tables[{row}, {col}] = {int(block_tables[row, col])} is not a block of the pool "
                     f"(num_blocks={k_cache.shape[0]})")


def _check_decode(q, k_cache, v_cache, block_tables, seqlens, check_values):
    check_tensor("q", q, ndim=4)
    _check_pool(q, k_cache, v_cache, q_heads_dim=2)
    B, Sq = q.shape[:2]
    if B == 0 or not 1 <= Sq <= MAX_DECODE_QUERIES:
        raise ValueError(f"q must have a batch >= 1 and 1..{MAX_DECODE_QUERIES} queries per sequence, "
                         f"got shape {tuple(q.shape)}")
    _check_index("block_tables", block_tables, q, (B, None))
    _check_index("seqlens", seqlens, q, (B,))
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables must have at least one column")
    if check_values and can_read_values(q):
        check_decode_values(Sq, k_cache, block_tables, seqlens)


def check_decode_values(Sq, k_cache, block_tables, seqlens):
    """The value checks of paged_decode_attention (one host sync): lengths in range, used table entries
    naming blocks of the pool. A caller attending every layer over the same tables runs them once."""
    _check_index("block_tables", block_tables, k_cache, (None, None))
    _check_index("seqlens", seqlens, k_cache, (block_tables.shape[0],))
    capacity = block_tables.shape[1] * k_cache.shape[1]
    if k_cache.device.type == "cpu" and _cpu_ext.load() and not torch.ops.fastlm_cpu.decode_tables_bad(
            block_tables, seqlens, k_cache.shape[0], k_cache.shape[1], Sq, capacity):
        return  # one C++ pass (~5 us) where the aten checks below cost ~0.1 ms per step; they name what is wrong
    _check_values(((seqlens < Sq) | (seqlens > capacity)).any(),
                  lambda: f"seqlens must be in [Sq={Sq}, max_blocks * block_size={capacity}] (the new tokens are "
                          f"counted), got {seqlens.tolist()}",
                  _bad_table_entries(block_tables, seqlens, k_cache), block_tables, k_cache)


def _check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, check_values):
    check_tensor("q", q, ndim=3)
    _check_pool(q, k_cache, v_cache, q_heads_dim=1)
    _check_index("seqlens_k", seqlens_k, q, (None,))
    B = seqlens_k.shape[0]
    if B == 0:
        raise ValueError("seqlens_k must have at least one row")
    _check_index("cu_seqlens_q", cu_seqlens_q, q, (B + 1,))
    _check_index("block_tables", block_tables, q, (B, None))
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables must have at least one column")
    if check_values and can_read_values(q):
        check_prefill_values(q.shape[0], k_cache, block_tables, cu_seqlens_q, seqlens_k)


def check_prefill_values(total_q, k_cache, block_tables, cu_seqlens_q, seqlens_k):
    """The value checks of paged_prefill_attention (one host sync), as check_decode_values."""
    _check_index("block_tables", block_tables, k_cache, (None, None))
    _check_index("seqlens_k", seqlens_k, k_cache, (block_tables.shape[0],))
    _check_index("cu_seqlens_q", cu_seqlens_q, k_cache, (block_tables.shape[0] + 1,))
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    bad_cu = (cu_seqlens_q[0] != 0) | (cu_seqlens_q[-1] != total_q) | (q_lens < 0).any()
    capacity = block_tables.shape[1] * k_cache.shape[1]
    bad_k = ((seqlens_k < q_lens) | (seqlens_k > capacity)).any()

    def lengths_error():
        if bool(bad_cu):
            return f"cu_seqlens_q must rise from 0 to total_q={total_q}, got {cu_seqlens_q.tolist()}"
        return (f"seqlens_k must be in [q_len, max_blocks * block_size={capacity}] per row, got "
                f"{seqlens_k.tolist()} for query lengths {q_lens.tolist()}")

    _check_values(bad_cu | bad_k, lengths_error, _bad_table_entries(block_tables, seqlens_k, k_cache), block_tables,
                  k_cache)


# ---------------------------------------------------------------------------------------------------
# Public functions


def paged_kv_write(k_cache, v_cache, slot_mapping, k, v, check_values=True):
    """Write new keys and values into a paged KV pool: k, v (N, Hkv, D) go to the flat slots
    slot_mapping (N,) int64 (slot = block * block_size + offset) of k_cache, v_cache (num_blocks,
    block_size, Hkv, D), in place. Slots are checked to lie in the pool (a host sync) unless compiling,
    capturing a CUDA graph, or check_values=False."""
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4, like=("k_cache", k_cache), shape=k_cache.shape)
    check_tensor("k", k, ndim=3, like=("k_cache", k_cache), shape=(k.shape[0], *k_cache.shape[2:]))
    check_tensor("v", v, ndim=3, like=("k_cache", k_cache), shape=k.shape)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), shape=k.shape[:1])
    if slot_mapping.device != k_cache.device:
        raise ValueError(f"slot_mapping must be on k_cache's device ({k_cache.device}), got {slot_mapping.device}")
    if check_values and can_read_values(k_cache) and slot_mapping.numel():
        slots = k_cache.shape[0] * k_cache.shape[1]
        if bool(((slot_mapping < 0) | (slot_mapping >= slots)).any()):
            raise ValueError(f"slot_mapping entries must be in [0, {slots}) (num_blocks * block_size), got "
                             f"min {int(slot_mapping.min())}, max {int(slot_mapping.max())}")
    if torch.compiler.is_compiling():
        torch.ops.fastlm.paged_kv_write(k_cache, v_cache, slot_mapping, k, v)
    else:  # eager: no op dispatch (this runs twice per layer and step)
        _write_kv(k_cache, v_cache, slot_mapping, k, v)


def _cpu_kernel_decodes(q, k_cache) -> bool:
    """True where fastlm's C++ CPU decode kernel (csrc/cpu_paged_attention.cpp) runs: one query per row of
    fp32/bf16 on a CPU, the library built here, and neither Triton's interpreter (which tests the Triton
    kernel) nor FASTLM_KERNELS=reference (the PyTorch reference) asked for."""
    return (native_cpu(q) and q.shape[1] == 1 and q.dtype in (torch.float32, torch.bfloat16)
            and k_cache.is_contiguous() and _cpu_ext.load())


def paged_decode_attention(q, k_cache, v_cache, block_tables, seqlens, softmax_scale=None, check_values=True):
    """Decode attention over a paged KV pool: q (B, Sq <= 8, Hq, D); k_cache, v_cache
    (num_blocks, block_size, Hkv, D); block_tables int32 (B, max_blocks); seqlens int32 (B,) valid tokens
    per row including the Sq new ones. Query s sits at position seqlens[b] - Sq + s -> (B, Sq, Hq, D).
    softmax_scale defaults to 1/sqrt(D). Lengths and used table entries are checked (a host sync) unless
    compiling, capturing a CUDA graph, or check_values=False: for a caller that ran check_decode_values
    once on tables every layer shares."""
    _check_decode(q, k_cache, v_cache, block_tables, seqlens, check_values)
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if _cpu_kernel_decodes(q, k_cache):  # eagerly or traced by torch.compile: one C++ op
        return torch.ops.fastlm_cpu.paged_decode(q[:, 0], k_cache, v_cache, block_tables, seqlens, scale)[:, None]
    if not torch.compiler.is_compiling() and not use_triton(q):
        return paged_decode_ref(q, k_cache, v_cache, block_tables, seqlens, scale)  # eager CPU: no op dispatch
    return paged_decode_attn(q, k_cache, v_cache, block_tables, seqlens, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, softmax_scale=None,
                            check_values=True):
    """Varlen causal prefill over a paged KV pool: q (total_q, Hq, D) packs B rows, row b's queries at
    q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]; seqlens_k int32 (B,) keys per row (cached prefix + this chunk,
    already written to the pool); block_tables int32 (B, max_blocks). Causal, bottom-right aligned: row b's
    query i sits at position seqlens_k[b] - q_len_b + i -> (total_q, Hq, D). check_values as in
    paged_decode_attention (check_prefill_values)."""
    _check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, check_values)
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if not torch.compiler.is_compiling() and not use_triton(q):
        return paged_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale)
    return paged_prefill_attn(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale)
