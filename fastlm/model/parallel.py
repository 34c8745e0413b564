"""Tensor parallelism (after gpt-fast's tp.py and nano-vllm's layers): one model split across the N ranks
of a torch.distributed process group (NCCL on GPUs, gloo on CPU), each rank holding 1/N of the weights.

Per block, two collectives:
    attention: wqkv column-parallel (rank r computes its Hq/N query heads and the KV heads they use),
               attention on the local heads, wo row-parallel: partial sums, one all-reduce;
    MLP:       w_up column-parallel (its F/N slice of gate and of up), w_down row-parallel, one all-reduce.
The row-parallel bias is added on rank 0 only, before the all-reduce, so it counts once.
KV heads: Hkv/N per rank when N divides Hkv; with fewer KV heads than ranks (GQA/MQA) each KV head is
replicated on the N/Hkv ranks whose query heads read it.
Vocabulary: padded to a multiple of N (the padding rows are zeros and never looked up or returned);
the embedding looks up the ids of its own vocabulary slice, zeroes the others, and all-reduces; the LM
head computes its slice of the logits and gathers them on rank 0 (the other ranks get None).

A rank's model is a plain Transformer built with its local sizes (model.config: local n_head, n_kv_head,
intermediate_size; the vocabulary and context of the whole model), in which these layers replace the
projections; its KV cache therefore holds the local heads only. load_tensor_parallel
(fastlm.model.parallel_loading) fills it from a checkpoint, reading only the rank's slices.
"""
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastlm.model.config import ModelConfig
from fastlm.model.validation import check_int


@dataclass(frozen=True)
class Shard:
    """Where this rank sits and what it holds of a model split over world_size ranks."""
    rank: int
    world_size: int
    full: ModelConfig  # the whole model's config
    group: object = None  # the process group (None: the default group)

    @property
    def q_heads(self):  # the query heads of this rank: [start, stop)
        n = self.full.n_head // self.world_size
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self):  # the KV heads its query heads read (replicated when Hkv < N)
        hkv, world = self.full.n_kv_head, self.world_size
        if hkv >= world:
            n = hkv // world
            return self.rank * n, (self.rank + 1) * n
        head = self.rank // (world // hkv)
        return head, head + 1

    @property
    def padded_vocab(self):
        return -(-self.full.vocab_size // self.world_size) * self.world_size

    @property
    def vocab_rows(self):
        n = self.padded_vocab // self.world_size
        return self.rank * n, (self.rank + 1) * n

    @property
    def mlp_rows(self):
        n = self.full.intermediate_size // self.world_size
        return self.rank * n, (self.rank + 1) * n

    def local_config(self) -> ModelConfig:
        kv = self.kv_heads
        return replace(self.full, n_head=self.full.n_head // self.world_size, n_kv_head=kv[1] - kv[0],
                       intermediate_size=self.full.intermediate_size // self.world_size)


def check_splittable(cfg: ModelConfig, world_size: int) -> None:
    """ValueError naming what cannot be split evenly across world_size ranks."""
    check_int("tensor_parallel_size", world_size, 1)
    hq, hkv, inter = cfg.n_head, cfg.n_kv_head, cfg.intermediate_size
    if hq % world_size:
        raise ValueError(f"tensor_parallel_size ({world_size}) must divide the model's {hq} attention heads")
    if hkv % world_size and world_size % hkv:
        raise ValueError(f"tensor_parallel_size ({world_size}) must divide the model's {hkv} KV heads or be a "
                         f"multiple of them")
    if inter % world_size:
        raise ValueError(f"tensor_parallel_size ({world_size}) must divide the MLP width ({inter})")


def _all_reduce(x, group):
    dist.all_reduce(x, group=group)
    return x


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_r^T (+ bias once): the input's last dim is split across the ranks.
    Like ParallelLMHead, a local product then `finish` (the collective), with `local_bias`: the CPU
    runtime swaps the product for a prepacked one (fastlm.runtime.cpu_linear) and keeps the rest."""

    def __init__(self, in_features, out_features, bias, shard: Shard):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.group = shard.rank, shard.group

    @property
    def local_bias(self):
        return self.bias if self.rank == 0 else None  # added once, before the all-reduce

    def finish(self, y):
        return _all_reduce(y, self.group)

    def forward(self, x):
        return self.finish(F.linear(x, self.weight, self.local_bias))


class VocabParallelEmbedding(nn.Embedding):
    """The rows [start, start + num_embeddings) of the padded embedding; others looked up elsewhere."""

    def __init__(self, num_embeddings, dim, shard: Shard):
        super().__init__(num_embeddings, dim)
        self.start, self.group = shard.vocab_rows[0], shard.group

    def forward(self, ids):
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        h = F.embedding(torch.where(inside, local, 0), self.weight)  # (B, T, dim)
        return _all_reduce(h * inside.unsqueeze(-1).to(h.dtype), self.group)


class ParallelLMHead(nn.Linear):
    """This rank's slice of the logits, gathered on rank 0 into (..., vocab_size); None elsewhere."""

    def __init__(self, dim, rows, shard: Shard):
        super().__init__(dim, rows, bias=False)
        self.rank, self.world, self.group = shard.rank, shard.world_size, shard.group
        self.vocab_size = shard.full.vocab_size
        self.dst = 0 if shard.group is None else dist.get_global_rank(shard.group, 0)

    local_bias = None

    def forward(self, x):
        return self.finish(F.linear(x, self.weight))

    def finish(self, logits):
        logits = logits.contiguous()  # (B, T, V_pad / N)
        parts = [torch.empty_like(logits) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(logits, parts, dst=self.dst, group=self.group)
        if self.rank != 0:
            return None
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]  # (B, T, vocab)


def parallelize(model, shard: Shard):
    """Swap the projections of a Transformer built with shard.local_config() for the parallel layers
    (same parameter names and shapes: a state dict of the rank's slices loads into it)."""
    cfg = model.config
    for block in model.layers:
        wo, down = block.attn.wo, block.mlp.w_down
        block.attn.wo = RowParallelLinear(wo.in_features, wo.out_features, wo.bias is not None, shard)
        block.mlp.w_down = RowParallelLinear(down.in_features, down.out_features, down.bias is not None, shard)
    rows = shard.padded_vocab // shard.world_size
    model.tok_emb = VocabParallelEmbedding(rows, cfg.dim, shard)
    model.lm_head = ParallelLMHead(cfg.dim, rows, shard)
    model.shard = shard
    return model
