"""CPU linear layers that use, per weight shape and batch size, the fastest of aten, oneDNN and fastlm's GEMV.

A decode step is a chain of matrix-vector products whose cost is reading the weights. Packing each
weight once into oneDNN's blocked layout (what torch.compile's CPU backend does with freezing) read it
2x faster than aten's F.linear on the project's AMD EPYC (fp32 18 -> 36 GB/s, bf16 15 -> 34 GB/s at
batch 1, one thread) but ~15% slower on an Intel Xeon with AMX (fp32, 768 x 3072). So the choice is
measured on the machine at hand (fastlm.kernels.cpu_choice): for each (dtype, weight shape, size
class of the input rows, threads) the candidates are timed once and the fastest is cached on disk;
FASTLM_CPU_KERNELS=aten|onednn|gemv forces one. The third candidate, for decode-sized inputs (up to 16
rows), is fastlm.kernels.gemv's C++ kernel where it builds on the machine: on the same AMD EPYC it
read bf16 weights at the memory's bandwidth where oneDNN read them at ~0.75 of it.

pack_linears(model) swaps each nn.Linear of at least MIN_PACKED_BYTES for a PackedLinear that keeps
the original Parameters (state dict keys and tied weights unchanged) plus the packed copy, so these
layers cost their weights' memory twice. Layers of one (dtype, shape) share a LinearShapeGroup holding
the choices; a size class is decided at its first call, timed on a pass over several of the group's
weights (as a decode step reads them: from memory, not from a cache holding one weight). Smaller
weights stay nn.Linear (a packed call costs ~10 us more; call overhead dominates there). Inference
only: no autograd through the packed weight, and it does not follow later changes of the Parameters
(call pack_linears again after loading new weights). The tensor-parallel layers of
fastlm.model.parallel are packed too (PackedParallelLinear: the packed product, then their collective).
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.kernels import cpu_choice
from fastlm.kernels.gemv import cpu_gemv_available, gemv_op

MIN_PACKED_BYTES = 1 << 20  # smaller weights stay nn.Linear
SIZE_CLASSES = (1, 16, None)  # upper bounds of input rows per class: batch-1 decode, batched decode, prefill
TIMING_ROWS = (1, 8, 64)  # rows the candidates are timed with, per class
CLASS_LABELS = ("rows=1", "rows<=16", "rows>16")  # in the cache keys and fastlm bench's report
TIMING_BYTES = 32 << 20  # weights read per timed pass in the decode classes (beyond the L2/L3 caches)


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


def size_class(rows: int) -> int:
    """Index into SIZE_CLASSES of an input with `rows` rows."""
    for index, bound in enumerate(SIZE_CLASSES):
        if bound is None or rows <= bound:
            return index
    raise AssertionError("unreachable: the last class has no bound")


GEMV_CLASSES = (0, 1)  # size classes offered fastlm's GEMV (decode); prefill is a GEMM's job


class LinearShapeGroup:
    """The PackedLinears of one (dtype, out, in) and their choice per size class ("aten" | "onednn" |
    "gemv")."""

    def __init__(self, dtype: torch.dtype, out_features: int, in_features: int):
        self.dtype, self.out_features, self.in_features = dtype, out_features, in_features
        self.members = []
        self.choices = [None] * len(SIZE_CLASSES)

    def key(self, index: int) -> str:
        """The cache key; it names the candidates, so a choice cached before a candidate existed is not
        taken for one among all of them."""
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{dtype}|{self.out_features}x{self.in_features}|{CLASS_LABELS[index]}|t{torch.get_num_threads()}"
                f"|{'+'.join(self.candidate_names(index))}")

    @staticmethod
    def candidate_names(index: int) -> tuple:
        return ("aten", "onednn", "gemv") if index in GEMV_CLASSES and cpu_gemv_available() else ("aten", "onednn")

    def choice(self, index: int) -> str:
        if self.choices[index] is None:
            self.choices[index] = cpu_choice.choose("linear", self.key(index), self._candidates(index))
        return self.choices[index]

    def _candidates(self, index: int) -> dict:
        """Each candidate runs TIMING_ROWS[index] rows through a pass over some of the members."""
        weight_bytes = self.out_features * self.in_features * self.members[0].weight.element_size()
        count = 1 if SIZE_CLASSES[index] is None else max(1, min(len(self.members), TIMING_BYTES // weight_bytes))
        members = self.members[:count]
        x = torch.randn(TIMING_ROWS[index], self.in_features, dtype=self.dtype)

        def run(kind):
            with torch.no_grad():
                for m in members:
                    m.run(kind, x)
        return {name: (lambda kind=name: run(kind)) for name in self.candidate_names(index)}


class PackedLinear(nn.Module):
    """y = x W^T + b through aten or oneDNN's prepacked W, as measured fastest for x's size class;
    same Parameters as the nn.Linear it replaces."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 8, group: LinearShapeGroup = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self._weight = linear.weight.detach()
        self._bias = None if linear.bias is None else linear.bias.detach()  # shares storage, no autograd
        self._op = torch.ops.mkldnn._linear_pointwise.default  # resolved once: this runs ~50x per token
        self.group = group or LinearShapeGroup(linear.weight.dtype, self.out_features, self.in_features)
        self.group.members.append(self)

    def run(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "onednn":
            return self._op(x, self.packed, self._bias, "none", [], "")
        if kind == "gemv":  # x (..., in) of CPU fp32/bf16, the module's dtype: what the op takes, as 2-D
            y = gemv_op(x.reshape(-1, self.in_features), self._weight, self._bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self._weight, self._bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # ~50 calls per token: kept to a few Python steps
        rows = x.numel() // self.in_features if self.in_features else 0
        index = 0 if rows <= SIZE_CLASSES[0] else (1 if rows <= SIZE_CLASSES[1] else 2)
        if torch.compiler.is_compiling():
            # The GEMV where it was chosen (decided eagerly before tracing), else a plain linear: the
            # compiler packs and tunes its own GEMM.
            kind = "gemv" if self.group.choices[index] == "gemv" else "aten"
            return self.run(kind, x)
        return self.run(self.group.choices[index] or self.group.choice(index), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedParallelLinear(PackedLinear):
    """A tensor-parallel layer (fastlm.model.parallel: RowParallelLinear, ParallelLMHead) with its local
    product packed: y = finish(x W_r^T + local_bias), finish being its all-reduce or gather."""

    def __init__(self, layer: nn.Linear, batch_hint: int = 8, group: LinearShapeGroup = None):
        super().__init__(layer, batch_hint, group)
        bias = layer.local_bias
        self._bias = None if bias is None else bias.detach()  # the bias counts on one rank only
        self.finish = layer.finish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(super().forward(x))


def _packable(module: nn.Module) -> bool:
    """A plain nn.Linear, or a tensor-parallel one (a local product, then `finish`)."""
    return type(module) is nn.Linear or (isinstance(module, nn.Linear) and hasattr(module, "finish"))


def pack_linears(model: nn.Module, batch_hint: int = 8, min_bytes: int = MIN_PACKED_BYTES) -> int:
    """Replace every nn.Linear of model (fp32 or bf16, CPU) whose weight has at least min_bytes by a
    PackedLinear (PackedParallelLinear for the tensor-parallel layers), in place (layers of one dtype and
    shape share a LinearShapeGroup); returns how many. ValueError for an unknown FASTLM_CPU_KERNELS
    value (now, not at the first forward)."""
    cpu_choice.forced_choice("linear")
    targets = [(name, module) for name, module in model.named_modules()
               if _packable(module) and module.weight.numel() * module.weight.element_size() >= min_bytes]
    groups = {}
    for name, linear in targets:
        shape = (linear.weight.dtype, linear.out_features, linear.in_features)
        group = groups.setdefault(shape, LinearShapeGroup(*shape))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        packed = PackedLinear if type(linear) is nn.Linear else PackedParallelLinear
        setattr(parent, child, packed(linear, batch_hint, group))
    return len(targets)


def linear_choices(model: nn.Module) -> dict:
    """{"dtype|out x in|size class|threads": "aten" | "onednn"} for the size classes decided so far."""
    seen, out = set(), {}
    for module in model.modules():
        if isinstance(module, PackedLinear) and id(module.group) not in seen:
            seen.add(id(module.group))
            out.update({module.group.key(i): c for i, c in enumerate(module.group.choices) if c is not None})
    return out
