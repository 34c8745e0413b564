"""Translation between HF config.json dicts (per family) and ModelConfig keyword arguments.

Defaults for absent keys are the HF config classes' defaults, so a minimal config.json reads the same
way transformers reads it."""

# HF defaults per family for the keys we read (transformers' GPT2Config, LlamaConfig, MistralConfig, Qwen2Config).
LLAMA_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "vocab_size": 32000},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "vocab_size": 32000, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "vocab_size": 151936},
}
# HF activation names -> our MLP kind (GPT-2's "gelu_new" is the tanh approximation).
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def config_kwargs_from_hf(hf: dict) -> dict:
    model_type = hf["model_type"]
    kwargs = _gpt2_kwargs(hf) if model_type == "gpt2" else _llama_family_kwargs(hf, model_type)
    kwargs.update(model_type=model_type, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  torch_dtype=hf.get("dtype", hf.get("torch_dtype")))
    return kwargs


def _gpt2_kwargs(hf: dict) -> dict:
    _reject(hf, "scale_attn_by_inverse_layer_idx", True, "GPT-2 with scale_attn_by_inverse_layer_idx")
    _reject(hf, "scale_attn_weights", False, "GPT-2 without scale_attn_weights")
    _reject(hf, "add_cross_attention", True, "GPT-2 with cross-attention")
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not supported for gpt2; supported: {', '.join(GPT2_ACTIVATIONS)}")
    dim = hf.get("n_embd", 768)
    return dict(
        vocab_size=hf.get("vocab_size", 50257), dim=dim, n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
        intermediate_size=hf.get("n_inner") or 4 * dim, max_seq_len=hf.get("n_positions", 1024),
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos_emb="learned", mlp=GPT2_ACTIVATIONS[act],
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_family_kwargs(hf: dict, model_type: str) -> dict:
    defaults = LLAMA_DEFAULTS[model_type]
    get = lambda key, default=None: hf.get(key, defaults.get(key, default))  # noqa: E731
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported for {model_type}; supported: silu")
    rope_theta, rope_scaling = _read_rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    sliding = hf.get("sliding_window", defaults.get("sliding_window")) if _uses_sliding_window(hf, model_type) else None
    return dict(
        vocab_size=get("vocab_size"), dim=get("hidden_size", 4096), n_layer=get("num_hidden_layers", 32),
        n_head=get("num_attention_heads", 32), n_kv_head=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        intermediate_size=get("intermediate_size", 11008), max_seq_len=get("max_position_embeddings"),
        norm="rmsnorm", norm_eps=get("rms_norm_eps"), pos_emb="rope", rope_theta=float(rope_theta),
        rope_scaling=rope_scaling, mlp="swiglu",
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        attn_out_bias=attention_bias if model_type == "llama" else False,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        tie_embeddings=bool(get("tie_word_embeddings")), sliding_window=sliding,
    )


def _uses_sliding_window(hf: dict, model_type: str) -> bool:
    """Whether any layer attends through a sliding window (transformers 5 lists layer_types; before,
    Mistral always did when sliding_window is set, Qwen2 only with use_sliding_window, on the layers
    from max_window_layers on)."""
    if isinstance(hf.get("layer_types"), list):
        return "sliding_attention" in hf["layer_types"]
    if model_type == "mistral":
        return True
    n_layer = hf.get("num_hidden_layers", 32)
    return model_type == "qwen2" and bool(hf.get("use_sliding_window")) and hf.get("max_window_layers", 28) < n_layer


def _read_rope(hf: dict):
    """(rope_theta, scaling dict or None) from transformers 5's rope_parameters or 4's rope_theta/rope_scaling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
    prf = hf.get("partial_rotary_factor", 1.0)
    if isinstance(params, dict):
        prf = params.get("partial_rotary_factor", prf)
        scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"} if scaling else scaling
    if prf != 1.0:
        raise ValueError(f"partial_rotary_factor {prf} is not supported (only full rotary embeddings)")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def _reject(hf, key, bad_value, what):
    if hf.get(key, not bad_value) == bad_value:
        raise ValueError(f"{what} is not supported ({key}={bad_value!r} in config)")


def config_to_hf(cfg) -> dict:
    """config.json for cfg's family, readable by transformers 4.45+ and 5."""
    common = {"architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.model_type == "gpt2":
        _check_family(cfg, norm="layernorm", pos_emb="learned", biases=(True, True, True), mha=True)
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.mlp]
        return {**common, "n_embd": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.intermediate_size, "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": act}
    biases = {"llama": (cfg.qkv_bias, cfg.qkv_bias, cfg.mlp_bias), "mistral": (False, False, False),
              "qwen2": (True, False, False)}[cfg.model_type]
    _check_family(cfg, norm="rmsnorm", pos_emb="rope", biases=biases, mha=False)
    out = {**common, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
           "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}
    if cfg.model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "qwen2" and cfg.sliding_window is not None:
        out.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0)
    return out


def _check_family(cfg, norm, pos_emb, biases, mha):
    """A config saved as a HF family must be expressible in that family's config.json."""
    got = dict(norm=cfg.norm, pos_emb=cfg.pos_emb, biases=(cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias))
    want = dict(norm=norm, pos_emb=pos_emb, biases=biases)
    if cfg.model_type != "gpt2" and cfg.mlp != "swiglu":
        got["mlp"], want["mlp"] = cfg.mlp, "swiglu"
    if mha and cfg.n_kv_head != cfg.n_head:
        got["n_kv_head"], want["n_kv_head"] = cfg.n_kv_head, cfg.n_head
    if mha and cfg.head_dim * cfg.n_head != cfg.dim:
        got["head_dim"], want["head_dim"] = cfg.head_dim, cfg.dim // cfg.n_head
    bad = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
    if bad:
        detail = ", ".join(f"{k}={g!r} (needs {w!r})" for k, (g, w) in bad.items())
        raise ValueError(f"this config cannot be saved as model_type {cfg.model_type!r}: {detail}")
