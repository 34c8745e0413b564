"""Put fastlm's kernels inside a loaded transformers model, in place: `patch(model)`.

What it does, per model (GPT-2, Llama, Mistral, Qwen2):
  - norms: each norm module (GPT-2's nn.LayerNorm, the families' *RMSNorm) is replaced by fastlm's
    LayerNorm/RMSNorm holding the *same* Parameter objects, so state-dict keys, optimizers and tied
    weights keep working;
  - attention: the model's config gets `_attn_implementation = "fastlm"`, a name registered in
    transformers' AttentionInterface (its documented extension point). The fastlm function runs
    `flash_attention` (layout (B, S, H, D), GQA native, causal bottom-right) when the mask is plain
    causal, i.e. when transformers' SDPA mask builder returned None; with a padding or sliding-window
    mask, dropout, attention weights requested, or anything else flash_attention cannot express, it
    calls the model's previous implementation (eager or sdpa) and counts the fallback.

No global state leaks into other models: registering the name "fastlm" changes nothing for a model
that does not select it, and the patched model gets its own copy of its config (models built from one
config object share it, and the attention implementation is read from there).

transformers is imported here, inside `patch()`, never when fastlm.kernels is imported.
"""
import copy
import sys
from dataclasses import dataclass, field

import torch

from fastlm.kernels.attention import flash_attention
from fastlm.kernels.norms import LayerNorm, RMSNorm

ATTENTION_NAME = "fastlm"

# model_type -> (norm class name, attention class name); GPT-2's norm is torch.nn.LayerNorm.
SUPPORTED_MODELS = {
    "gpt2": ("LayerNorm", "GPT2Attention"),
    "llama": ("LlamaRMSNorm", "LlamaAttention"),
    "mistral": ("MistralRMSNorm", "MistralAttention"),
    "qwen2": ("Qwen2RMSNorm", "Qwen2Attention"),
}
# keyword arguments of the attention interface that flash_attention cannot honour when set
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


@dataclass
class PatchReport:
    """What `patch` changed. The call counters keep counting as the model runs (not under torch.compile)."""

    model_type: str
    norms_replaced: list = field(default_factory=list)  # qualified module names now fastlm norms
    attention_modules: list = field(default_factory=list)  # qualified names of attention modules routed to fastlm
    attention_implementation: str = None  # config._attn_implementation after patching
    fallback_implementation: str = None  # what runs when flash_attention can't express the call
    flash_calls: int = 0  # attention calls served by fastlm.kernels.flash_attention
    fallback_calls: int = 0  # attention calls handed to fallback_implementation
    fallback_reasons: dict = field(default_factory=dict)  # reason -> count

    @property
    def num_norms_replaced(self) -> int:
        return len(self.norms_replaced)

    @property
    def num_attention_modules(self) -> int:
        return len(self.attention_modules)


def patch(model, norms: bool = True, attention: bool = True) -> PatchReport:
    """Replace `model`'s norms and attention with fastlm kernels, in place; return a PatchReport.

    model: a transformers PreTrainedModel of type gpt2, llama, mistral or qwen2 (base or *ForCausalLM).
    norms / attention: which parts to patch. Patching twice is harmless (already patched parts are kept).
    Raises ValueError for any other model, listing the supported model types.
    """
    model_type = _model_type(model)
    if not isinstance(norms, bool) or not isinstance(attention, bool):
        raise ValueError(f"norms and attention must be bools, got norms={norms!r}, attention={attention!r}")
    report = PatchReport(model_type=model_type, attention_implementation=model.config._attn_implementation)
    norm_class, attention_class = SUPPORTED_MODELS[model_type]
    if norms:
        report.norms_replaced = _replace_norms(model, norm_class)
    if attention:
        _route_attention(model, attention_class, report)
    return report


def _model_type(model) -> str:
    supported = ", ".join(sorted(SUPPORTED_MODELS))
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, torch.nn.Module) or model_type not in SUPPORTED_MODELS:
        got = model_type or type(model).__name__
        raise ValueError(f"model must be a transformers model of type {supported}; got {got!r}")
    return model_type


# ----------------------------------------------------------------------------------------------- norms

def _replace_norms(model, norm_class: str) -> list:
    """Swap each matching norm for a fastlm one sharing its Parameters; return the qualified names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ != norm_class or isinstance(module, (LayerNorm, RMSNorm)):
            continue  # not this family's norm, or already fastlm's
        new = _fastlm_norm(module)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced.append(name)
    return replaced


def _fastlm_norm(module):
    """A fastlm norm equivalent to `module`, holding its Parameter objects; None if there is none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if isinstance(module, torch.nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return None
        new = LayerNorm(weight.shape[0], eps=module.eps, bias=module.bias is not None, device="meta")
        new.bias = module.bias
    else:
        new = RMSNorm(weight.shape[0], eps=module.variance_epsilon, device="meta")
    new.weight = weight  # the same Parameter: optimizers and state dicts see no change
    new.train(module.training)
    return new


# ------------------------------------------------------------------------------------------- attention

@dataclass
class _Route:
    """Attached to each patched attention module: where to fall back, and whom to tell."""

    fallback_name: str
    fallback: object
    report: PatchReport


def _route_attention(model, attention_class: str, report: PatchReport) -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    # Registering a new name is transformers' extension point; models not selecting it are untouched.
    AttentionInterface.register(ATTENTION_NAME, fastlm_attention_forward)
    # SDPA's mask builder returns None exactly when the mask is plain causal: that is our test.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)

    previous = model.config._attn_implementation
    modules = [(n, m) for n, m in model.named_modules() if type(m).__name__ == attention_class]
    if previous == ATTENTION_NAME and all(hasattr(m, "_fastlm_route") for _, m in modules):
        # already patched: keep the routes (and their fallback); the newest report does the counting
        for _, module in modules:
            module._fastlm_route.report = report
        report.fallback_implementation = modules[0][1]._fastlm_route.fallback_name if modules else "sdpa"
    else:
        report.fallback_implementation = previous if previous in ("eager", "sdpa") else "sdpa"
        for _, module in modules:
            fallback = _fallback_function(module, report.fallback_implementation, ALL_ATTENTION_FUNCTIONS)
            module._fastlm_route = _Route(report.fallback_implementation, fallback, report)
        _give_private_config(model)
        model.config._attn_implementation = ATTENTION_NAME
    report.attention_modules = [n for n, _ in modules]
    report.attention_implementation = model.config._attn_implementation


def _fallback_function(module, name: str, registry):
    if name == "sdpa":
        return registry["sdpa"]
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's eager path has this variant
        return _gpt2_reordered_attention
    return sys.modules[type(module).__module__].eager_attention_forward  # the modeling file's own


def _gpt2_reordered_attention(module, query, key, value, attention_mask, **kwargs):
    return module._upcast_and_reordered_attn(query, key, value, attention_mask)


def _give_private_config(model) -> None:
    """Models built from one config object share it; give this one a copy so setting its attention
    implementation cannot reach the others. Every submodule holding the old config is re-pointed."""
    old = model.config
    new = copy.deepcopy(old)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def fastlm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention-interface function: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
    route = getattr(module, "_fastlm_route", None)
    reason = _fallback_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    if reason is None and route is not None and route.fallback_name == "eager" and _weights_requested(kwargs):
        reason = "attention weights requested"
    if reason is None and route is not None:
        _count(route.report, None)
        out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              causal=True, softmax_scale=scaling)
        return out, None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fallback_name = route.fallback_name if route is not None else "sdpa"
    fallback = route.fallback if route is not None else ALL_ATTENTION_FUNCTIONS["sdpa"]
    if route is not None:
        _count(route.report, reason)
    if fallback_name == "eager":
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        attention_mask = _additive_mask(attention_mask, query, key, causal)
    return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    is_causal=is_causal, **kwargs)


def _fallback_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
    """None when flash_attention computes exactly this call; else a short reason."""
    if attention_mask is not None:
        return "attention mask (padding, sliding window or custom)"
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return "not causal"
    if dropout:
        return "attention dropout"
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_ATTENTION_KWARGS):
        return "unsupported attention argument"
    if not (query.dtype == key.dtype == value.dtype) or query.shape[1] % key.shape[1]:
        return "mixed dtypes or head counts"
    if query.shape[-1] != key.shape[-1] or key.shape[-1] != value.shape[-1]:
        return "head dims differ"
    return None


def _weights_requested(kwargs) -> bool:
    """Whether the caller asked for attention weights (only eager computes them). transformers 5 records
    them with hooks, signalled through a context variable rather than an argument."""
    if kwargs.get("output_attentions"):
        return True
    if torch.compiler.is_compiling():  # context variables don't trace; compiled models don't record weights
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    return "attentions" in (_active_collector.get() or {})


def _count(report: PatchReport, reason) -> None:
    if torch.compiler.is_compiling():  # python counters would be baked into the graph
        return
    if reason is None:
        report.flash_calls += 1
        return
    report.fallback_calls += 1
    report.fallback_reasons[reason] = report.fallback_reasons.get(reason, 0) + 1


def _additive_mask(mask, query, key, causal):
    """Eager attention adds its mask: turn SDPA's boolean mask (True = attend), or None meaning plain
    causal (bottom-right aligned) for a causal module, into 0 / dtype-min."""
    if (mask is None and not causal) or (mask is not None and mask.dtype != torch.bool):
        return mask
    if mask is None:
        sq, sk = query.shape[-2], key.shape[-2]
        pos_q = torch.arange(sq, device=query.device)[:, None] + (sk - sq)
        mask = (torch.arange(sk, device=query.device)[None, :] <= pos_q)[None, None]
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)
