"""Linear layers with oneDNN-prepacked weights, for bf16 inference on CPU.

A decode step is a chain of matrix-vector products whose cost is reading the weights. For bf16 on x86
CPUs, aten's linear re-lays the weight out for oneDNN on every call; packing it once into oneDNN's
blocked layout (what torch.compile's CPU backend does with freezing) reads it at close to memory speed:
~1.8x the GB/s of plain F.linear measured on the project's 2-core AMD EPYC (avx512_bf16). Outputs are
the same oneDNN computation (bit-identical in our checks).

pack_linears(model) swaps each nn.Linear for a PackedLinear that keeps the original Parameters (state
dict keys and tied weights unchanged) plus the packed copy, so packed layers cost their weights' memory
twice. Inference only: no autograd through the packed weight, and the packed copy does not follow later
changes of the Parameters (call pack_linears again after loading new weights).
"""
import torch
from torch import nn


def packing_available(dtype: torch.dtype, device) -> bool:
    """True when oneDNN bf16 packing can run here (CPU, bf16, oneDNN with bf16 support)."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W prepacked by oneDNN; same Parameters as the nn.Linear it replaces."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self._bias = None if linear.bias is None else linear.bias.detach()  # shares storage, no autograd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self._bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, batch_hint: int = 1) -> int:
    """Replace every nn.Linear of model (bf16, CPU) by a PackedLinear, in place; returns how many."""
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear, batch_hint))
    return len(targets)
