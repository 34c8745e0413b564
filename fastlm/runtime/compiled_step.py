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
Inputs are checked eagerly (Transformer.check_step) before the compiled step runs.
Memory: the compiled graphs hold frozen copies of the weights, and they outlive the engine (torch.compile
keeps them; torch._dynamo.reset() did not free them): one compiled model per process is best. Several run
correctly (each engine's step has its own code object, so its own compiled graphs and recompile limit).
"""
import itertools
import warnings
from typing import Dict, Optional

import torch
import torch._inductor.config as inductor_config

from fastlm.kernels import cpu_choice
from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.runtime.cuda_graph import DecodeGraphs

_INSTANCES = itertools.count()
MAX_COMPILED_BATCH = 8  # larger decode steps are bound by the GEMVs' compute: Python overhead matters less
# cpp_wrapper: the graph's ~100 calls per step (kernels, GEMV/attention ops) from generated C++ instead of
# generated Python: in one process, alternating, batch-1 bf16 steps 6.44 -> 5.75 ms (GPT-2-124M) and
# 5.32 -> 5.02 ms (Llama-150M), batch 8 8.64 -> 8.32 ms, for ~3 s more compile per bucket.
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                    "cpp_wrapper": True}


def step_key(model, bucket: int) -> str:
    """What a decode-step choice depends on besides the machine: the model's shapes, dtype, quantization,
    the bucket and the thread count."""
    cfg, qcfg = model.config, getattr(model, "quant_config", None)  # set by fastlm.model.quantize
    quantized = "unquantized" if qcfg is None else qcfg.name + ("+head" if qcfg.quantize_head else "")
    dtype = str(model.dtype).replace("torch.", "")
    return (f"{dtype}|{cfg.model_type}-{cfg.norm}-{cfg.mlp}|L{cfg.n_layer}d{cfg.dim}h{cfg.n_head}kv{cfg.n_kv_head}"
            f"f{cfg.intermediate_size}v{cfg.vocab_size}|{quantized}|rows={bucket}|t{torch.get_num_threads()}")


def _guard_options() -> dict:
    """No Dynamo guards on the model's modules (PyTorch >= 2.8 offers the filter): checking them cost ~0.3
    ms per step, and freezing already fixes the weights at the first call (inference only, see above)."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return {} if skip is None else {"guard_filter_fn": skip}


class CompiledDecodeSteps(DecodeGraphs):
    """DecodeGraphs' interface (bucket_for, run) for the engine's ModelRunner, on a CPU pool (Engine
    refuses compile=True elsewhere)."""

    def __init__(self, model, pool, max_batch: int, max_blocks_per_seq: int):
        super().__init__(model, pool, min(max_batch, MAX_COMPILED_BATCH), max_blocks_per_seq, capture=False)
        def step(input_ids, meta):  # the model through a closure, not an argument: freezing then folds its weights
            return model.forward_step(input_ids, meta)
        # Dynamo keeps compiled code per code object and guards the closure's model on its type only (its
        # weights are frozen in, its module guards skipped): each instance gets its own code object, else a
        # second model of the same structure would run the first one's frozen weights.
        step.__code__ = step.__code__.replace(co_name=f"decode_step_{next(_INSTANCES)}")
        self._compiled = torch.compile(step, dynamic=False, options=_guard_options())
        self.choices: Dict[int, str] = {}  # bucket -> "eager" | "compiled"
        self.compile_error: Optional[str] = None

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        choice = self.choices.get(self.bucket_for(meta.num_decodes)) or self._choose(input_ids, meta)
        if choice == "compiled" and self.compile_error is None:
            self.model.check_step(input_ids, meta)
            return self._run_compiled(input_ids, meta)[:meta.num_decodes]
        return self.model(input_ids, metadata=meta)

    def _run_compiled(self, input_ids, meta):
        bucket = self.bucket_for(meta.num_decodes)
        self._fill(input_ids, meta, meta.num_decodes, bucket)
        # freezing folds the weights into the graph: inference only. The options as a config patch around
        # each call (a step may recompile at any call); torch.compile(options=...) did not apply freezing.
        with torch.no_grad(), inductor_config.patch(INDUCTOR_OPTIONS):
            return self._compiled(self.input_ids[:bucket], self._metadata(bucket))

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
