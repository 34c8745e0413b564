"""Named model presets for training from scratch (`fastlm train --config NAME`).

Each preset is the architecture only, as `ModelConfig` keyword arguments; the vocabulary size comes
from the tokenizer the run uses (rounded up to a multiple of 64, which keeps the embedding and LM-head
matmuls aligned). All presets are Llama-style (RMSNorm, RoPE, SwiGLU, no biases) except "gpt2", so the
checkpoints they produce load in transformers as LlamaForCausalLM / GPT2LMHeadModel.
"""
import math

from fastlm.model.validation import check_positive_int

_LLAMA = dict(model_type="llama", norm="rmsnorm", pos_emb="rope", mlp="swiglu", norm_eps=1e-5)

PRESETS = {
    # ~0.1M parameters (plus embeddings): for tests and smoke runs.
    "tiny": dict(_LLAMA, dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=192, max_seq_len=256,
                 tie_embeddings=True),
    # The embedded default model's shape: ~0.8M parameters in the blocks (+0.5M for a 4096-token vocabulary),
    # small enough to train on two shared CPU cores in about twenty minutes.
    "default": dict(_LLAMA, dim=128, n_layer=4, n_head=4, n_kv_head=2, intermediate_size=384, max_seq_len=512,
                    tie_embeddings=True),
    # ~4.7M parameters in the blocks.
    "small": dict(_LLAMA, dim=256, n_layer=6, n_head=8, n_kv_head=4, intermediate_size=704, max_seq_len=512,
                  tie_embeddings=True),
    # ~25M parameters in the blocks: wants a GPU.
    "medium": dict(_LLAMA, dim=512, n_layer=8, n_head=8, n_kv_head=4, intermediate_size=1408, max_seq_len=1024,
                   tie_embeddings=True),
    # GPT-2 small's architecture (124M with its 50257-token vocabulary).
    "gpt2": dict(model_type="gpt2", norm="layernorm", pos_emb="learned", mlp="gelu_tanh", norm_eps=1e-5, dim=768,
                 n_layer=12, n_head=12, max_seq_len=1024, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                 tie_embeddings=True),
}


def preset_names():
    return sorted(PRESETS)


def model_config(name, vocab_size, bos_token_id=None, eos_token_id=None):
    """The ModelConfig of preset `name` for a tokenizer of `vocab_size` tokens."""
    from fastlm.model import ModelConfig

    if name not in PRESETS:
        raise ValueError(f"unknown config name {name!r}; known configs: {', '.join(preset_names())}")
    check_positive_int("vocab_size", vocab_size)
    padded = 64 * math.ceil(vocab_size / 64)
    return ModelConfig(**PRESETS[name], vocab_size=padded, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
