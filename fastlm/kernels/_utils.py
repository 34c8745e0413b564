"""Shared plumbing of the kernel families: the dispatch rule, argument checks, launch helpers.

The bottom layer of fastlm.kernels: imports torch only, and nothing of fastlm.

Dispatch: `use_triton(x)` is the one rule, read at every call (never decided or patched at import):
  - FASTLM_KERNELS=reference in the environment -> the PyTorch references on every device (a switch
    for debugging "kernel or model?", and for tests that exercise the model rather than the kernels);
  - CUDA tensor -> the Triton kernel;
  - CPU tensor -> the PyTorch reference, unless TRITON_INTERPRET=1: then the Triton kernel runs under
    Triton's interpreter (how the test suite checks the real kernels without a GPU). Where neither the
    interpreter nor FASTLM_KERNELS=reference is on (native_cpu), a family may use fastlm's C++ CPU
    kernel instead of its reference (paged decode attention).
"""
import contextlib
import dataclasses
import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # kernels work in the log2 domain: exp(x) = exp2(x * LOG2E)
KERNELS_ENV = "FASTLM_KERNELS"  # "reference": the PyTorch references everywhere; unset or "auto": the rule


# ----------------------------------------------------------------------------------------- dispatch
def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def reference_forced() -> bool:
    mode = os.environ.get(KERNELS_ENV, "auto")
    if mode not in ("auto", "reference"):
        raise ValueError(f"{KERNELS_ENV} must be 'auto' or 'reference', got {mode!r}")
    return mode == "reference"


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernel should run for a tensor on x's device (the rule above). FASTLM_KERNELS
    is read only where it can change the answer: plain CPU (the decode hot path) reads one variable."""
    if x.device.type == "cuda" or (x.device.type == "cpu" and interpreter_enabled()):
        return not reference_forced()
    return False


def native_cpu(x: torch.Tensor) -> bool:
    """True for a CPU tensor that neither the interpreter (testing the Triton kernel) nor
    FASTLM_KERNELS=reference (the PyTorch reference) claims: where fastlm's C++ CPU kernels may run."""
    return x.device.type == "cpu" and not interpreter_enabled() and not reference_forced()


def eager_reference(x: torch.Tensor) -> bool:
    """True when a public function calls its PyTorch reference directly instead of its custom op: not
    traced by torch.compile, and the op would run the reference anyway (not use_triton(x)). Skipping
    the op dispatch (~15-20 us a call) matters on the CPU decode path."""
    return not torch.compiler.is_compiling() and not use_triton(x)


# ----------------------------------------------------------------------------------------- argument checks
def check_tensor(name, t, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES, like=None, shape=None):
    """Validate one argument; raise ValueError naming it and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if like is not None:
        ref_name, ref = like
        if t.device != ref.device:
            raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
        if dtypes is not None and t.dtype != ref.dtype:
            raise ValueError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
    return t


def check_positive_float(name, value):
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------- launch helpers
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """2-D (rows, n) view with a contiguous last dim (copies only when it has to)."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def device_guard(t: torch.Tensor):
    """Launch on t's GPU, not the current one (multi-GPU: a kernel launched on the wrong device faults)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def head_dim_block(head_dim: int) -> int:
    """Attention tiles' feature width: the next power of two >= head_dim, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    arch: int  # compute capability as 80, 90, ...: selects tile configurations
    sms: int  # streaming multiprocessors: sizes split grids


# The GPU whose launch configurations the interpreter runs for CPU tensors (TRITON_INTERPRET=1): sm_80
# tiles, an H100's 132 SMs. The test seam for other GPUs' configurations: tests replace this value.
INTERPRETED_GPU = GpuTarget(arch=80, sms=132)


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _cuda(device: torch.device):
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def gpu_arch(device: torch.device) -> int:
    """Compute capability of device as 80, 90, ...; INTERPRETED_GPU's for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETED_GPU.arch
    props = _cuda(device)
    return 10 * props.major + props.minor


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of device; INTERPRETED_GPU's for CPU tensors."""
    return _cuda(device).multi_processor_count if device.type == "cuda" else INTERPRETED_GPU.sms


def program_slots(device: torch.device) -> int:
    """Programs of a persistent-style grid (one partial row each): enough to fill the GPU a few times
    over; 8 under the interpreter, so that programs loop over several row blocks as on a GPU."""
    return 4 * sm_count(device) if device.type == "cuda" else 8


@dataclasses.dataclass(frozen=True)
class Launch:
    """One configuration a launcher really uses, listed as data by its kernel module (LAUNCHES) for the
    ahead-of-time compile check (fastlm.kernels.compile_check derives the Triton signature from it)."""
    kernel: object  # the @triton.jit function
    dtype: torch.dtype  # of the tensor arguments (uppercase parameters) not listed below
    constexprs: dict  # tl.constexpr parameter -> value
    num_warps: int
    num_stages: int = 3
    fp32: tuple = ()  # pointer parameters that are fp32 whatever `dtype` is (statistics, partial sums)
    int32: tuple = ()  # pointer parameters to int32 values (lengths)
    int8: tuple = ()  # pointer parameters to int8 values (quantized weights)
    uint8: tuple = ()  # pointer parameters to uint8 values (packed 4-bit weights)
    mma: bool = False  # tensor-core instructions (HMMA / HGMMA) expected in the SASS
    targets: tuple = (80, 90)  # the archs whose launcher picks this configuration
    tag: str = ""  # what tells this configuration apart in the report, e.g. "D=128,128x64"
