"""Explicit maps between fastlm's parameter names and the HF checkpoint names of each family.

Each Entry says which HF tensors make one fastlm parameter: several HF tensors are concatenated along
dim 0 (q/k/v -> wqkv, gate/up -> w_up), and GPT-2's Conv1D weights are stored transposed (in, out)."""
import re
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Entry:
    ours: str  # fastlm parameter name
    hf: Tuple[str, ...]  # HF tensor names, concatenated along dim 0 in this order
    sizes: Tuple[int, ...]  # dim-0 size of each part (in our orientation)
    transpose: bool = False  # HF stores the 2-D weight transposed (GPT-2 Conv1D)


# HF buffers some checkpoints carry that are not parameters (GPT-2's causal mask, old Llama inv_freq).
IGNORED_HF = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")


def weight_map(cfg):
    """List of Entry for every fastlm parameter (the tied LM head excluded)."""
    entries = _gpt2_entries(cfg) if cfg.model_type == "gpt2" else _llama_entries(cfg)
    if not cfg.tie_embeddings:
        entries.append(Entry("lm_head.weight", ("lm_head.weight",), (cfg.vocab_size,)))
    return entries


def normalize_hf_name(cfg, name: str) -> str:
    """Original GPT-2 checkpoints lack the `transformer.` prefix that transformers writes today."""
    if cfg.model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def _gpt2_entries(cfg):
    D, F = cfg.dim, cfg.intermediate_size
    out = [Entry("tok_emb.weight", ("transformer.wte.weight",), (cfg.vocab_size,)),
           Entry("pos_emb.weight", ("transformer.wpe.weight",), (cfg.max_seq_len,))]
    for i in range(cfg.n_layer):
        p, o = f"transformer.h.{i}.", f"layers.{i}."
        for ours, hf, size, transpose in (
            ("attn_norm.weight", "ln_1.weight", D, False), ("attn_norm.bias", "ln_1.bias", D, False),
            ("attn.wqkv.weight", "attn.c_attn.weight", 3 * D, True), ("attn.wqkv.bias", "attn.c_attn.bias", 3 * D, False),
            ("attn.wo.weight", "attn.c_proj.weight", D, True), ("attn.wo.bias", "attn.c_proj.bias", D, False),
            ("mlp_norm.weight", "ln_2.weight", D, False), ("mlp_norm.bias", "ln_2.bias", D, False),
            ("mlp.w_up.weight", "mlp.c_fc.weight", F, True), ("mlp.w_up.bias", "mlp.c_fc.bias", F, False),
            ("mlp.w_down.weight", "mlp.c_proj.weight", D, True), ("mlp.w_down.bias", "mlp.c_proj.bias", D, False),
        ):
            out.append(Entry(o + ours, (p + hf,), (size,), transpose))
    out += [Entry("norm.weight", ("transformer.ln_f.weight",), (D,)), Entry("norm.bias", ("transformer.ln_f.bias",), (D,))]
    return out


def _llama_entries(cfg):
    D, F = cfg.dim, cfg.intermediate_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = [Entry("tok_emb.weight", ("model.embed_tokens.weight",), (cfg.vocab_size,))]
    for i in range(cfg.n_layer):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        attn = p + "self_attn."
        out += [Entry(o + "attn_norm.weight", (p + "input_layernorm.weight",), (D,)),
                Entry(o + "attn.wqkv.weight", tuple(attn + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight")), (q, kv, kv)),
                Entry(o + "attn.wo.weight", (attn + "o_proj.weight",), (D,)),
                Entry(o + "mlp_norm.weight", (p + "post_attention_layernorm.weight",), (D,)),
                Entry(o + "mlp.w_up.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), (F, F)),
                Entry(o + "mlp.w_down.weight", (p + "mlp.down_proj.weight",), (D,))]
        if cfg.qkv_bias:
            out.append(Entry(o + "attn.wqkv.bias", tuple(attn + n for n in ("q_proj.bias", "k_proj.bias", "v_proj.bias")), (q, kv, kv)))
        if cfg.attn_out_bias:
            out.append(Entry(o + "attn.wo.bias", (attn + "o_proj.bias",), (D,)))
        if cfg.mlp_bias:
            out += [Entry(o + "mlp.w_up.bias", (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"), (F, F)),
                    Entry(o + "mlp.w_down.bias", (p + "mlp.down_proj.bias",), (D,))]
    out.append(Entry("norm.weight", ("model.norm.weight",), (D,)))
    return out


def hf_shapes(entry: Entry, our_shape):
    """The HF shape of each part of entry, given our parameter's shape."""
    shapes = [(size,) + tuple(our_shape[1:]) for size in entry.sizes]
    return [tuple(reversed(s)) if entry.transpose else s for s in shapes]
