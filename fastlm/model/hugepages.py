"""CPU tensors in transparent huge pages (2 MB) on Linux: the weights as loaded, and the KV pool.

Why: a decode step reads every weight once and its rows' K/V blocks, all out of cache; with 4 KB pages
each 4 KB costs a TLB miss (a page walk, dearer still in a VM). Measured on the development AMD EPYC VM
(2 threads, compiled batch-1 steps, the same checkpoint loaded twice in one process, FASTLM_HUGEPAGES=0
for one, alternating turns): GPT-2-124M bf16 7.31 -> 6.70 ms per step, fp32 12.83 -> 10.61; Llama-150M
bf16 5.39 -> 4.98, fp32 10.63 -> 9.92; 8-row steps unchanged (bound by multiply-adds).

How: one private anonymous mapping per allocation, advised MADV_HUGEPAGE before anything touches it (the
kernel backs it with huge pages as it is first written, unless /sys/kernel/mm/transparent_hugepage/enabled
is "never"), the tensors laid out from its first 2 MB boundary at 64-byte offsets (the loader's parameters
all at once; pack_module moves a model's tensors there afterwards). Each tensor is a torch.frombuffer of
its own bytes, so each has its own storage, which keeps the mapping alive: torch.compile with freezing
(Inductor's oneDNN linears) gave wrong logits for parameters that were views into one storage. A fresh
mapping reads as zeros, and its pages cost memory only once written. Elsewhere (not Linux, not CPU,
FASTLM_HUGEPAGES=0, under 2 MB in all): torch.empty / torch.zeros.
"""
import math
import mmap
import os
from typing import List, Sequence, Tuple

import torch

ENV = "FASTLM_HUGEPAGES"  # "0": plain allocations
HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor's start: a cache line (and every SIMD load's alignment)


def enabled(device) -> bool:
    """Whether allocations on `device` go to huge-page mappings."""
    return (torch.device(device).type == "cpu" and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")
            and os.environ.get(ENV, "1").strip() != "0")


def empty_tensors(specs: Sequence[Tuple[Sequence[int], torch.dtype]], device) -> List[torch.Tensor]:
    """One uninitialized tensor per (shape, dtype), as torch.empty on `device`; on CPU (see enabled) cut
    out of one huge-page mapping."""
    sizes = [_nbytes(shape, dtype) for shape, dtype in specs]
    if not enabled(device) or sum(sizes) < HUGE_PAGE:
        return [torch.empty(tuple(shape), dtype=dtype, device=device) for shape, dtype in specs]
    buffer, offset = _mapping(sum(_aligned(n) for n in sizes))
    tensors = []
    for (shape, dtype), n in zip(specs, sizes):
        tensors.append(_tensor(buffer, offset, shape, dtype))
        offset += _aligned(n)
    return tensors


def zeros(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype, device=device), in huge pages on CPU (a fresh mapping is zeros)."""
    if not enabled(device) or _nbytes(shape, dtype) < HUGE_PAGE:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    return _tensor(*_mapping(_nbytes(shape, dtype)), shape, dtype)


def pack_module(module: torch.nn.Module) -> None:
    """Copy a CPU module's parameters and buffers into one huge-page mapping, in place (through .data, so a
    tensor shared by two modules stays shared): for models changed after loading (quantized as loaded).
    Left as they are where some of them are views into one another, or off the CPU."""
    unique = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        unique.setdefault(id(tensor), tensor)
    tensors = [t for t in unique.values() if t.device.type == "cpu" and t.numel() > 0]
    if not tensors or not enabled("cpu"):
        return
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    if any(end > next_start for (_, end), (next_start, _) in zip(spans, spans[1:])):
        return
    with torch.no_grad():
        for old, new in zip(tensors, empty_tensors([(t.shape, t.dtype) for t in tensors], "cpu")):
            new.copy_(old)
            old.data = new


def _mapping(nbytes: int):
    """(a new private anonymous mapping advised MADV_HUGEPAGE, the offset of its first 2 MB boundary), with
    nbytes from there."""
    buffer = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    start = -torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    return buffer, start


def _tensor(buffer, offset: int, shape, dtype) -> torch.Tensor:
    """The tensor of `shape` and `dtype` at byte `offset` of buffer, with a storage of its own."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(tuple(shape))


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN
