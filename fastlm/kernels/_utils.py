"""Shared plumbing for the kernel files: the dispatch rule, input validation, launch configuration.

Dispatch (one rule, read at call time, never patched at import):
  - CUDA tensor -> the Triton kernel;
  - CPU tensor  -> the PyTorch reference, unless TRITON_INTERPRET=1, then the Triton kernel runs
    under Triton's interpreter (how the test suite checks real kernels without a GPU).
"""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernel should run for a tensor on x's device."""
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and interpreter_enabled()


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


def triton_dtype_name(dtype: torch.dtype) -> str:
    """Triton signature name of a pointer to dtype (for ahead-of-time compilation)."""
    return {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}[dtype]
