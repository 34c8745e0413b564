"""One scheduled step through the model: pack the spans into AttentionMetadata, run, return logits.

Token layout of a step (fastlm.model.attention_metadata): the decode rows first, one token each, then
the prefill chunks back to back. A span that reaches its sequence's last token yields logits (the next
token is sampled from them); a chunk that stops earlier only fills the KV pool.
TensorParallelRunner: rank 0's runner of a tensor-parallel model (fastlm.runtime.parallel), which sends
each step's inputs to the other ranks before the forward they all run together.
"""
from typing import List, Optional, Tuple

import torch

from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.runtime.cuda_graph import DecodeGraphs
from fastlm.runtime.engine.kv_pool import KVPool
from fastlm.runtime.engine.scheduler import ScheduledStep
from fastlm.runtime.engine.sequence import Sequence


class ModelRunner:
    """graphs: a cuda_graph.DecodeGraphs that pure-decode steps run through (None: always eager)."""

    def __init__(self, model, pool: KVPool, graphs: Optional[DecodeGraphs] = None):
        self.model, self.pool, self.graphs = model, pool, graphs

    def run(self, step: ScheduledStep) -> Tuple[torch.Tensor, List[Sequence], Optional[torch.Tensor]]:
        """-> (logits (R, V), the R sequences they belong to in that order, each row's greedy pick (R,)
        int64 when the step computed them (a compiled CPU decode step; below the engine's vocab_size) or None)."""
        if self.graphs is not None and not step.prefills:
            shortcut = self.graphs.run_decodes(step.decodes)
            if shortcut is not None:
                return shortcut[0], step.decodes, shortcut[1]
        input_ids, meta, sampled = self.prepare(step)
        if self._graphable(step, sampled):
            return self.graphs.run(input_ids, meta), sampled, None
        return self.model(input_ids, metadata=meta), sampled, None

    def copy_blocks(self, pairs) -> None:
        """K/V of block src copied into block dst, for each (src, dst) (forks of n > 1 requests)."""
        self.pool.copy_blocks(pairs)

    def _graphable(self, step: ScheduledStep, sampled) -> bool:
        """Only decodes, each sampling (a one-token prefill chunk that does not is a decode row too)."""
        return (self.graphs is not None and not step.prefills and len(sampled) == len(step.decodes)
                and self.graphs.bucket_for(len(step.decodes)) is not None)

    def prepare(self, step: ScheduledStep):
        """(input_ids (N,), AttentionMetadata, sequences that sample) for a step."""
        bs = self.pool.block_size
        ids, positions, slots, logits_indices, sampled = [], [], [], [], []
        for seq, span in step.spans:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + span])
            positions.extend(range(start, start + span))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + span))
            if start + span == seq.num_tokens:
                logits_indices.append(len(ids) - 1)
                sampled.append(seq)
        prefills = step.prefills
        cu = [0]
        for _, span in prefills:
            cu.append(cu[-1] + span)
        device, i32 = self.pool.k.device, torch.int32
        meta = AttentionMetadata(
            positions=_tensor(positions, torch.long, device),
            slot_mapping=_tensor(slots, torch.long, device),
            k_pool=self.pool.k, v_pool=self.pool.v,
            num_decodes=len(step.decodes),
            decode_block_tables=_block_tables([s.block_table for s in step.decodes], device),
            decode_seqlens=_tensor([s.num_computed_tokens + 1 for s in step.decodes], i32, device),
            prefill_block_tables=_block_tables([s.block_table for s, _ in prefills], device),
            prefill_cu_seqlens_q=_tensor(cu, i32, device),
            prefill_seqlens_k=_tensor([s.num_computed_tokens + n for s, n in prefills], i32, device),
            logits_indices=_tensor(logits_indices, torch.long, device),
        )
        return _tensor(ids, torch.long, device), meta, sampled


def _tensor(values, dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _block_tables(tables: List[List[int]], device) -> torch.Tensor:
    """(rows, longest table) int32, short rows padded with block 0 (never read: past their lengths)."""
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device).view(len(tables), width)


class TensorParallelRunner(ModelRunner):
    """group: rank 0's fastlm.runtime.parallel.group.TensorParallelGroup; never CUDA graphs (the
    other ranks run each step eagerly)."""

    def __init__(self, model, pool: KVPool, group):
        super().__init__(model, pool, None)
        self.group = group

    def run(self, step: ScheduledStep) -> Tuple[torch.Tensor, List[Sequence], Optional[torch.Tensor]]:
        input_ids, meta, sampled = self.prepare(step)
        with self.group.collective("a step"):
            self.group.send_step(input_ids, meta)
            logits = self.model(input_ids, metadata=meta)
        return logits, sampled, None

    def copy_blocks(self, pairs) -> None:
        if pairs:
            with self.group.collective("a KV block copy"):
                self.group.send_copies(pairs)
                self.pool.copy_blocks(pairs)
