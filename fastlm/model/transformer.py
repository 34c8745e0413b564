"""One decoder-only Transformer for GPT-2 and the Llama family (Llama 2/3, Mistral, Qwen2).

Pre-norm blocks with the residual add fused into the norms:
    x, residual = attn_norm(h, residual); h = attn(x); x, residual = mlp_norm(h, residual); h = mlp(x)
Attention runs fastlm.kernels.flash_attention for a whole sequence (no cache, or a prefill of more
than DECODE_MAX_T tokens) and fastlm.kernels.decode_attention for cached steps of 1..DECODE_MAX_T tokens,
which handles rows of different lengths and never synchronizes with the host (CUDA-graph friendly).
With an AttentionMetadata (the engine's steps over a paged KV pool), tokens of many sequences come
packed in one flat batch: K/V are written through its slot mapping, decode rows attend through
paged_decode_attention and prefill chunks through paged_prefill_attention (see attention_metadata.py).
q/k/v are one fused projection (wqkv) and SwiGLU's gate/up another (w_gate_up); fastlm.model.loading
maps them to and from the HF weight names."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.kernels import (LayerNorm, RMSNorm, decode_attention, flash_attention, paged_decode_attention,
                            paged_prefill_attention)
from fastlm.kernels.attention import MAX_DECODE_QUERIES
from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.model.cache import KVCache
from fastlm.model.config import ModelConfig
from fastlm.model.rope import Rotary, apply_rope

DECODE_MAX_T = MAX_DECODE_QUERIES  # cached steps up to decode_attention's limit use it (decode, speculation)


@dataclass
class _Step:
    """What every layer needs to know about the current forward call."""
    cos: Optional[torch.Tensor]  # (B or 1, T, 1, D) fp32, None without RoPE
    sin: Optional[torch.Tensor]
    cache: Optional[KVCache]
    positions: Optional[torch.Tensor]  # (B, T) int64 write positions (decode path)
    seqlens_after: Optional[torch.Tensor]  # (B,) int32 lengths including the new tokens (decode path)
    prefill_start: Optional[int]  # common start of all rows (cached prefill path)
    paged: Optional[AttentionMetadata] = None  # the engine's step (paged KV pool)


def _make_norm(cfg: ModelConfig):
    if cfg.norm == "layernorm":
        return LayerNorm(cfg.dim, eps=cfg.norm_eps)
    return RMSNorm(cfg.dim, eps=cfg.norm_eps)


def _add_norm(norm, h, residual):
    """(norm(h + residual), h + residual); the first block has no residual yet. Under autocast (mixed-
    precision training) h comes out of a linear layer in bf16 while the residual stream and the norm
    weights stay fp32: the add and the norm then run in fp32, as in transformers."""
    if residual is None:
        return norm(h), h
    if h.dtype != residual.dtype:
        h = h.to(residual.dtype)
    return norm(h, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head, self.head_dim = layer_idx, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=cfg.attn_out_bias)

    def forward(self, x, step: _Step):
        B, T, _ = x.shape
        Hq, Hkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, T, Hq + 2 * Hkv, self.head_dim)  # (B, T, Hq + 2 Hkv, D)
        qk, v = qkv[:, :, :Hq + Hkv], qkv[:, :, Hq + Hkv:]  # (B, T, Hq + Hkv, D), (B, T, Hkv, D)
        if step.cos is not None:  # q and k heads are adjacent: rotate them in one call
            qk = apply_rope(qk, step.cos, step.sin)
        q, k = qk[:, :, :Hq], qk[:, :, Hq:]  # (B, T, Hq, D), (B, T, Hkv, D)
        if step.paged is not None:
            out = self._paged(q[0], k[0], v[0], step.paged)
        elif step.cache is None:
            out = flash_attention(q, k, v, causal=True)
        elif step.prefill_start is None:
            out = self._decode(q, k, v, step)
        else:
            out = self._cached_prefill(q, k, v, step)
        return self.wo(out.reshape(B, T, Hq * self.head_dim))  # (B, T, Hq * D) -> (B, T, dim)

    def _paged(self, q, k, v, meta: AttentionMetadata):
        """q (N, Hq, D), k/v (N, Hkv, D) of one packed step: write K/V to the pool, then attend the
        decode rows and the prefill chunks over their paged keys -> (N, Hq, D)."""
        k_pool, v_pool = meta.layer_pools(self.layer_idx)  # each (num_blocks, block_size, Hkv, D)
        Hkv, D = k.shape[1:]
        k_pool.view(-1, Hkv, D).index_copy_(0, meta.slot_mapping, k)
        v_pool.view(-1, Hkv, D).index_copy_(0, meta.slot_mapping, v)
        nd, parts = meta.num_decodes, []
        if nd:
            out = paged_decode_attention(q[:nd, None], k_pool, v_pool, meta.decode_block_tables, meta.decode_seqlens)
            parts.append(out[:, 0])  # (nd, 1, Hq, D) -> (nd, Hq, D)
        if meta.num_prefills:
            parts.append(paged_prefill_attention(q[nd:], k_pool, v_pool, meta.prefill_block_tables,
                                                 meta.prefill_cu_seqlens_q, meta.prefill_seqlens_k))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode(self, q, k, v, step: _Step):
        """Scatter the new K/V at each row's own positions, then attend over each row's valid prefix."""
        k_cache, v_cache = step.cache.layer(self.layer_idx)  # each (B, S_max, Hkv, D), one contiguous block
        B, T, Hkv, D = k.shape
        S = k_cache.shape[1]
        # index_copy_ into the flattened (B * S_max) rows: CPU scatter_ is ~10x slower in bf16
        rows = (step.positions + torch.arange(B, device=k.device)[:, None] * S).reshape(B * T)  # (B*T,)
        k_cache.view(B * S, Hkv, D).index_copy_(0, rows, k.reshape(B * T, Hkv, D))
        v_cache.view(B * S, Hkv, D).index_copy_(0, rows, v.reshape(B * T, Hkv, D))
        return decode_attention(q, k_cache, v_cache, step.seqlens_after)

    def _cached_prefill(self, q, k, v, step: _Step):
        """All rows start at the same position: write a block, attend causally over the prefix + block."""
        k_cache, v_cache = step.cache.layer(self.layer_idx)
        start, end = step.prefill_start, step.prefill_start + q.shape[1]
        k_cache[:, start:end] = k
        v_cache[:, start:end] = v
        if start == 0:
            return flash_attention(q, k, v, causal=True)
        return flash_attention(q, k_cache[:, :end], v_cache[:, :end], causal=True)  # bottom-right causal


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        up_width = 2 * cfg.intermediate_size if cfg.mlp == "swiglu" else cfg.intermediate_size
        self.w_up = nn.Linear(cfg.dim, up_width, bias=cfg.mlp_bias)  # SwiGLU: [gate; up] fused
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.w_up(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.w_down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm, self.attn = _make_norm(cfg), Attention(cfg, layer_idx)
        self.mlp_norm, self.mlp = _make_norm(cfg), MLP(cfg)

    def forward(self, h, residual, step: _Step):
        x, residual = _add_norm(self.attn_norm, h, residual)
        h = self.attn(x, step)
        x, residual = _add_norm(self.mlp_norm, h, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos_emb == "learned" else None
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.pos_emb == "rope" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = _make_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self):
        """GPT-2 style: N(0, 0.02), residual-output projections scaled by 1/sqrt(2 n_layer), zero biases."""
        std_out = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = std_out if name.endswith(("attn.wo", "mlp.w_down")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def new_cache(self, batch_size, max_seq_len=None, dtype=None, device=None) -> KVCache:
        """Preallocated KV cache for batch_size rows of up to max_seq_len (default: config.max_seq_len)."""
        cfg = self.config
        max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if isinstance(max_seq_len, int) and max_seq_len > cfg.max_seq_len:
            raise ValueError(f"max_seq_len ({max_seq_len}) exceeds the model's config.max_seq_len ({cfg.max_seq_len})")
        return KVCache(cfg.n_layer, batch_size, max_seq_len, cfg.n_kv_head, cfg.head_dim,
                       dtype=dtype or self.dtype, device=device or self.device)

    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None, last_only: bool = False,
                metadata: Optional[AttentionMetadata] = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With a cache, row b's tokens sit at positions
        cache.seqlens[b]..+T-1, their K/V are written to the cache and cache.seqlens grows by T in place.
        last_only=True returns (B, 1, vocab) for the last position only (prefill: skips T-1 lm_head rows).
        With metadata (an engine step): input_ids (N,) packed tokens -> logits (R, vocab) of the tokens
        metadata.logits_indices names."""
        if metadata is not None:
            return self._forward_paged(input_ids, metadata)
        self._check_inputs(input_ids, cache)
        B, T = input_ids.shape
        offsets = torch.arange(T, device=input_ids.device)
        step = _Step(None, None, cache, None, None, None)
        if cache is None:
            positions = offsets[None, :]  # (1, T)
        elif T <= DECODE_MAX_T:
            positions = cache.seqlens[:, None].long() + offsets  # (B, T), on device: no host sync
            step.positions, step.seqlens_after = positions, cache.seqlens + T
            _check_room_on_cpu(cache, T)
        else:
            step.prefill_start = _common_start(cache, T)
            positions = (offsets + step.prefill_start)[None, :]  # (1, T)
        h, residual = self._layers(input_ids, positions, step)
        if last_only:
            h, residual = h[:, -1:], residual[:, -1:]  # (B, 1, dim)
        x, _ = _add_norm(self.norm, h, residual)
        if cache is not None:
            cache.seqlens += T
        return self.lm_head(x)

    def _layers(self, input_ids, positions, step: _Step):
        """Embeddings and every block: (B, T) ids at positions (B or 1, T) -> (h, residual), each (B, T, dim)."""
        h = self.tok_emb(input_ids)  # (B, T, dim)
        if self.pos_emb is not None:
            h = h + self.pos_emb(positions)
        if self.rotary is not None:
            step.cos, step.sin = self.rotary(positions)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, step)
        return h, residual

    def _forward_paged(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not isinstance(meta, AttentionMetadata):
            raise ValueError(f"metadata must be an AttentionMetadata, got {type(meta).__name__}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.shape != meta.positions.shape:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be (N,) = metadata.positions' shape {tuple(meta.positions.shape)}, got {got}")
        positions = meta.positions[None]  # (1, N): one packed row
        step = _Step(None, None, None, None, None, None, paged=meta)
        h, residual = self._layers(input_ids[None], positions, step)  # each (1, N, dim)
        h, residual = h[0, meta.logits_indices], residual[0, meta.logits_indices]  # (R, dim)
        x, _ = _add_norm(self.norm, h, residual)
        return self.lm_head(x)  # (R, vocab)

    def _check_inputs(self, input_ids, cache):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, T) int64/int32 tensor, got {got}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids must not be empty, got shape {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids must be on the model's device ({self.device}), got {input_ids.device}")
        T = input_ids.shape[1]
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"input_ids has {T} tokens, more than config.max_seq_len ({self.config.max_seq_len})")
            return
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
        cfg = self.config
        want = (cfg.n_layer, input_ids.shape[0], cache.max_seq_len, cfg.n_kv_head, cfg.head_dim)
        if tuple(cache.k.shape) != want:
            raise ValueError(f"cache buffers have shape {tuple(cache.k.shape)}, expected {want} for input_ids {tuple(input_ids.shape)}")
        if cache.dtype != self.dtype or cache.device != self.device:
            raise ValueError(f"cache must have the model's dtype/device ({self.dtype}, {self.device}), got ({cache.dtype}, {cache.device})")
        if cache.max_seq_len > cfg.max_seq_len:
            raise ValueError(f"cache.max_seq_len ({cache.max_seq_len}) exceeds config.max_seq_len ({cfg.max_seq_len})")

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Load a HF checkpoint folder (gpt2 / llama / mistral / qwen2) in eval mode; see fastlm.model.loading."""
        from fastlm.model.loading import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, out_dir) -> None:
        """Write config.json + model.safetensors in the HF format of the model's family."""
        from fastlm.model.loading import save_pretrained

        save_pretrained(self, out_dir)


def _common_start(cache: KVCache, T: int) -> int:
    """Start position of a cached prefill; every row must have the same length (prefill ragged prompts
    one row at a time through cache.select). Synchronizes once, which is fine for a prefill."""
    lens = cache.seqlens
    start = int(lens[0])
    if bool((lens != start).any()):
        raise ValueError(f"a cached prefill of {T} > {DECODE_MAX_T} tokens needs equal cache.seqlens in all rows, "
                         f"got {lens.tolist()}; prefill rows one at a time with cache.select(slice(b, b + 1))")
    if start + T > cache.max_seq_len:
        raise ValueError(f"cache overflow: {start} cached + {T} new tokens > cache.max_seq_len ({cache.max_seq_len})")
    return start


def _check_room_on_cpu(cache: KVCache, T: int):
    """Bounds check of a decode step, only where it costs no device sync (CPU caches)."""
    if cache.seqlens.device.type == "cpu":
        longest = int(cache.seqlens.max())
        if longest + T > cache.max_seq_len:
            raise ValueError(f"cache overflow: a row holds {longest} tokens, + {T} new > cache.max_seq_len ({cache.max_seq_len})")
