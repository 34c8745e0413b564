"""Pure-decode CPU steps through a torch.compile'd model step, per batch-size bucket, where it is faster.

A CPU decode step at batch 1 is a chain of GEMVs that read the weights plus ~600 small aten calls. Inductor
(freezing + max-autotune's C++ GEMM templates) fuses the small calls into a few C++ loops and generates
GEMVs for the exact shapes: on the project's AMD EPYC its fp32 GEMVs read 42 GB/s (the memory's 43) where
oneDNN's prepacked ones read 31, while its bf16 GEMVs were slower than oneDNN's. Machines differ, so the
step is chosen by measurement (fastlm.kernels.cpu_choice, family "decode_step"): the first step of each
bucket runs eager and compiled in turns, the faster is kept and cached per machine (a later load with
"eager" cached never compiles); FASTLM_CPU_KERNELS=eager|compiled forces one.

Padding and static buffers as in cuda_graph.DecodeGraphs: a step of B decode rows runs the compiled graph
of the next bucket (1, 2, 4, 8), so each bucket compiles once with static shapes (block tables at their
full width). Larger steps, prefills and the "eager" choice run the model as it is, unpadded. A compile
that fails is not fatal: a warning, the reason in compile_error, and every later step eager.
Inputs are checked eagerly before the compiled step runs: by Transformer.check_step on run's path, and
row by row in Python on run_decodes', the engine's path once a bucket runs compiled, which writes each
sequence's row straight into the static buffers and gets each row's greedy pick from the graph.
Memory: the compiled graphs hold frozen copies of the weights, and they outlive the engine (torch.compile
keeps them; torch._dynamo.reset() did not free them): one compiled model per process is best. Several run
correctly (each engine's step has its own code object, so its own compiled graphs and recompile limit).
"""
import itertools
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch._inductor.config as inductor_config

from fastlm.kernels import cpu_choice
from fastlm.kernels.argmax import argmax_rows
from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.runtime.cuda_graph import DecodeGraphs

_INSTANCES = itertools.count()
MAX_COMPILED_BATCH = 8  # larger decode steps are bound by the GEMVs' compute: Python overhead matters less
# cpp_wrapper: the graph's ~100 calls per step (kernels, GEMV/attention ops) from generated C++ instead of
# generated Python: in one process, alternating, batch-1 bf16 steps 6.44 -> 5.75 ms (GPT-2-124M) and
# 5.32 -> 5.02 ms (Llama-150M), batch 8 8.64 -> 8.32 ms, for ~3 s more compile per bucket.
# These reach Inductor through torch.compile(options=...); freezing does not (it must be set in the config
# while a step compiles), so it is a one-key config patch around each call (3 us, the whole dict 22 us).
COMPILE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True}
INDUCTOR_OPTIONS = {"freezing": True, **COMPILE_OPTIONS}  # all of them, as one config patch


def step_key(model, bucket: int) -> str:
    """What a decode-step choice depends on besides the machine: the model's shapes, dtype, quantization,
    the bucket and the thread count."""
    cfg, qcfg = model.config, getattr(model, "quant_config", None)  # set by fastlm.model.quantize
    quantized = "unquantized" if qcfg is None else qcfg.name + ("+head" if qcfg.quantize_head else "")
    dtype = str(model.dtype).replace("torch.", "")
    return (f"{dtype}|{cfg.model_type}-{cfg.norm}-{cfg.mlp}|L{cfg.n_layer}d{cfg.dim}h{cfg.n_head}kv{cfg.n_kv_head}"
            f"f{cfg.intermediate_size}v{cfg.vocab_size}|{quantized}|rows={bucket}|t{torch.get_num_threads()}")


def _guard_options() -> dict:
    """No Dynamo guards on the model's modules nor on globals (PyTorch >= 2.8 offers the filters).
    Module guards cost ~0.3 ms per step, and freezing fixes the weights at the first call anyway (inference
    only, see above). Global guards (~200: the kernel modules' functions, their switches read from
    os.environ, dtype constants) cost ~75 us per step after the step's weights have flushed the caches;
    those globals are settled when a bucket compiles: a kernel switch (FASTLM_KERNELS) changed later applies
    to engines built later, each of which compiles its own step."""
    filters = [getattr(torch.compiler, name, None)
               for name in ("skip_guard_on_all_nn_modules_unsafe", "skip_guard_on_globals_unsafe")]
    filters = [f for f in filters if f is not None]
    if not filters:
        return {}

    def keep(entries):
        return [all(verdicts) for verdicts in zip(*(f(entries) for f in filters))]
    return {"guard_filter_fn": keep}


def _check_row(row: int, n: int, table, block_size: int, num_blocks: int, width: int) -> None:
    """ValueError unless a decode row's block table fits the buffers, holds its new token n and names
    blocks of the pool only (the scratch block, num_blocks, is the padding rows')."""
    if len(table) > width:
        raise ValueError(f"decode row {row}: a block table of {len(table)} blocks, more than the {width} of "
                         "the model's context")
    if n // block_size >= len(table):
        raise ValueError(f"decode row {row}: token {n} has no block in block table {table} (block size {block_size})")
    if min(table) < 0 or max(table) >= num_blocks:
        raise ValueError(f"decode row {row}: block table {table} names blocks outside the pool's [0, {num_blocks})")


class CompiledDecodeSteps(DecodeGraphs):
    """DecodeGraphs' interface (bucket_for, run) for the engine's ModelRunner, on a CPU pool (Engine
    refuses compile=True elsewhere)."""

    def __init__(self, model, pool, max_batch: int, max_blocks_per_seq: int, vocab_size: Optional[int] = None):
        """vocab_size: the greedy picks' ids stay below it (the engine's; default: the model's)."""
        super().__init__(model, pool, min(max_batch, MAX_COMPILED_BATCH), max_blocks_per_seq, capture=False)
        self._host = tuple(t.numpy() for t in (self.input_ids, self.positions, self.slots, self.seqlens,
                                                self.block_tables))  # the static buffers, as run_decodes writes them
        limit = model.config.vocab_size if vocab_size is None else vocab_size

        def step(input_ids, meta):  # the model through a closure, not an argument: freezing then folds its weights
            logits = model.forward_step(input_ids, meta)
            # the greedy pick of every row, in the graph: ~0.1 ms less Python and op dispatch per step
            return logits, argmax_rows(logits[:, :limit])
        # Dynamo keeps compiled code per code object and guards the closure's model on its type only (its
        # weights are frozen in, its module guards skipped): each instance gets its own code object, else a
        # second model of the same structure would run the first one's frozen weights.
        step.__code__ = step.__code__.replace(co_name=f"decode_step_{next(_INSTANCES)}")
        self._compiled = torch.compile(step, dynamic=False, options={**COMPILE_OPTIONS, **_guard_options()})
        self._freezing = inductor_config.patch(freezing=True)  # built once: entering it is the cheap part
        self.choices: Dict[int, str] = {}  # bucket -> "eager" | "compiled"
        self.compile_error: Optional[str] = None

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        choice = self.choices.get(self.bucket_for(meta.num_decodes)) or self._choose(input_ids, meta)
        if choice == "compiled" and self.compile_error is None:
            self.model.check_step(input_ids, meta)
            return self._run_compiled(input_ids, meta)[0][:meta.num_decodes]
        return self.model(input_ids, metadata=meta)

    def run_decodes(self, seqs) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(logits (B, V), greedy picks (B,) int64: each row's argmax below vocab_size) of a step of B
        decode rows, each sampling, once their bucket runs compiled; None for any other step (run's path).
        Each row goes straight from its sequence into the static buffers, checked there in Python (its
        blocks in the pool, its new token in a block), instead of step tensors built, copied and checked
        by check_step: ~0.2 ms less Python and small ops per step, the caches cold after the step's
        weights. The bucket's shapes and dtypes were checked by run's first step, and the step's kernels
        still refuse a slot or table entry outside the pool."""
        bucket = self.bucket_for(len(seqs))
        if self.choices.get(bucket) != "compiled" or self.compile_error is not None:
            return None
        if any(seq.num_computed_tokens + 1 != seq.num_tokens for seq in seqs):
            return None  # a one-token prefill chunk that does not reach its sequence's end
        self._write_rows(seqs, bucket)
        logits, greedy = self._call(bucket)
        if bucket == len(seqs):
            return logits, greedy  # no padding rows: two slicing ops fewer
        return logits[:len(seqs)], greedy[:len(seqs)]

    def _write_rows(self, seqs, bucket: int) -> None:
        """run_decodes' rows into the static buffers (through NumPy views: CPU tensors), then the padding
        rows (_pad_rows)."""
        bs, batch = self.pool.block_size, len(seqs)
        ids, positions, slots, seqlens, tables = self._host
        for row, seq in enumerate(seqs):
            n, table = seq.num_computed_tokens, seq.block_table
            _check_row(row, n, table, bs, self.pool.scratch_block, tables.shape[1])
            ids[row], positions[row], seqlens[row] = seq.token_ids[n], n, n + 1
            slots[row] = table[n // bs] * bs + n % bs
            tables[row, :len(table)] = table
        self._pad_rows(batch, bucket)

    def _run_compiled(self, input_ids, meta):
        bucket = self.bucket_for(meta.num_decodes)
        self._fill(input_ids, meta, meta.num_decodes, bucket)
        return self._call(bucket)

    def _call(self, bucket: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # freezing folds the weights into the graph: inference only. It is a config patch around each call (a
        # step may recompile at any call); torch.compile(options=...) did not apply freezing.
        with torch.no_grad(), self._freezing:
            return self._compiled(self._ids[bucket], self._metadata(bucket))

    def _choose(self, input_ids, meta) -> str:
        """Time eager against compiled on this step (re-running a decode step rewrites the same K/V to the
        same slots) unless forced or cached; a failing compile leaves every step eager."""
        bucket = self.bucket_for(meta.num_decodes)
        key = step_key(self.model, bucket)
        candidates = {"eager": lambda: self.model(input_ids, metadata=meta),
                      "compiled": lambda: self._run_compiled(input_ids, meta)}
        if self.compile_error is None and cpu_choice.settled_choice("decode_step", key, candidates) != "eager":
            candidates["eager"]()  # settles the linears' kernel choices (cpu_linear) eagerly: tracing reads them
            try:
                self._run_compiled(input_ids, meta)  # compile now: not inside the timing
            except Exception as exc:  # noqa: BLE001 - a model that cannot be compiled still generates, eagerly
                warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {exc}); "
                              "decode steps run eagerly", stacklevel=4)
                self.compile_error = f"{type(exc).__name__}: {exc}"
        if self.compile_error is not None:
            candidates.pop("compiled")
        choice = cpu_choice.choose("decode_step", key, candidates)
        self.choices[bucket] = choice
        return choice
