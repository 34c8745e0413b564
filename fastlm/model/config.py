"""ModelConfig: the few fields in which GPT-2 and the Llama family (Llama 2/3, Mistral, Qwen2) differ,
read from a Hugging Face `config.json` (both the transformers 4 and 5 spellings of RoPE settings)."""
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from fastlm.model.hf_config import config_kwargs_from_hf, config_to_hf
from fastlm.model.json_files import read_json_object
from fastlm.model.validation import check_choice, check_positive_int

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
MLP_KINDS = ("gelu_tanh", "gelu", "swiglu")


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # rows of the token embedding (and of the LM head)
    dim: int = 512  # hidden size of the residual stream
    n_layer: int = 8  # number of transformer blocks
    n_head: int = 8  # query heads
    n_kv_head: Optional[int] = None  # key/value heads (GQA when < n_head); None -> n_head
    head_dim: Optional[int] = None  # per-head width; None -> dim // n_head (Llama configs may set it)
    intermediate_size: Optional[int] = None  # MLP hidden width; None -> 4*dim (GELU) or ~8/3*dim (SwiGLU)
    max_seq_len: int = 2048  # longest context the model computes exactly (positions 0..max_seq_len-1)
    model_type: str = "llama"  # HF family written back by save_pretrained: gpt2 / llama / mistral / qwen2
    norm: str = "rmsnorm"  # "layernorm" (GPT-2, with bias) or "rmsnorm" (Llama family)
    norm_eps: float = 1e-6  # epsilon inside the norm
    pos_emb: str = "rope"  # "learned" absolute positions (GPT-2) or "rope" (rotary, HF rotate_half layout)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[dict] = None  # None, {"rope_type": "linear", "factor"} or Llama-3's "llama3" dict
    mlp: str = "swiglu"  # "gelu_tanh" (GPT-2 gelu_new), "gelu" (exact) or "swiglu" (silu(gate) * up)
    qkv_bias: bool = False  # bias on the q/k/v projections (GPT-2, Qwen2, Llama attention_bias)
    attn_out_bias: bool = False  # bias on the attention output projection (GPT-2, Llama attention_bias)
    mlp_bias: bool = False  # biases in the MLP projections (GPT-2, Llama mlp_bias)
    tie_embeddings: bool = False  # LM head shares the token embedding matrix
    sliding_window: Optional[int] = None  # the checkpoint's window (informational: max_seq_len is capped to it)
    bos_token_id: Optional[int] = None  # from config.json, kept for the round trip to HF
    eos_token_id: Union[int, list, None] = None  # int or list (Llama 3), kept for the round trip to HF
    torch_dtype: Optional[str] = None  # the checkpoint's dtype ("bfloat16", ...), default dtype for loading

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "dim", "n_layer", "n_head", "max_seq_len"):
            check_positive_int(name, getattr(self, name))
        self.n_kv_head = self.n_head if self.n_kv_head is None else self.n_kv_head
        check_positive_int("n_kv_head", self.n_kv_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim is None:
            if self.dim % self.n_head:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_head ({self.n_head}) unless head_dim is given")
            self.head_dim = self.dim // self.n_head
        check_positive_int("head_dim", self.head_dim)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.dim if self.mlp != "swiglu" else 64 * math.ceil(8 * self.dim / 3 / 64)
        check_positive_int("intermediate_size", self.intermediate_size)
        check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice("pos_emb", self.pos_emb, ("learned", "rope"))
        check_choice("mlp", self.mlp, MLP_KINDS)
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.pos_emb == "rope":
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None and self.sliding_window < self.max_seq_len:
            # Within the window, sliding-window attention equals full causal attention (HF masks keys with
            # q_pos - k_pos >= window). We do not implement the window, so we refuse longer contexts
            # rather than silently compute a different model.
            self.max_seq_len = self.sliding_window

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.dim * (self.n_head + 2 * self.n_kv_head) * self.head_dim + self.n_head * self.head_dim * self.dim
        n_mlp = 3 if self.mlp == "swiglu" else 2
        per_layer = attn + n_mlp * self.dim * self.intermediate_size
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * self.dim if self.pos_emb == "learned" else 0
        return self.n_layer * per_layer + emb + pos

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, folder_or_dict) -> "ModelConfig":
        """Read a HF config: a checkpoint folder (its config.json), a path to a json file, or a dict."""
        hf = _read_hf_dict(folder_or_dict)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        return cls(**config_kwargs_from_hf(hf))

    def to_hf(self) -> dict:
        """config.json contents in the HF format of this model's family."""
        return config_to_hf(self)


def _read_hf_dict(folder_or_dict) -> dict:
    if isinstance(folder_or_dict, dict):
        return folder_or_dict
    if not isinstance(folder_or_dict, (str, Path)):
        raise ValueError(f"folder_or_dict must be a path or a dict, got {type(folder_or_dict).__name__}")
    path = Path(folder_or_dict)
    if path.is_dir() or path.suffix != ".json":
        path = path / "config.json"
    return read_json_object(path, missing_ok=False)


def _check_rope_scaling(scaling):
    """Normalize a RoPE scaling dict; reject the kinds we do not implement (dynamic, yarn, longrope...)."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    required = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for key in required:
        if not isinstance(scaling.get(key), (int, float)) or not scaling[key] > 0:
            raise ValueError(f"rope_scaling[{key!r}] must be a positive number for rope_type {rope_type!r}, got {scaling.get(key)!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("rope_scaling high_freq_factor must be greater than low_freq_factor")
    return scaling
