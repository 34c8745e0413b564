"""Greedy picks: argmax over the last dim of (R, V) logits, exactly torch.argmax(x, dim=-1).

Greedy decoding takes one argmax over the vocabulary per row and step. On the development AMD EPYC (2
threads, torch 2.13) aten's CPU argmax took 161 us for one bf16 GPT-2 row (50257 values) and 37 us in
fp32, 640 / 124 us for 8 rows; the C++ kernel in csrc/cpu_argmax.cpp reads fp32 or bf16 rows in place in
4.5-5.4 us (one row) and 17-19 us (8 rows). Ties give the first index and a row with NaN its first NaN,
as torch.argmax. Elsewhere (GPUs, fp16, no compiler, FASTLM_KERNELS=reference) it is torch.argmax.

    ids = argmax_rows(logits)   # logits (R, V) -> (R,) int64
"""
import torch

from fastlm.kernels import _cpu_ext
from fastlm.kernels._utils import check_tensor, reference_forced


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for logits x (R, V) with V >= 1: (R,) int64 on x's device."""
    check_tensor("x", x, ndim=2)
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one column (a vocabulary), got shape {tuple(x.shape)}")
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not reference_forced()
            and _cpu_ext.load()):
        return torch.ops.fastlm_cpu.argmax_rows(x)
    return torch.argmax(x, dim=-1)
