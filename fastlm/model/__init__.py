"""fastlm.model: ModelConfig, the decoder Transformer (GPT-2 and Llama families), AttentionMetadata
(one step over a paged KV pool), HF checkpoint loading/saving and tokenizer loading. Never imports
transformers."""
from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.model.config import SUPPORTED_MODEL_TYPES, ModelConfig
from fastlm.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "AttentionMetadata", "load_tokenizer", "SUPPORTED_MODEL_TYPES"]


def __getattr__(name):
    # The tokenizer wrapper imports the `tokenizers` library; load it only when asked for.
    if name in ("load_tokenizer", "Tokenizer"):
        from fastlm.model import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'fastlm.model' has no attribute {name!r}")
