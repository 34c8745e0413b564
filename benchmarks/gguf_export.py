"""Write a GPT-2 or Llama transformers checkpoint as a GGUF file for llama.cpp (fp32 or bf16), with the
`gguf` package (pip install gguf). Used by bench_llamacpp.py on random checkpoints.

The tensor names, shapes and the Llama q/k row permutation follow llama.cpp's convert_hf_to_gguf.py:
GPT-2's Conv1D weights (in, out) are transposed to (out, in); Llama's q and k rows go from the
rotate-half RoPE layout to llama.cpp's interleaved pairs. 1-D tensors (norms, biases) stay fp32, as the
converter keeps them. The GPT-2 head stays tied (no output.weight: llama.cpp reuses token_embd).
The vocabulary is a stand-in (the benchmark feeds token ids, never text): GPT-2's 256 byte tokens,
then placeholders, one merge; llama.cpp needs a BPE vocabulary with merges and a newline token to load.
"""
import torch

BYTE_TOKENS = 256

Q8_0 = "q8_0"  # write_gguf's name for llama.cpp's 8-bit format


def _byte_chars():
    """GPT-2's printable stand-in character for each byte (bytes_to_unicode)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _add_vocab(writer, gguf, vocab_size: int) -> None:
    if vocab_size < BYTE_TOKENS + 1:
        raise ValueError(f"vocab_size must be > {BYTE_TOKENS} for the stand-in vocabulary, got {vocab_size}")
    tokens = _byte_chars() + ["Ġt"] + [f"<tok{i}>" for i in range(BYTE_TOKENS + 1, vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(vocab_size - 1)
    writer.add_eos_token_id(vocab_size - 1)


def _tensor(writer, gguf, name: str, t: torch.Tensor, dtype) -> None:
    t = t.detach().contiguous()
    if t.dim() == 1 or dtype == torch.float32:
        writer.add_tensor(name, t.float().numpy())
    elif dtype == Q8_0:  # llama.cpp's own quantizer (gguf-py): blocks of 32 int8 with one fp16 scale
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(t.float().numpy(), qtype), raw_dtype=qtype)
    else:  # bf16 bits as int16, tagged BF16
        writer.add_tensor(name, t.to(torch.bfloat16).view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k from rotate-half to interleaved RoPE pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gpt2(writer, gguf, cfg, sd, dtype):
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    put = lambda name, t: _tensor(writer, gguf, name, t, dtype)  # noqa: E731
    put("token_embd.weight", sd["transformer.wte.weight"])
    put("position_embd.weight", sd["transformer.wpe.weight"])
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        for hf, ours in names.items():
            weight = sd[f"transformer.h.{i}.{hf}.weight"]
            put(f"blk.{i}.{ours}.weight", weight if weight.dim() == 1 else weight.t())  # Conv1D: (in, out)
            put(f"blk.{i}.{ours}.bias", sd[f"transformer.h.{i}.{hf}.bias"])
    put("output_norm.weight", sd["transformer.ln_f.weight"])
    put("output_norm.bias", sd["transformer.ln_f.bias"])


def _llama(writer, gguf, cfg, sd, dtype):
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    writer.add_rope_dimension_count(head_dim)
    put = lambda name, t: _tensor(writer, gguf, name, t, dtype)  # noqa: E731
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, ours in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            put(f"blk.{i}.{ours}.weight", sd[p + f"mlp.{hf}.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])


def write_gguf(hf_model, path: str, dtype) -> str:
    """hf_model: a transformers GPT2LMHeadModel or LlamaForCausalLM; dtype: torch.float32, torch.bfloat16 or
    "q8_0" (every matrix, embeddings and LM head included, in llama.cpp's Q8_0; vectors in F32)."""
    import gguf

    if dtype not in (torch.float32, torch.bfloat16, Q8_0):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or {Q8_0!r}, got {dtype!r}")
    cfg = hf_model.config
    arch = {"gpt2": "gpt2", "llama": "llama"}.get(cfg.model_type)
    if arch is None:
        raise ValueError(f"model_type must be gpt2 or llama, got {cfg.model_type!r}")
    writer = gguf.GGUFWriter(path, arch)
    file_types = {torch.float32: "ALL_F32", torch.bfloat16: "MOSTLY_BF16", Q8_0: "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[dtype]))
    _add_vocab(writer, gguf, cfg.vocab_size)
    (_gpt2 if arch == "gpt2" else _llama)(writer, gguf, cfg, hf_model.state_dict(), dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
