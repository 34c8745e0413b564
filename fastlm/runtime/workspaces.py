"""KV-cache workspaces of an LLM, one per live call.

A workspace is a KVCache plus its decode step (a CUDA graph on a GPU). Allocating one costs memory and,
on a GPU, a graph capture, so finished calls give theirs back for reuse. A call checks a workspace out
for its whole life and returns it when its generator ends, is closed or is garbage-collected: two
threads, two interleaved stream() generators or a generate() inside a stream() loop each hold their
own, so no call resets or overwrites another's cache. When every matching workspace is busy a new one
is allocated; at most `keep` idle ones are kept (the oldest idle one is dropped first).
"""
import threading
from contextlib import contextmanager

import torch

from fastlm.runtime.cuda_graph import make_decode_step

CACHE_LENGTH_STEP = 128  # cache lengths are rounded up to this, so workspaces (and graphs) get reused


class WorkspacePool:
    def __init__(self, model, keep: int = 4):
        self.model, self.keep = model, keep
        self._idle = []  # [((batch, length), (cache, step))], oldest first
        self._lock = threading.Lock()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @contextmanager
    def checkout(self, batch_size: int, length: int):
        """A reset (cache, step) for batch_size rows of at least `length` tokens, owned until exit."""
        key = (batch_size, self._rounded(length))
        with self._lock:
            found = next((i for i, (k, _) in enumerate(self._idle) if k == key), None)
            workspace = self._idle.pop(found)[1] if found is not None else self._new(*key)
        cache, step = workspace
        cache.reset()
        try:
            yield cache, step
        finally:
            with self._lock:
                self._idle.append((key, workspace))
                del self._idle[:-self.keep]

    def _rounded(self, length: int) -> int:
        context = self.model.config.max_seq_len
        return min(context, -(-length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP)

    def _new(self, batch_size: int, length: int):
        with torch.no_grad():
            cache = self.model.new_cache(batch_size, length)
            return cache, make_decode_step(self.model, cache)
