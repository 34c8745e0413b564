"""CPU GEMV for decode-sized inputs: y = x W^T (+ b), fp32 or bf16, at the memory's read bandwidth.

A batch-1 decode step is a chain of matrix-vector products bound by reading the weights. On the
development AMD EPYC (2 threads, torch 2.13) aten's F.linear read them at ~17 GB/s and oneDNN's
prepacked kernels at 25-43 GB/s (bf16 worst) of the ~43-75 GB/s a plain fp32 sum reads; the C++ kernel
in csrc/cpu_gemv.cpp (one weight row per step of a sequential stream per thread, software prefetch,
AVX512-BF16 dot products) reads at that bound. Whether it is used is timed per machine like the other
CPU candidates (fastlm.runtime.cpu_linear); this module only builds, validates and calls it.

Built at the first call in a process with fastlm's other C++ CPU kernels (fastlm.kernels._cpu_ext: the
system's compiler, -march=native, cached per machine). No compiler, a failed build or
FASTLM_CPU_EXTENSION=0: `cpu_gemv_available()` is False, `cpu_gemv_build_error()` says why, and
`cpu_gemv` computes the PyTorch reference instead (same result up to rounding, not the speed).

    y = cpu_gemv(x, weight, bias=None)   # x (..., K), weight (N, K), bias (N,) -> (..., N) in x's dtype
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastlm.kernels import _cpu_ext
from fastlm.kernels._utils import check_tensor

DTYPES = (torch.float32, torch.bfloat16)


def cpu_gemv_ref(x, weight, bias=None):
    """The reference: fp32 products and sums, rounded once to x's dtype."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def cpu_gemv_available() -> bool:
    """True when the C++ kernel is built and loaded (building it now if needed)."""
    return _cpu_ext.load()


def cpu_gemv_build_error() -> Optional[str]:
    """Why the C++ kernel is unavailable (None while it is available or not yet tried)."""
    return _cpu_ext.build_error()


def cpu_gemv(x, weight, bias=None):
    """y = x @ weight.T + bias for CPU tensors x (..., K) and weight (N, K), both fp32 or both bf16,
    bias (N,) in their dtype or None; sums in fp32, y (..., N) in x's dtype. Fastest for few rows of x
    (decode: up to 8 rows per pass over the weight). The reference where the kernel is unavailable."""
    check_tensor("x", x, min_ndim=1, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=DTYPES, like=("x", x), shape=(weight.shape[0], x.shape[-1]))
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=DTYPES, like=("x", x), shape=weight.shape[:1])
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (cpu_gemv is the CPU decode kernel), got {x.device}")
    if not _cpu_ext.load():
        return cpu_gemv_ref(x, weight, bias)
    y = torch.ops.fastlm_cpu.gemv(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def gemv_op(x2d, weight, bias):
    """The loaded op without checks (callers that validated once, e.g. PackedLinear): x2d (M, K)."""
    return torch.ops.fastlm_cpu.gemv(x2d, weight, bias)
