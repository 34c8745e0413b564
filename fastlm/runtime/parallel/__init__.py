"""Tensor-parallel inference through the engine: one model split across N ranks (processes, one per GPU
or a share of the CPU cores each), driven by rank 0's engine.

    llm = fastlm.LLM(path, tensor_parallel_size=2)          # this process is rank 0; ranks 1.. spawned
    torchrun --nproc-per-node 2 script.py                   # or every rank runs the script (see launch.py)

    ranks.py     ParallelOptions, the process group (spawned / torchrun / existing), each rank's shard
    launch.py    start_ranks: every rank up; rank 0 gets its shard and the group back
    group.py     rank 0's TensorParallelGroup: messages in order under one lock, heartbeat, failures, close
    messages.py  the step / copy / ping / stop messages as broadcasts
    worker.py    ranks 1..N-1: receive a step, run the forward, repeat

Rank 0 runs everything an Engine does (scheduler, block manager, prefix cache, sampling); per step it
broadcasts the model inputs (token ids and the AttentionMetadata tensors), then every rank runs its
shard's forward (fastlm.model.parallel: the all-reduces happen inside the layers) and rank 0 receives
the gathered logits. The layers and the shard-by-shard loading are fastlm.model.parallel(_loading).
"""
from fastlm.runtime.parallel.launch import RankZero, start_ranks
from fastlm.runtime.parallel.ranks import ParallelOptions

__all__ = ["ParallelOptions", "RankZero", "start_ranks"]
