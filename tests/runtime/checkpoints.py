"""Tiny random GPT-2 and Llama (GQA) checkpoints with a tokenizer beside them (GPT-2: byte-level BPE,
Llama: Metaspace BPE), built with transformers in a temporary folder (no downloads). Weights are drawn 10x HF's init so the
logits are far from uniform: greedy decoding has no near-ties that rounding could flip."""
import torch

from tests.runtime.tokenizers_util import BYTE_LEVEL_EOS, METASPACE_EOS, train_byte_level_bpe, train_metaspace_bpe

CONTEXT = 96

CONFIGS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=CONTEXT),
    "llama_gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=CONTEXT),
}


def build_checkpoint(name: str, folder):
    """Save model + tokenizer into folder; returns the transformers model (fp32, eval)."""
    import transformers as tf

    tokenizer, eos = (train_byte_level_bpe(), BYTE_LEVEL_EOS) if name == "gpt2" else (train_metaspace_bpe(), METASPACE_EOS)
    eos_id = tokenizer.token_to_id(eos)
    config_cls, model_cls = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
                             "llama_gqa": (tf.LlamaConfig, tf.LlamaForCausalLM)}[name]
    config = config_cls(vocab_size=tokenizer.get_vocab_size(), bos_token_id=eos_id, eos_token_id=eos_id,
                        **CONFIGS[name])
    torch.manual_seed(1234)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname:
                continue
            p.mul_(10.0) if p.dim() > 1 else p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos).save_pretrained(folder)
    return model
