"""Weight-only int8 and int4 linear layers: half and a quarter of the weight bytes a decode step reads.

Formats (the tensors a checkpoint stores; weights in the (out_features, in_features) = (N, K) layout):

int8, symmetric per output channel
    weight  int8 (N, K)             q = round(w / scale) clamped to [-127, 127]
    scale   fp32 (N,)               scale = max|w[n, :]| / 127
    w ~= q * scale, within scale / 2 of the original.

int4, asymmetric per group of G consecutive input columns (G in 32, 64, 128; default 128)
    weight  uint8 (N, Kp / 2)       two 4-bit values per byte: low nibble = column 2j, high = 2j + 1
    scale   fp32 (N, Kp / G)        scale = (max - min) / 15 of the group
    zero    fp32 (N, Kp / G)        zero = min + 8 * scale
    q = round((w - min) / scale) in [0, 15];  w ~= (q - 8) * scale + zero = q * scale + min, within
    scale / 2. Kp is K rounded up to a multiple of G: the padding columns hold zeros (their products meet
    no input). This is gpt-fast's and PyTorch's (_weight_int4pack_mm) decoding convention, so the CPU
    kernel takes the scales and zeros as they are.

    int8_linear(x, weight, scale, bias=None)       ~= x @ dequantize_int8(weight, scale).T + bias
    int4_linear(x, weight, scale, zero, bias=None)  ~= x @ dequantize_int4(weight, scale, zero, K).T + bias

Dispatch (fastlm.kernels._utils.use_triton): CUDA tensors run the Triton kernels of _quant.py (a GEMV up to
16 rows of x, a tensor-core GEMM beyond); so do CPU tensors under TRITON_INTERPRET=1. With
FASTLM_KERNELS=reference a GPU runs the fp32 reference. Other CPU calls go to _quant_cpu.py: PyTorch's packed
weight-only kernels (aten._weight_int8pack_mm, _weight_int4pack_mm_for_cpu) or dequantize + F.linear,
whichever measured faster on this machine for that format, dtype and decode/prefill size (timed once
per process). On the Triton path and under torch.compile the linears go through the custom ops
fastlm::int8_linear / fastlm::int4_linear (fake implementations give the shapes, so compiled code has no
graph break; inference only, no autograd formula); eager CPU calls skip the op dispatch.
QuantLinear is the nn.Module that fastlm.model swaps in for nn.Linear.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import custom_op

from fastlm.kernels._quant import launch_int4_linear, launch_int8_linear
from fastlm.kernels import _quant_cpu
from fastlm.kernels._quant_cpu import int4_linear_cpu, int8_linear_cpu
from fastlm.kernels._utils import FLOAT_DTYPES, cdiv, check_tensor, eager_reference, rows, use_triton

INT4_GROUP_SIZES = (32, 64, 128)
_MIN_SCALE = 1e-12  # constant rows / groups: any positive scale reproduces them exactly


def _check_weight(w):
    check_tensor("w", w, ndim=2)
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("w has non-finite values (inf or NaN); they cannot be quantized")


def quantize_int8(w: torch.Tensor):
    """(weight int8 (N, K), scale fp32 (N,)) of a float weight w (N, K); see the module docstring."""
    _check_weight(w)
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(_MIN_SCALE)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int = 128):
    """(weight uint8 (N, Kp/2), scale fp32 (N, Kp/G), zero fp32 (N, Kp/G)) of a float weight w (N, K),
    K zero-padded to Kp, a multiple of group_size; see the module docstring."""
    _check_weight(w)
    _check_group_size(group_size)
    N, K = w.shape
    Kp = cdiv(K, group_size) * group_size
    groups = F.pad(w.detach().float(), (0, Kp - K)).view(N, Kp // group_size, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((hi - lo) / 15).clamp_min(_MIN_SCALE)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(N, Kp)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale, lo + 8 * scale


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """w (N, K) in dtype (computed in fp32) from quantize_int8's tensors."""
    _check_int8(weight, scale)
    return (weight.float() * scale.float()[:, None]).to(dtype)


def dequantize_int4(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features=None,
                    dtype: torch.dtype = torch.float32):
    """w (N, in_features) in dtype (computed in fp32) from quantize_int4's tensors; in_features defaults
    to the padded Kp."""
    group = _check_int4(weight, scale, zero)
    N, Kp = weight.shape[0], 2 * weight.shape[1]
    K = Kp if in_features is None else _check_in_features(in_features, Kp, group, "in_features")
    q = torch.stack((weight & 15, weight >> 4), dim=2).view(N, Kp // group, group).float()
    w = (q - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.view(N, Kp)[:, :K].to(dtype)


def int8_linear_ref(x, weight, scale, bias=None):
    """The reference: x @ dequantize_int8(weight, scale).T + bias in fp32, cast to x's dtype."""
    return _linear_fp32(x, dequantize_int8(weight, scale), bias)


def int4_linear_ref(x, weight, scale, zero, bias=None):
    """The reference: x @ dequantize_int4(...).T + bias in fp32, cast to x's dtype."""
    return _linear_fp32(x, dequantize_int4(weight, scale, zero, x.shape[-1]), bias)


def _linear_fp32(x, w, bias):
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """y = x @ dequantize_int8(weight, scale).T (+ bias), in x's dtype.

    x (..., K) fp32/fp16/bf16; weight int8 (N, K) and scale (N,) from quantize_int8; bias (N,) or None.
    Inference only (no autograd through the quantized weight)."""
    _check_int8(weight, scale)
    _check_x(x, weight, weight.shape[1], "weight.shape[1]")
    _check_bias(bias, weight)
    x2 = rows(x, x.shape[-1])
    if eager_reference(x):  # not traced, no Triton: skip the op dispatch
        y = _int8_linear_untriton(x2, weight, scale, bias)
    elif name := _traced_cpu_path("int8", x2, weight.shape):
        y = _quant_cpu.run_int8(name, x2, weight, scale, bias, dequantize_int8)
    else:
        y = int8_linear_op(x2, weight, scale, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bias=None) -> torch.Tensor:
    """y = x @ dequantize_int4(weight, scale, zero, K).T (+ bias), in x's dtype.

    x (..., K) fp32/fp16/bf16 with K within the last group of the padded Kp = 2 * weight.shape[1];
    weight uint8 (N, Kp/2), scale and zero (N, Kp/G) from quantize_int4; bias (N,) or None.
    Inference only (no autograd through the quantized weight)."""
    group = _check_int4(weight, scale, zero)
    _check_x(x, weight, None, None, group=group)
    _check_bias(bias, weight)
    x2 = rows(x, x.shape[-1])
    if eager_reference(x):  # not traced, no Triton: skip the op dispatch
        y = _int4_linear_untriton(x2, weight, scale, zero, bias)
    elif name := _traced_cpu_path("int4", x2, (weight.shape[0], x2.shape[1])):
        y = _quant_cpu.run_int4(name, x2, weight, scale, zero, bias, dequantize_int4)
    else:
        y = int4_linear_op(x2, weight, scale, zero, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def _traced_cpu_path(fmt, x, weight_shape):
    """Under torch.compile on the CPU: the CPU path already chosen for this call (None: not chosen yet,
    or not the CPU), traced inline rather than through the opaque custom op (see settled_cpu_path)."""
    if x.device.type != "cpu" or not torch.compiler.is_compiling() or use_triton(x):
        return None
    return _quant_cpu.settled_cpu_path(fmt, x, weight_shape)


def _int8_linear_untriton(x, weight, scale, bias):
    """Off the Triton path: the CPU paths for CPU tensors, the reference elsewhere (FASTLM_KERNELS=reference
    on a GPU: PyTorch's packed kernels are CPU-only)."""
    if x.device.type == "cpu":
        return int8_linear_cpu(x, weight, scale, bias, dequantize_int8)
    return int8_linear_ref(x, weight, scale, bias)


def _int4_linear_untriton(x, weight, scale, zero, bias):
    """As _int8_linear_untriton."""
    if x.device.type == "cpu":
        return int4_linear_cpu(x, weight, scale, zero, bias, dequantize_int4)
    return int4_linear_ref(x, weight, scale, zero, bias)


@custom_op("fastlm::int8_linear", mutates_args=())
def int8_linear_op(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (M, K) -> (M, N): the Triton launcher, or the CPU paths / the reference."""
    if use_triton(x):
        return launch_int8_linear(x, weight, scale, bias)
    return _int8_linear_untriton(x, weight, scale, bias)


@int8_linear_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@custom_op("fastlm::int4_linear", mutates_args=())
def int4_linear_op(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (M, K) -> (M, N): the Triton launcher, or the CPU paths / the reference."""
    if use_triton(x):
        return launch_int4_linear(x, weight, scale, zero, bias)
    return _int4_linear_untriton(x, weight, scale, zero, bias)


@int4_linear_op.register_fake
def _(x, weight, scale, zero, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


# ------------------------------------------------------------------------------------------- validation

def _check_group_size(group_size):
    if group_size not in INT4_GROUP_SIZES or isinstance(group_size, bool):
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


def _check_int8(weight, scale):
    check_tensor("weight", weight, ndim=2, dtypes=(torch.int8,))
    check_tensor("scale", scale, shape=(weight.shape[0],), dtypes=FLOAT_DTYPES)
    _check_on_weight_device("scale", scale, weight)


def _check_int4(weight, scale, zero) -> int:
    """The group size implied by the shapes (validated)."""
    check_tensor("weight", weight, ndim=2, dtypes=(torch.uint8,))
    check_tensor("scale", scale, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("zero", zero, shape=tuple(scale.shape), dtypes=FLOAT_DTYPES)
    if scale.shape[0] != weight.shape[0] or scale.shape[1] == 0:
        raise ValueError(f"scale must have shape (N, groups) with N = weight.shape[0] ({weight.shape[0]}), "
                         f"got {tuple(scale.shape)}")
    Kp, groups = 2 * weight.shape[1], scale.shape[1]
    if Kp % groups or Kp // groups not in INT4_GROUP_SIZES:
        raise ValueError(f"weight (N, {Kp // 2}) bytes and scale (N, {groups}) groups give a group size of "
                         f"{Kp / groups:g} columns, not one of {INT4_GROUP_SIZES}")
    _check_on_weight_device("scale", scale, weight)
    _check_on_weight_device("zero", zero, weight)
    return Kp // groups


def _check_in_features(K, Kp, group, name):
    if not isinstance(K, int) or not Kp - group < K <= Kp:
        raise ValueError(f"{name} must be in ({Kp - group}, {Kp}] for a weight padded to {Kp} columns in groups "
                         f"of {group}, got {K!r}")
    return K


def _check_x(x, weight, K, what, group=None):
    check_tensor("x", x, min_ndim=1)
    _check_on_weight_device("x", x, weight)
    if group is None and x.shape[-1] != K:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal {what} ({K})")
    if group is not None:
        _check_in_features(x.shape[-1], 2 * weight.shape[1], group, "x's last dimension")


def _check_bias(bias, weight):
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],))
        _check_on_weight_device("bias", bias, weight)


def _check_on_weight_device(name, t, weight):
    if t.device != weight.device:
        raise ValueError(f"{name} must be on weight's device ({weight.device}), got {t.device}")


# ----------------------------------------------------------------------------------------------- module

class QuantLinear(nn.Module):
    """A weight-only quantized nn.Linear: buffers `weight` (int8 or packed uint8), `weight_scale`
    (and `weight_zero` for int4) in the formats above, an optional float `bias` Parameter."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int = 128,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self._shape_key = _quant_cpu.shape_key((out_features, in_features))  # its CPU choices' key
        self.group_size = group_size if bits == 4 else None
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("weight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(N, dtype=torch.float32, device=device))
        else:
            _check_group_size(group_size)
            groups = cdiv(K, group_size)
            self.register_buffer("weight", torch.empty(N, groups * group_size // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.empty(N, groups, dtype=torch.float32, device=device))
            self.register_buffer("weight_zero", torch.empty(N, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(N, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> "QuantLinear":
        """Quantize an nn.Linear's weight (its bias is kept as it is)."""
        w = linear.weight
        module = cls(w.shape[1], w.shape[0], bits, group_size, linear.bias is not None, device="meta")
        tensors = quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)
        for name, t in zip(("weight", "weight_scale", "weight_zero"), tensors):
            setattr(module, name, t)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._settled_cpu_call(x)
        if y is not None:
            return y
        if self.bits == 8:
            return int8_linear(x, self.weight, self.weight_scale, self.bias)
        return int4_linear(x, self.weight, self.weight_scale, self.weight_zero, self.bias)

    def _settled_cpu_call(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Eager CPU calls whose path is already chosen run it directly, without int*_linear's checks of
        the module's own buffers and its dispatch (~10 us a call, ~50 calls per token: ~10% of an int4
        decode step); anything else (None) takes the public function, which validates and chooses."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() == 0 \
                or x.shape[-1] != self.in_features or self.weight.device.type != "cpu" \
                or torch.compiler.is_compiling() or use_triton(x):
            return None
        x2 = x.reshape(-1, self.in_features)
        fmt = "int8" if self.bits == 8 else "int4"
        name = _quant_cpu.settled_choice(fmt, x2, self._shape_key)
        if name is None:
            return None
        if self.bits == 8:
            y = _quant_cpu.run_int8(name, x2, self.weight, self.weight_scale, self.bias, dequantize_int8)
        else:
            y = _quant_cpu.run_int4(name, x2, self.weight, self.weight_scale, self.weight_zero, self.bias,
                                     dequantize_int4)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
                f"bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """A weight-only quantized nn.Embedding: the same buffers as QuantLinear (the table is a
    (num_embeddings, embedding_dim) weight, rows = output channels), each looked-up row dequantized to
    `dtype`. A tied LM head (a QuantLinear) shares these buffers: int8's per-row scales and int4's groups
    along the embedding dimension are exactly the head's per-output-channel and input-column groups."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        table = QuantLinear(embedding_dim, num_embeddings, bits, group_size, bias=False, device=device)
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.group_size, self.dtype = table.group_size, dtype
        for name, buffer in table.named_buffers():
            self.register_buffer(name, buffer)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, group_size: int = 128) -> "QuantEmbedding":
        w = embedding.weight
        module = cls(w.shape[0], w.shape[1], bits, group_size, dtype=w.dtype, device="meta")
        tensors = quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)
        for name, t in zip(("weight", "weight_scale", "weight_zero"), tensors):
            setattr(module, name, t)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be an integer tensor (int32/int64), got {ids.dtype}")
        flat = ids.reshape(-1)
        if self.bits == 8:
            rows = dequantize_int8(self.weight[flat], self.weight_scale[flat], self.dtype)
        else:
            rows = dequantize_int4(self.weight[flat], self.weight_scale[flat], self.weight_zero[flat],
                                   self.embedding_dim, self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}, dtype={self.dtype}"
