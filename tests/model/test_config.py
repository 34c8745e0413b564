"""ModelConfig.from_hf reads each family's config.json the way transformers does, and rejects what
fastlm does not compute."""
import json

import pytest

from fastlm.model import ModelConfig
from tests.model.hf_models import CONFIGS, hf_classes

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}


def llama3_scaling():
    return dict(LLAMA3)  # a fresh copy each time: transformers' config classes edit this dict in place


def hf_dict(model_type, **kwargs):
    """config.json contents written by the installed transformers."""
    config_cls, _ = hf_classes(model_type)
    return json.loads(config_cls(**kwargs).to_json_string())


def test_gpt2_fields():
    cfg = ModelConfig.from_hf(hf_dict("gpt2", vocab_size=500, n_embd=96, n_layer=3, n_head=6, n_positions=128))
    assert (cfg.model_type, cfg.vocab_size, cfg.dim, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (
        "gpt2", 500, 96, 3, 6, 6, 16)
    assert (cfg.intermediate_size, cfg.max_seq_len, cfg.norm, cfg.norm_eps, cfg.pos_emb, cfg.mlp) == (
        384, 128, "layernorm", 1e-5, "learned", "gelu_tanh")
    assert cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias and cfg.tie_embeddings


@pytest.mark.parametrize("model_type, qkv_bias, out_bias", [("llama", False, False), ("mistral", False, False),
                                                            ("qwen2", True, False)])
def test_llama_family_fields(model_type, qkv_bias, out_bias):
    cfg = ModelConfig.from_hf(hf_dict(model_type, vocab_size=300, hidden_size=128, intermediate_size=200,
                                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=None))
    assert (cfg.dim, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size, cfg.max_seq_len) == (
        128, 8, 2, 16, 200, 256)
    assert (cfg.norm, cfg.norm_eps, cfg.pos_emb, cfg.mlp, cfg.rope_scaling) == ("rmsnorm", 1e-5, "rope", "swiglu", None)
    assert (cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias, cfg.tie_embeddings) == (qkv_bias, out_bias, False, False)


def test_llama_biases_explicit_head_dim_and_rope():
    cfg = ModelConfig.from_hf(hf_dict("llama", hidden_size=64, num_attention_heads=4, head_dim=32, attention_bias=True,
                                      mlp_bias=True, rope_theta=500000.0, rope_scaling=llama3_scaling()))
    assert (cfg.head_dim, cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias, cfg.rope_theta) == (32, True, True, True, 500000.0)
    assert cfg.rope_scaling == LLAMA3


def test_transformers4_rope_keys_read_like_transformers5():
    """Checkpoints on the hub carry rope_theta + rope_scaling ("type" in older ones)."""
    v4 = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0,
          "rope_scaling": llama3_scaling()}
    v5 = hf_dict("llama", hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling=llama3_scaling())
    assert "rope_parameters" in v5
    a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling)
    old = ModelConfig.from_hf({**v4, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert old.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported; supported: default, linear, llama3"),
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ({"rope_type": "linear"}, "factor"),
])
def test_unsupported_rope_rejected(scaling, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_scaling": scaling})


def test_sliding_window_caps_max_seq_len():
    mistral = ModelConfig.from_hf(hf_dict("mistral", hidden_size=64, num_attention_heads=8))  # window 4096 < 131072
    assert mistral.max_seq_len == 4096 and mistral.sliding_window == 4096
    qwen = ModelConfig.from_hf(hf_dict("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, sliding_window=1024))
    assert qwen.max_seq_len == 32768  # Qwen2 ignores the window unless use_sliding_window is set


@pytest.mark.parametrize("hf, match", [
    ({"model_type": "bert"}, "'bert' is not supported; supported: gpt2, llama, mistral, qwen2"),
    ({}, "None is not supported"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 6}, "divisible by n_head"),
    ({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 3}, "multiple of n_kv_head"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_bad_configs_rejected(hf, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(hf)


def test_from_folder_and_missing_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    assert ModelConfig.from_hf(tmp_path).n_layer == 1
    assert ModelConfig.from_hf(str(tmp_path / "config.json")).n_layer == 1
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_to_hf_round_trip(name):
    model_type, kwargs = CONFIGS[name]
    cfg = ModelConfig.from_hf(hf_dict(model_type, vocab_size=97, **kwargs))
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_direct_construction_defaults_and_validation():
    cfg = ModelConfig(vocab_size=100, dim=96, n_layer=2, n_head=4)
    assert (cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size, cfg.model_type) == (4, 24, 256, "llama")
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(n_layer=0)
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="cannot be saved as model_type 'gpt2'"):
        ModelConfig(model_type="gpt2").to_hf()  # Llama-style fields under a gpt2 label


def test_qwen2_sliding_layers_cap_max_seq_len():
    cfg = ModelConfig.from_hf(hf_dict("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                      num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                                      max_window_layers=2))
    assert cfg.max_seq_len == 16
    legacy = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
              "use_sliding_window": True, "sliding_window": 16}
    assert ModelConfig.from_hf({**legacy, "max_window_layers": 4}).max_seq_len == 32768  # no sliding layer
    assert ModelConfig.from_hf({**legacy, "max_window_layers": 1}).max_seq_len == 16
