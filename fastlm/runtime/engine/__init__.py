"""fastlm's engine: requests, not static batches (after nano-vllm's engine/ and vLLM's scheduler).

    sequence.py       one generated sequence: tokens, block table, computed-token count, status
    block_manager.py  ref-counted KV blocks and the prefix cache (chain hashes, LRU eviction)
    kv_pool.py        the paged K/V tensors, sized from a memory budget
    scheduler.py      continuous batching: decodes + chunked prefills under a token budget, preemption
    model_runner.py   a scheduled step -> AttentionMetadata -> the model's logits
    sampler.py        per-request sampling of a step's logits (seeded rows keep their own generator)
    engine.py         Engine: add_request / step / abort / stats
    background.py     EngineLoop: the step loop on one thread, tokens handed to sync or asyncio consumers
"""
from fastlm.runtime.engine.engine import Engine, SequenceOutput
from fastlm.runtime.engine.sampler import TokenLogprobs

__all__ = ["Engine", "SequenceOutput", "TokenLogprobs"]
