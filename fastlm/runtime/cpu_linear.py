"""Linear layers with oneDNN-prepacked weights, for fp32 and bf16 inference on CPU.

A decode step is a chain of matrix-vector products whose cost is reading the weights. Packing each
weight once into oneDNN's blocked layout (what torch.compile's CPU backend does with freezing) reads it
much closer to memory speed than aten's F.linear. Measured on the project's 2-core AMD EPYC (avx512_bf16),
one thread, GPT-2-124M's 49 weight matrices: bf16 15 -> 34 GB/s at batch 1, 13 -> 22 GB/s at batch 8;
fp32 18 -> 36 GB/s at batch 1, 9 -> 24 GB/s at batch 8; prefill-sized (128 rows) matmuls are faster too.
The batch hint 8 was as good or better than 1 at every size we measured. A packed call costs ~10 us
more than aten's for small weights that stay in cache, so weights under MIN_PACKED_BYTES stay as they are.

pack_linears(model) swaps each nn.Linear for a PackedLinear that keeps the original Parameters (state
dict keys and tied weights unchanged) plus the packed copy, so packed layers cost their weights' memory
twice. Inference only: no autograd through the packed weight, and the packed copy does not follow later
changes of the Parameters (call pack_linears again after loading new weights).
"""
import torch
from torch import nn

MIN_PACKED_BYTES = 1 << 20  # smaller weights: aten's linear is faster (call overhead dominates)


def packing_available(dtype: torch.dtype, device) -> bool:
    """True when oneDNN packing can run here: a CPU, fp32 or bf16 (with oneDNN bf16 support)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W prepacked by oneDNN; same Parameters as the nn.Linear it replaces."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self._bias = None if linear.bias is None else linear.bias.detach()  # shares storage, no autograd
        self._op = torch.ops.mkldnn._linear_pointwise.default  # resolved once: this runs ~50x per token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.packed, self._bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, batch_hint: int = 8, min_bytes: int = MIN_PACKED_BYTES) -> int:
    """Replace every nn.Linear of model (fp32 or bf16, CPU) whose weight has at least min_bytes by a
    PackedLinear, in place; returns how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.numel() * module.weight.element_size() >= min_bytes]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear, batch_hint))
    return len(targets)
