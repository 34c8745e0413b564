"""KVCache: preallocated key/value buffers for every layer plus per-row lengths, all on one device.

Layout: k, v (n_layer, B, S_max, n_kv_head, head_dim) — per layer a (B, S_max, Hkv, D) slab, the layout
fastlm.kernels.decode_attention reads. seqlens (B,) int32 counts the valid entries of each row; rows may
have different lengths (ragged batch). The model writes K/V at positions seqlens[b].. and then advances
seqlens in place, on device, so a decode step never synchronizes with the host."""
import torch

from fastlm.kernels._utils import FLOAT_DTYPES
from fastlm.model.validation import check_positive_int


class KVCache(torch.nn.Module):
    def __init__(self, n_layer, batch_size, max_seq_len, n_kv_head, head_dim, dtype=torch.float32, device=None):
        super().__init__()
        for name, value in (("n_layer", n_layer), ("batch_size", batch_size), ("max_seq_len", max_seq_len),
                            ("n_kv_head", n_kv_head), ("head_dim", head_dim)):
            check_positive_int(name, value)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        shape = (n_layer, batch_size, max_seq_len, n_kv_head, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch_size, dtype=torch.int32, device=device), persistent=False)

    @classmethod
    def _from_views(cls, k, v, seqlens):
        cache = cls.__new__(cls)
        torch.nn.Module.__init__(cache)
        cache.register_buffer("k", k, persistent=False)
        cache.register_buffer("v", v, persistent=False)
        cache.register_buffer("seqlens", seqlens, persistent=False)
        return cache

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def select(self, rows) -> "KVCache":
        """A cache over a contiguous slice of rows, sharing buffers and lengths with this one: K/V
        written and lengths advanced through the view land here (per-row prefill of a ragged batch)."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows must be a contiguous slice (e.g. slice(b, b + 1)), got {rows!r}")
        seqlens = self.seqlens[rows]
        if seqlens.numel() == 0:
            raise ValueError(f"rows {rows!r} selects no row of a cache with batch_size {self.batch_size}")
        return KVCache._from_views(self.k[:, rows], self.v[:, rows], seqlens)

    def reset(self) -> "KVCache":
        """Forget every row (lengths to zero); the buffers are reused as they are."""
        self.seqlens.zero_()
        return self

    def layer(self, i):
        """(k, v) of layer i, each (B, S_max, Hkv, D)."""
        return self.k[i], self.v[i]
