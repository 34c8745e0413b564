"""Pure-decode engine steps replayed from CUDA graphs, one per batch-size bucket (GPU).

A decode step launches hundreds of small kernels; at small batches their launch overhead rivals the
memory time. A step whose rows are all decodes (one token per sequence) is padded to the next bucket
(1, 2, 4, 8, 16, 32, ..., the first power of two >= max_num_seqs) and replayed from that bucket's graph, captured the first
time it is needed. What makes one capture valid for every later step: the step's inputs live in static
buffers (token ids, positions, slots, block tables, lengths) that each replay refills, and the model's
decode path never reads a device value on the host. Padded rows read and write only the pool's scratch
block (kv_pool.py) with one key, so they cannot touch a sequence's K/V; their logits are dropped.

Without capture (CPU, or capture=False) the same padding runs eagerly: that is how the padding is
tested on machines without a GPU. A capture that fails is not fatal but observable: a warning, the reason
in capture_error, uses_cuda_graph False, and every later step eager.
"""
import warnings
from typing import Dict, Optional

import torch

from fastlm.model.attention_metadata import AttentionMetadata

MAX_BUCKET = 512


def bucket_sizes(max_batch: int) -> list:
    """Powers of two from 1 up to the first one >= max_batch (at most MAX_BUCKET)."""
    sizes = [1]
    while sizes[-1] < min(max_batch, MAX_BUCKET):
        sizes.append(sizes[-1] * 2)
    return sizes


class DecodeGraphs:
    def __init__(self, model, pool, max_batch: int, max_blocks_per_seq: int, capture: bool = True):
        self.model, self.pool = model, pool
        self.capture = capture and pool.k.is_cuda
        self.buckets = bucket_sizes(max_batch)
        n, device = self.buckets[-1], pool.k.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seqlens = torch.ones(n, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, device=device)
        self._ids = {b: self.input_ids[:b] for b in self.buckets}  # each bucket's views, built once
        self._metas: Dict[int, AttentionMetadata] = {}
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.memory_pool = None
        self.capture_error: Optional[str] = None  # why capture failed (then every step runs eagerly)

    @property
    def uses_cuda_graph(self) -> bool:
        """True once a step has replayed a captured graph (and capture has not failed since)."""
        return self.capture and bool(self.graphs)

    def bucket_for(self, batch: int):
        """The smallest bucket holding batch rows, None when there is none (run eagerly)."""
        return next((b for b in self.buckets if b >= batch), None)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A pure-decode step's logits (B, V), through the padded bucket."""
        batch = meta.num_decodes
        bucket = self.bucket_for(batch)
        self._fill(input_ids, meta, batch, bucket)
        if self.capture and bucket not in self.graphs:
            self._try_capture(bucket)
        if not self.capture:
            return self.model(self._ids[bucket], metadata=self._metadata(bucket))[:batch]
        self.graphs[bucket].replay()
        return self.outputs[bucket][:batch]

    def _fill(self, input_ids, meta, batch, bucket) -> None:
        """Real rows from the step, padding rows pointing at the scratch block (one key each)."""
        width = meta.decode_block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(meta.positions)
        self.slots[:batch].copy_(meta.slot_mapping)
        self.block_tables[:batch, :width].copy_(meta.decode_block_tables)
        self.seqlens[:batch].copy_(meta.decode_seqlens)
        self._pad_rows(batch, bucket)

    def _pad_rows(self, batch: int, bucket: int) -> None:
        """Rows [batch, bucket): token 0 at position 0, one key, in the pool's scratch block."""
        if bucket > batch:
            scratch = self.pool.scratch_block
            self.input_ids[batch:bucket].zero_()
            self.positions[batch:bucket].zero_()
            self.slots[batch:bucket].fill_(scratch * self.pool.block_size)
            self.block_tables[batch:bucket].fill_(scratch)
            self.seqlens[batch:bucket].fill_(1)

    def run_decodes(self, seqs):
        """A shortcut for pure-decode steps that a subclass offers (compiled_step.py: (logits, greedy picks)
        straight from the sequences); None: take run's path, which replays the graphs here."""
        return None

    def _metadata(self, bucket: int) -> AttentionMetadata:
        """The bucket's metadata: views of the static buffers, the same objects at every step."""
        if bucket not in self._metas:
            self._metas[bucket] = self._new_metadata(bucket)
        return self._metas[bucket]

    def _new_metadata(self, bucket: int) -> AttentionMetadata:
        empty = self.seqlens[:0]
        return AttentionMetadata(
            positions=self.positions[:bucket], slot_mapping=self.slots[:bucket], k_pool=self.pool.k,
            v_pool=self.pool.v, num_decodes=bucket, decode_block_tables=self.block_tables[:bucket],
            decode_seqlens=self.seqlens[:bucket], prefill_block_tables=self.block_tables[:0],
            prefill_cu_seqlens_q=self.seqlens[:1] * 0, prefill_seqlens_k=empty, logits_indices=self.rows[:bucket])

    def _try_capture(self, bucket: int) -> None:
        try:
            self._capture(bucket)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be captured still generates, eagerly
            warnings.warn(f"CUDA graph capture of a decode step failed ({exc}); decode steps run eagerly",
                          stacklevel=3)
            self.capture, self.capture_error = False, f"{type(exc).__name__}: {exc}"

    def _capture(self, bucket: int) -> None:
        meta = self._metadata(bucket)
        side = torch.cuda.Stream(device=self.pool.k.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocator, autotuning) outside the capture
            self.model(self.input_ids[:bucket], metadata=meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may run torch while the engine's thread captures
        with torch.cuda.graph(graph, pool=self.memory_pool, capture_error_mode="thread_local"):
            self.outputs[bucket] = self.model(self.input_ids[:bucket], metadata=meta)
        self.memory_pool = graph.pool()
        self.graphs[bucket] = graph
