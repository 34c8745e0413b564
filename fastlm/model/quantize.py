"""Weight-only quantization of a Transformer's linear layers, and the quantized checkpoint format.

The linear layers of every block (attention wqkv and wo, MLP w_up and w_down) become
fastlm.kernels.QuantLinear; norms and biases stay in the model's float dtype, and so do the token
embedding and the LM head unless quantize_head: then the embedding becomes a fastlm.kernels.QuantEmbedding
and the head a QuantLinear in the same format (for tied embeddings one set of tensors serves both). The formats are fastlm.kernels.quant's (int8 per output channel, int4 groups
of 32/64/128 input columns, padded when the input width is not a multiple of the group).

On disk: the checkpoint folder of the model's family, plus in config.json

    "quantization_config": {"quant_method": "fastlm", "format_version": 1, "bits": 4, "group_size": 128,
                            "quantize_head": false}

and, in model.safetensors, for each quantized HF weight `P.weight` (e.g. model.layers.0.self_attn.q_proj.weight):
`P.weight` int8 (out, in) or uint8 (out, padded in / 2) -- always (out, in), also for GPT-2's Conv1D
layers that store float weights transposed --, `P.weight_scale` fp32 and, for int4, `P.weight_zero`
fp32; with quantize_head also the embedding table (and the untied head). Format version 2 (version 1
stored a tied model's quantized head as its own copy beside a float embedding: with quantize_head true,
re-run `fastlm quantize`; without it both versions are the same). A fused layer (Llama's q/k/v, gate/up) is stored per HF part: rows split cleanly because scales
are per row (int8) or per row and group (int4). Loading reads these tensors as they are (no
re-quantizing); other float tensors load in the requested dtype. transformers cannot load this format.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from fastlm.kernels.quant import INT4_GROUP_SIZES, QuantEmbedding, QuantLinear
from fastlm.model.json_files import read_json_object
from fastlm.model.validation import check_choice
from fastlm.model.weight_map import Entry

QUANT_METHOD = "fastlm"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_BLOCK_LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_up", "mlp.w_down")


@dataclass(frozen=True)
class QuantConfig:
    bits: int  # 8 or 4
    group_size: Optional[int] = None  # int4: input columns per scale/zero group
    quantize_head: bool = False  # also quantize the token embedding and the LM head

    def __post_init__(self):
        check_choice("bits", self.bits, (8, 4))
        if self.bits == 4:
            check_choice("group_size", self.group_size, INT4_GROUP_SIZES)
        elif self.group_size is not None:
            raise ValueError(f"group_size applies to int4 only, got {self.group_size!r} with int8")

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    def to_json(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": self.bits,
                "group_size": self.group_size, "quantize_head": self.quantize_head}

    @classmethod
    def from_json(cls, entry, source) -> "QuantConfig":
        method = entry.get("quant_method") if isinstance(entry, dict) else None
        if method != QUANT_METHOD:
            raise ValueError(f"{source}: quantization_config with quant_method {method!r} is not supported; "
                             f"fastlm loads only its own format (quant_method {QUANT_METHOD!r}, `fastlm quantize`)")
        version = entry.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"{source}: quantization format_version {version!r} is not supported (this fastlm "
                             f"reads versions {', '.join(map(str, _READABLE_VERSIONS))})")
        try:
            qcfg = cls(entry["bits"], entry.get("group_size"), bool(entry.get("quantize_head", False)))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{source}: invalid quantization_config ({e})") from None
        if version == 1 and qcfg.quantize_head:
            raise ValueError(f"{source}: format_version 1 with quantize_head (a separate quantized head copy) is no "
                             "longer read; quantize the original checkpoint again with `fastlm quantize`")
        return qcfg


def parse_quantize(quantize, quantize_head: bool = False) -> Optional[QuantConfig]:
    """The `quantize` argument: None, "int8", "int4" (groups of 128) or "int4-g32" / "-g64" / "-g128"."""
    if quantize is None:
        return None
    names = {"int8": (8, None), "int4": (4, 128), **{f"int4-g{g}": (4, g) for g in INT4_GROUP_SIZES}}
    bits, group = names[check_choice("quantize", quantize, tuple(names))]
    return QuantConfig(bits, group, quantize_head)


def quantized_linear_names(model, qcfg: QuantConfig):
    """Names of the nn.Linear modules a QuantConfig quantizes, in model order."""
    names = [f"layers.{i}.{suffix}" for i in range(len(model.layers)) for suffix in _BLOCK_LINEARS]
    return names + (["lm_head"] if qcfg.quantize_head else [])


def quantize_model(model, qcfg: QuantConfig):
    """Replace the model's linear layers (and with quantize_head its embedding) by quantized modules,
    quantizing their weights, in place (returns model). The layers must still be plain nn.Linear
    (quantize before CPU prepacking)."""
    names = quantized_linear_names(model, qcfg)
    if qcfg.quantize_head:
        names.remove("lm_head")
        model.tok_emb = _quantized_embedding(model.tok_emb, qcfg)
        _quantize_head(model, qcfg)
    for name in names:
        _set_module(model, name, _quantized_linear(model.get_submodule(name), name, qcfg))
    model.quant_config = qcfg
    return model


def _quantized_linear(linear, name, qcfg):
    if type(linear) is not nn.Linear:
        raise ValueError(f"layer {name} is a {type(linear).__name__}, not an nn.Linear: quantize an unquantized, "
                         "unpacked model")
    try:
        return QuantLinear.from_linear(linear, qcfg.bits, qcfg.group_size or 128)
    except ValueError as e:
        raise ValueError(f"cannot quantize layer {name} ({linear.out_features} x {linear.in_features}) "
                         f"to {qcfg.name}: {e}") from None


def _quantized_embedding(embedding, qcfg):
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"tok_emb is a {type(embedding).__name__}, not an nn.Embedding: quantize an unquantized model")
    try:
        return QuantEmbedding.from_embedding(embedding, qcfg.bits, qcfg.group_size or 128)
    except ValueError as e:
        raise ValueError(f"cannot quantize the token embedding ({embedding.num_embeddings} x "
                         f"{embedding.embedding_dim}) to {qcfg.name}: {e}") from None


def _quantize_head(model, qcfg):
    """The LM head as a QuantLinear: its own tensors, or for tied embeddings the embedding's."""
    if not model.config.tie_embeddings:
        model.lm_head = _quantized_linear(model.lm_head, "lm_head", qcfg)
        return
    emb = model.tok_emb
    head = QuantLinear(emb.embedding_dim, emb.num_embeddings, qcfg.bits, qcfg.group_size or 128, bias=False,
                       device="meta")
    model.lm_head = head
    tie_quantized_head(model)


def tie_quantized_head(model):
    """Point a tied model's quantized head at its quantized embedding's tensors (after loading them)."""
    for name, buffer in model.tok_emb.named_buffers():
        setattr(model.lm_head, name, buffer)


def prepare_quantized(model, qcfg: QuantConfig, dtype=None):
    """Swap in empty quantized modules (on the model's device, meta while loading) for a checkpoint saved
    in the quantized format; dtype: what a quantized embedding returns (default: the model's)."""
    for name in quantized_linear_names(model, qcfg):
        linear = model.get_submodule(name)
        device = linear.weight.device
        _set_module(model, name, QuantLinear(linear.in_features, linear.out_features, qcfg.bits,
                                             qcfg.group_size or 128, linear.bias is not None, device=device))
    if qcfg.quantize_head:
        emb = model.tok_emb
        model.tok_emb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, qcfg.bits, qcfg.group_size or 128,
                                       dtype=dtype or emb.weight.dtype, device=emb.weight.device)
    model.quant_config = qcfg
    return model


def quantized_entries(entries, model):
    """The weight map of a quantized model: each quantized `.weight` entry also brings `.weight_scale`
    (and `.weight_zero`), all stored untransposed; a tied quantized head is stored once, as the embedding."""
    quantized = {name + ".weight": m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    out = []
    for entry in entries:
        if entry.ours not in quantized:
            out.append(entry)
            continue
        suffixes = ("weight", "weight_scale") + (("weight_zero",) if quantized[entry.ours].bits == 4 else ())
        for suffix in suffixes:
            out.append(Entry(_with_suffix(entry.ours, suffix), tuple(_with_suffix(h, suffix) for h in entry.hf),
                             entry.sizes, transpose=False))
    return out


def _with_suffix(weight_name: str, suffix: str) -> str:
    return weight_name[: -len("weight")] + suffix


def _set_module(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def read_quant_config(folder) -> Optional[QuantConfig]:
    """The QuantConfig of a checkpoint folder's config.json, None for a float checkpoint."""
    path = Path(folder) / "config.json"
    entry = read_json_object(path, missing_ok=False).get("quantization_config")
    return None if entry is None else QuantConfig.from_json(entry, path)
