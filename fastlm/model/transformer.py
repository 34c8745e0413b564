"""One decoder-only Transformer for GPT-2 and the Llama family (Llama 2/3, Mistral, Qwen2).

Pre-norm blocks with the residual add fused into the norms:
    x, residual = attn_norm(h, residual); h = attn(x); x, residual = mlp_norm(h, residual); h = mlp(x)
Two modes, said explicitly by the caller:
- forward(input_ids): whole sequences (B, T), no KV cache (training, evaluation, full-sequence logits);
  attention is fastlm.kernels.flash_attention, causal.
- forward(input_ids, metadata=AttentionMetadata): one engine step over the paged KV pool: tokens of
  many sequences packed in one flat batch, K/V written through the metadata's slot mapping, decode rows
  attending through paged_decode_attention and prefill chunks through paged_prefill_attention (see
  attention_metadata.py). The step's device state is all in tensors (CUDA-graph friendly).
q/k/v are one fused projection (wqkv) and SwiGLU's gate/up another (w_gate_up); fastlm.model.loading
maps them to and from the HF weight names."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.kernels import (LayerNorm, RMSNorm, flash_attention, paged_decode_attention, paged_kv_write,
                            paged_prefill_attention)
from fastlm.kernels.paged_attention import can_read_values, check_decode_values, check_prefill_values
from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.model.config import ModelConfig
from fastlm.model.rope import Rotary, apply_rope


@dataclass
class _Step:
    """What every layer needs to know about the current forward call."""
    paged: Optional[AttentionMetadata]  # the engine's step over the paged KV pool; None: whole sequences
    cos: Optional[torch.Tensor] = None  # (B or 1, T, 1, D) fp32, None without RoPE
    sin: Optional[torch.Tensor] = None


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
        if step.paged is None:
            out = flash_attention(q, k, v, causal=True)
        else:
            out = self._paged(q[0], k[0], v[0], step.paged)
        return self.wo(out.reshape(B, T, Hq * self.head_dim))  # (B, T, Hq * D) -> (B, T, dim)

    def _paged(self, q, k, v, meta: AttentionMetadata):
        """q (N, Hq, D), k/v (N, Hkv, D) of one packed step: write K/V to the pool, then attend the
        decode rows and the prefill chunks over their paged keys -> (N, Hq, D)."""
        k_pool, v_pool = meta.layer_pools(self.layer_idx)  # each (num_blocks, block_size, Hkv, D)
        paged_kv_write(k_pool, v_pool, meta.slot_mapping, k, v, check_values=False)  # index_copy_ bounds-checks
        nd, parts = meta.num_decodes, []
        if nd:
            out = paged_decode_attention(q[:nd, None], k_pool, v_pool, meta.decode_block_tables, meta.decode_seqlens,
                                         check_values=False)  # checked once per step: check_step
            parts.append(out[:, 0])  # (nd, 1, Hq, D) -> (nd, Hq, D)
        if meta.num_prefills:
            parts.append(paged_prefill_attention(q[nd:], k_pool, v_pool, meta.prefill_block_tables,
                                                 meta.prefill_cu_seqlens_q, meta.prefill_seqlens_k, check_values=False))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


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
        return self.norm.weight.dtype  # the token embedding may be quantized (integers)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, input_ids: torch.Tensor, last_only: bool = False,
                metadata: Optional[AttentionMetadata] = None) -> torch.Tensor:
        """Whole sequences: input_ids (B, T) -> logits (B, T, vocab); last_only=True returns (B, 1, vocab)
        for the last position only. An engine step (metadata given): input_ids (N,) packed tokens ->
        logits (R, vocab) of the R tokens metadata.logits_indices names."""
        if metadata is not None:
            return self._forward_paged(input_ids, metadata)
        self._check_inputs(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # (1, T)
        h, residual = self._layers(input_ids, positions, _Step(None))
        if last_only:
            h, residual = h[:, -1:], residual[:, -1:]  # (B, 1, dim)
        x, _ = _add_norm(self.norm, h, residual)
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
        self.check_step(input_ids, meta)
        return self.forward_step(input_ids, meta)

    def forward_step(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """forward(input_ids, metadata=meta) without checking the inputs: for a caller that checked them
        (fastlm.runtime.compiled_step compiles this; a check reads values back, a graph break)."""
        positions = meta.positions[None]  # (1, N): one packed row
        step = _Step(meta)
        h, residual = self._layers(input_ids[None], positions, step)  # each (1, N, dim)
        h, residual = h[0, meta.logits_indices], residual[0, meta.logits_indices]  # (R, dim)
        x, _ = _add_norm(self.norm, h, residual)
        return self.lm_head(x)  # (R, vocab)

    def _check_inputs(self, input_ids, rank: int = 2):
        shape = "(B, T)" if rank == 2 else "(N,)"
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != rank or input_ids.dtype not in (torch.int64, torch.int32):
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a {shape} int64/int32 tensor, got {got}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids must not be empty, got shape {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids must be on the model's device ({self.device}), got {input_ids.device}")
        if rank == 2 and input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than config.max_seq_len "
                             f"({self.config.max_seq_len})")

    def check_step(self, input_ids, meta) -> None:
        """ValueError unless input_ids (N,) and meta fit this model and each other (forward's checks of an
        engine step)."""
        if not isinstance(meta, AttentionMetadata):
            raise ValueError(f"metadata must be an AttentionMetadata, got {type(meta).__name__}")
        self._check_inputs(input_ids, rank=1)
        if input_ids.shape != meta.positions.shape:
            raise ValueError(f"input_ids must have metadata.positions' shape {tuple(meta.positions.shape)}, "
                             f"got {tuple(input_ids.shape)}")
        cfg, pool = self.config, meta.k_pool
        if pool.dim() != 5 or (pool.shape[0], pool.shape[3], pool.shape[4]) != (cfg.n_layer, cfg.n_kv_head, cfg.head_dim):
            raise ValueError(f"metadata.k_pool must be (n_layer={cfg.n_layer}, blocks, block_size, n_kv_head="
                             f"{cfg.n_kv_head}, head_dim={cfg.head_dim}), got {tuple(pool.shape)}")
        if pool.dtype != self.dtype or pool.device != self.device or meta.v_pool.shape != pool.shape:
            raise ValueError(f"metadata's pools must have the model's dtype/device ({self.dtype}, {self.device}) "
                             f"and one shape, got ({pool.dtype}, {pool.device}) and {tuple(meta.v_pool.shape)}")
        if can_read_values(input_ids):  # once per step, not per layer (each check is a host sync)
            k_cache = pool[0]
            if meta.num_decodes:
                check_decode_values(1, k_cache, meta.decode_block_tables, meta.decode_seqlens)
            if meta.num_prefills:
                check_prefill_values(input_ids.shape[0] - meta.num_decodes, k_cache, meta.prefill_block_tables,
                                     meta.prefill_cu_seqlens_q, meta.prefill_seqlens_k)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, quantize=None) -> "Transformer":
        """Load a HF checkpoint folder (gpt2 / llama / mistral / qwen2) in eval mode; see fastlm.model.loading.
        quantize="int8" | "int4" quantizes the linear layers while loading (fastlm.model.quantize)."""
        from fastlm.model.loading import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, quantize=quantize)

    def save_pretrained(self, out_dir) -> None:
        """Write config.json + model.safetensors in the HF format of the model's family."""
        from fastlm.model.loading import save_pretrained

        save_pretrained(self, out_dir)

