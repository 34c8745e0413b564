"""Tiny random checkpoints built with transformers' own classes (no downloads), shared by the model tests.

Weights are re-drawn larger than HF's 0.02 init so attention is far from uniform and every parameter
(biases, norm weights, positions) visibly moves the logits: a mis-mapped tensor cannot hide."""
import torch

VOCAB = 97  # prime, so no accidental divisibility

# name -> (model_type, HF config kwargs). Covers: tied/untied, MHA/GQA, head_dim 16 and 32, explicit
# head_dim != dim / n_head, Llama-3 rope scaling (original length 32: all three bands reached, see
# test_rope_scaling.py) and linear, Llama attention/MLP biases, Qwen2 q/k/v bias.
CONFIGS = {
    "gpt2_tied_hd16": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "gpt2_untied_hd32": ("gpt2", dict(n_embd=64, n_layer=2, n_head=2, n_positions=64, tie_word_embeddings=False,
                                      n_inner=96)),
    "llama_gqa_hd16": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)),
    "llama3_tied_hd32": ("llama", dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                                       tie_word_embeddings=True, rope_theta=10000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_bias_linear": ("llama", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                                        num_key_value_heads=3, max_position_embeddings=64, attention_bias=True,
                                        mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral_gqa": ("mistral", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                    num_key_value_heads=2, max_position_embeddings=64, sliding_window=None)),
    "qwen2_bias_tied": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
}


def hf_classes(model_type):
    import transformers as tf

    return {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[model_type]


def build_hf_model(name, **overrides):
    """A random HF causal LM of the named configuration, fp32, eval mode."""
    model_type, kwargs = CONFIGS[name]
    config_cls, model_cls = hf_classes(model_type)
    extra = dict(bos_token_id=1, eos_token_id=2) if model_type == "gpt2" else {}
    config = config_cls(vocab_size=VOCAB, **extra, **{**kwargs, **overrides})
    torch.manual_seed(1234)
    model = model_cls(config)
    _redraw(model)
    return model.eval()


@torch.no_grad()
def _redraw(model):
    for name, p in model.named_parameters():
        if "ln" in name or "norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.2 * torch.randn_like(p))
        elif "wte" in name or "wpe" in name or "embed_tokens" in name:
            p.copy_(torch.randn_like(p))
        else:
            p.copy_(0.2 * torch.randn_like(p))


def save_hf_model(name, folder, **save_kwargs):
    """Build and save the named model into folder; returns the HF model."""
    model = build_hf_model(name)
    model.save_pretrained(folder, **save_kwargs)
    return model


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
