"""The paged KV pool: per layer, num_blocks blocks of block_size tokens, K and V, in the model's dtype.

Layout (fastlm.kernels.paged_attention's): k, v (n_layer, num_blocks + 1, block_size, n_kv_head,
head_dim), contiguous, so each layer's (num_blocks + 1, block_size, Hkv, D) slice is too. The block
manager hands out blocks 0..num_blocks-1; the extra last block is scratch that padded rows of a
CUDA-graph step write into and read from, never any sequence's.

Size: kv_cache_memory bytes when given; otherwise enough for max_num_seqs full-context sequences, capped
on a GPU at gpu_memory_utilization of the free memory, on a CPU at min(CPU_MAX_BYTES, a quarter of the
RAM). (Not all of the GPU by default: other processes, and other LLMs of this one, keep their room.)
"""
import os
from typing import List, Optional, Tuple

import torch

from fastlm.model import hugepages

CPU_MAX_BYTES = 4 << 30


def bytes_per_token(model) -> int:
    """K and V of one token in every layer."""
    cfg = model.config
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=model.dtype).element_size()


def default_kv_memory(model, max_num_seqs: int, gpu_memory_utilization: float) -> int:
    """Enough for max_num_seqs full-context sequences, within the device's share (see the docstring)."""
    wanted = max_num_seqs * model.config.max_seq_len * bytes_per_token(model)
    device = model.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(wanted, int(free * gpu_memory_utilization))
    return min(wanted, CPU_MAX_BYTES, _ram_bytes() // 4)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def pool_blocks(model, block_size: int, kv_cache_memory: Optional[int] = None, max_num_seqs: int = 64,
                gpu_memory_utilization: float = 0.9) -> int:
    """The number of blocks a pool of kv_cache_memory bytes (default: default_kv_memory) holds."""
    if kv_cache_memory is None:
        kv_cache_memory = default_kv_memory(model, max_num_seqs, gpu_memory_utilization)
    num_blocks = kv_cache_memory // (block_size * bytes_per_token(model))
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory ({kv_cache_memory} bytes) holds no block of {block_size} tokens "
                         f"({block_size * bytes_per_token(model)} bytes)")
    return num_blocks


class KVPool:
    def __init__(self, model, block_size: int, kv_cache_memory: Optional[int] = None, max_num_seqs: int = 64,
                 gpu_memory_utilization: float = 0.9):
        self.block_size = block_size
        self.num_blocks = pool_blocks(model, block_size, kv_cache_memory, max_num_seqs, gpu_memory_utilization)
        cfg = model.config
        shape = (cfg.n_layer, self.num_blocks + 1, block_size, cfg.n_kv_head, cfg.head_dim)
        self.k = hugepages.zeros(shape, model.dtype, model.device)  # on CPU in huge pages: fewer TLB misses
        self.v = hugepages.zeros(shape, model.dtype, model.device)

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def copy_blocks(self, pairs: List[Tuple[int, int]]) -> None:
        """K/V of block src copied into block dst in every layer, for each (src, dst)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.k.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
