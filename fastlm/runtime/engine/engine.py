"""fastlm.Engine: requests in, tokens out, one step at a time.

    engine = Engine(model, eos_token_ids=(eos,), tokenizer=tok)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=32, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():      # SequenceOutput: new tokens of one sequence, finished flagged
            ...
    engine.abort(rid)                  # at any time between steps

A step: schedule (scheduler.py) -> run the model on the packed spans (model_runner.py) -> register the
blocks that became full in the prefix cache -> sample the sequences whose span reached their last
token (sampler.py) -> append, detect the end (eos / stop_token_ids / stop strings / length).
The `n` samples of a request: the prompt is prefilled once; at its first token the other n - 1
sequences fork from it (sharing the prompt's full blocks, copying the partly filled one) and sample
their first tokens from the same logits. Not thread-safe: one thread steps it (see background.py).
"""
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence as Seq

import torch

from fastlm.runtime.compiled_step import CompiledDecodeSteps
from fastlm.runtime.cuda_graph import DecodeGraphs
from fastlm.runtime.engine.block_manager import BlockManager
from fastlm.runtime.engine.kv_pool import KVPool
from fastlm.runtime.engine.model_runner import ModelRunner, TensorParallelRunner
from fastlm.runtime.engine.sampler import TokenLogprobs, sample_rows
from fastlm.runtime.engine.scheduler import Scheduler
from fastlm.runtime.engine.sequence import Sequence
from fastlm.runtime.prompts import check_prompt_ids
from fastlm.runtime.sampling import SamplingParams, make_generator
from fastlm.runtime.text import SequenceText


@dataclass
class SequenceOutput:
    """What one sequence produced in one step."""
    request_id: int
    index: int  # which of the request's n samples
    token_ids: List[int]  # new ids (eos and stop_token_ids are not returned)
    text: str = ""  # new text, stop strings held back and cut ('' without a tokenizer)
    logprobs: List[TokenLogprobs] = field(default_factory=list)  # one per new id, when params.logprobs is set
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" (eos, stop token or string), "length", "abort"


def check_engine_options(*, block_size=16, kv_cache_memory=None, gpu_memory_utilization=0.9, max_num_seqs=64,
                         max_num_batched_tokens=1024) -> None:
    """ValueError naming the first of the Engine's sizes that is not valid."""
    for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if kv_cache_memory is not None and (isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int)):
        raise ValueError(f"kv_cache_memory must be a number of bytes, got {kv_cache_memory!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")


class _Request:
    def __init__(self, params: SamplingParams):
        self.params, self.seqs, self.forked = params, [], params.n == 1


class Engine:
    """Continuous batching over a paged KV pool for one model (fastlm.model.Transformer)."""

    def __init__(self, model, eos_token_ids: Seq[int] = (), tokenizer=None, *, block_size: int = 16,
                 kv_cache_memory: Optional[int] = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 1024, enable_prefix_caching: bool = True,
                 cuda_graphs: bool = True, compile: bool = False, vocab_size: Optional[int] = None,
                 tensor_parallel=None):
        """model: a fastlm Transformer; eos_token_ids end sequences; tokenizer (optional) gives text
        pieces and stop strings. KV pool: kv_cache_memory bytes (default: see kv_pool.py) in blocks of
        block_size tokens. Each step computes at most max_num_batched_tokens tokens of at most
        max_num_seqs running sequences. cuda_graphs: pure-decode steps on a GPU replay CUDA graphs
        (cuda_graph.py). compile: on a CPU, pure-decode steps of up to 8 rows run a torch.compile'd step
        where timed faster than eager (compiled_step.py; the first step of each batch size compiles,
        seconds to minutes). vocab_size: ids from it up are never sampled (a vocabulary padded
        beyond the tokenizer's; default: the model's). tensor_parallel: rank 0's TensorParallelGroup
        when model is rank 0's shard (fastlm.runtime.parallel; every rank's pool must have as many
        blocks): each step's inputs go to the other ranks, no CUDA graphs."""
        check_engine_options(block_size=block_size, kv_cache_memory=kv_cache_memory,
                             gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens)
        if compile and (tensor_parallel is not None or model.device.type != "cpu"):
            raise ValueError("compile=True is for one CPU process (a GPU replays CUDA graphs: cuda_graphs), got "
                             + ("a tensor-parallel model" if tensor_parallel is not None else f"{model.device}"))
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size if vocab_size is not None and vocab_size < model.config.vocab_size else None
        self.pool = KVPool(model, block_size, kv_cache_memory, max_num_seqs, gpu_memory_utilization)
        self.blocks = BlockManager(self.pool.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        if tensor_parallel is not None:
            self.runner = TensorParallelRunner(model, self.pool, tensor_parallel)
        else:
            graphs, max_blocks = None, self.blocks.blocks_for(model.config.max_seq_len)
            if cuda_graphs and self.pool.k.is_cuda:
                graphs = DecodeGraphs(model, self.pool, max_num_seqs, max_blocks)
            elif compile:
                graphs = CompiledDecodeSteps(model, self.pool, max_num_seqs, max_blocks, self.vocab_size)
            self.runner = ModelRunner(model, self.pool, graphs)
        self.requests: Dict[int, _Request] = {}
        self._ids, self._arrivals = itertools.count(), itertools.count()
        self._pending_copies = []  # (src, dst) blocks of forks, copied before the next forward
        self.aborted_sequences = 0  # sequences stopped by abort() before they finished

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, prompt_ids: Seq[int], params: Optional[SamplingParams] = None,
                    request_id: Optional[int] = None) -> int:
        """Queue a request; returns its id. ValueError for an empty prompt, ids outside the vocabulary,
        a prompt leaving no room in the context, or one that cannot fit the KV pool even alone."""
        params = SamplingParams() if params is None else params
        prompt = self.check_request(prompt_ids, params)
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        request = self.requests[rid] = _Request(params)
        self._new_sequence(rid, request, 0, prompt, arrival=next(self._arrivals))
        return rid

    def check_request(self, prompt_ids, params: SamplingParams) -> List[int]:
        """The prompt as a list of ids, if the request can run; ValueError naming the problem otherwise.
        Reads only constants: safe from any thread."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a fastlm.SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (Engine(..., tokenizer=...))")
        prompt = check_prompt_ids([prompt_ids], self.model.config.vocab_size, name="prompt_ids")[0]
        context = self.model.config.max_seq_len
        if len(prompt) >= context:
            raise ValueError(f"prompt is {len(prompt)} tokens but the model's context is {context} tokens "
                             f"(at most {context - 1} prompt tokens leave room to generate)")
        length = min(len(prompt) + params.max_new_tokens, context)
        need = self.blocks.blocks_for(length)
        if need > self.blocks.num_blocks:
            raise ValueError(f"a sequence of {length} tokens needs {need} KV blocks but the pool has "
                             f"{self.blocks.num_blocks}; give the engine more kv_cache_memory or ask for fewer tokens")
        return prompt

    def abort(self, request_id: int) -> None:
        """Stop a request now (no-op for an unknown or finished one); its blocks are freed."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.seqs:
                if not seq.finished:
                    self.scheduler.finish(seq, "abort")
                    self.aborted_sequences += 1

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> dict:
        return {"kv_blocks_total": self.blocks.num_blocks, "kv_blocks_free": self.blocks.num_free_blocks,
                "block_size": self.blocks.block_size,
                "prefix_cache_hit_tokens": self.scheduler.prefix_cache_hit_tokens,
                "preemptions": self.scheduler.preemptions, "aborted_sequences": self.aborted_sequences,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting)}

    # ---- the step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> List[SequenceOutput]:
        """Run one step; returns an output for each sequence that got a token or finished."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.runner.copy_blocks(self._pending_copies)
        self._pending_copies = []
        logits, sampled, greedy = self.runner.run(scheduled)
        for seq, span in scheduled.spans:
            seq.num_computed_tokens += span
            self.blocks.register_full_blocks(seq, seq.num_computed_tokens - span)
        rows, seqs = self._with_forks(sampled)
        if len(rows) != len(sampled):
            logits = logits[rows]
            greedy = None if greedy is None else greedy[rows]
        if self.vocab_size is not None:
            logits = logits[:, :self.vocab_size]
        tokens, logprobs = sample_rows(logits, seqs, self.eos_token_ids, greedy)
        return [self._append(seq, token, lp) for seq, token, lp in zip(seqs, tokens, logprobs)]

    def _with_forks(self, sampled: List[Sequence]):
        """Add the other n - 1 samples of requests whose first sequence samples its first token: they
        fork from it and sample from its logits row. -> (logits row per sequence, sequences)."""
        rows, seqs = list(range(len(sampled))), list(sampled)
        for row, seq in enumerate(sampled):
            request = self.requests[seq.request_id]
            if request.forked:
                continue
            request.forked = True
            for index in range(1, request.params.n):
                child = self._new_sequence(seq.request_id, request, index, seq.token_ids, seq.arrival, parent=seq)
                rows.append(row)
                seqs.append(child)
        return rows, seqs

    def _new_sequence(self, rid, request, index, prompt, arrival, parent=None) -> Sequence:
        params = request.params
        context = self.model.config.max_seq_len
        seq = Sequence(rid, index, arrival, prompt, params, min(len(prompt) + params.max_new_tokens, context))
        if params.seed is not None:
            seed = params.seed if index == 0 else hash((params.seed, index)) & (2 ** 63 - 1)
            seq.generator = make_generator(seed, self.model.device)
        if self.tokenizer is not None:
            seq.text = SequenceText(self.tokenizer, prompt, params.stop)
        request.seqs.append(seq)
        if parent is not None and self._fork(parent, seq):
            return seq
        self.scheduler.add(seq)
        return seq

    def _fork(self, parent: Sequence, child: Sequence) -> bool:
        """Share parent's blocks with child (running); False when it must wait and recompute instead."""
        if len(self.scheduler.running) >= self.scheduler.max_num_seqs or not self.blocks.can_fork(parent):
            return False
        copy = self.blocks.fork(parent, child)
        if copy is not None:
            self._pending_copies.append(copy)
        self.scheduler.add_running(child)
        return True

    def _append(self, seq: Sequence, token: int, logprobs) -> SequenceOutput:
        """Record a sampled token; finish the sequence at eos / stop token / stop string / length."""
        params = seq.params
        out = SequenceOutput(seq.request_id, seq.index, [])
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            return self._finish(seq, out, "stop")
        seq.token_ids.append(token)
        out.token_ids.append(token)
        if logprobs is not None:
            out.logprobs.append(logprobs)
        if seq.text is not None:
            out.text, stopped = seq.text.add(token)
            if stopped:
                return self._finish(seq, out, "stop")
        if seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= seq.max_length:
            return self._finish(seq, out, "length")
        return out

    def _finish(self, seq: Sequence, out: SequenceOutput, reason: str) -> SequenceOutput:
        if seq.text is not None:
            out.text += seq.text.finish()
        self.scheduler.finish(seq, reason)
        out.finished, out.finish_reason = True, reason
        request = self.requests.get(seq.request_id)
        if request is not None and request.forked and all(s.finished for s in request.seqs):
            del self.requests[seq.request_id]
        return out
