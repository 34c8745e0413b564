"""fastlm.kernels: fused Triton kernels, usable on their own in any PyTorch project.

Imports only torch and triton (never transformers, never the rest of fastlm).
CUDA tensors run the Triton kernels; CPU tensors run the PyTorch references, or the Triton kernels
under the interpreter when TRITON_INTERPRET=1; FASTLM_KERNELS=reference forces the references everywhere.

Layout: one family per public file over a private kernel module; imports run one way, at module top:

    __init__.py, patch.py          the package API; patch() for transformers models
      -> norms.py, attention.py, quant.py
                                   public family files, read top to bottom: PyTorch references, custom ops
                                   (torch.library: fake + autograd, calling a launcher or the reference),
                                   public functions (validation, docstring), nn.Modules
        -> _norm.py, _flash.py, _decode.py, _quant.py
                                   private kernel modules: header docstring (math, shapes, limits), the
                                   @triton.jit kernels, their launch configurations and host launchers
                                   (launch_*), and LAUNCHES: the configurations compile_check builds
           _quant_cpu.py           the quantized linears' CPU paths (PyTorch's packed kernels, timed)
           _cpu_ext.py, csrc/      fastlm's C++ CPU kernels (GEMV, paged decode attention): built per machine
    gemv.py                        the CPU GEMV's public function (decode-sized linears at memory bandwidth)
    argmax.py                      greedy picks over logits rows (C++ on CPU, torch.argmax elsewhere)
          -> _utils.py             dispatch rule (use_triton), argument checks, launch helpers, Launch
    compile_check.py               ahead-of-time compile of every module in its KERNEL_MODULES

A public function reaches its kernel through two files: rms_norm -> fastlm::norm_fwd (norms.py) ->
launch_norm_fwd -> _norm_fwd (_norm.py). A new family (e.g. quantized matmul, paged attention) adds a
private `_family.py` (kernels + launchers + LAUNCHES, one line in compile_check.KERNEL_MODULES) and puts
its reference, op and public function in a public file; it imports only downwards and no private
(underscored) name from another module: private modules export their launchers without an underscore.
"""
from fastlm.kernels.argmax import argmax_rows
from fastlm.kernels.attention import attention_ref, decode_attention, flash_attention
from fastlm.kernels.gemv import cpu_gemv, cpu_gemv_available, cpu_gemv_ref
from fastlm.kernels.paged_attention import paged_decode_attention, paged_kv_write, paged_prefill_attention
from fastlm.kernels.norms import LayerNorm, RMSNorm, layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from fastlm.kernels.patch import PatchReport, patch
from fastlm.kernels.quant import (QuantEmbedding, QuantLinear, dequantize_int4, dequantize_int8, int4_linear, int8_linear,
                                  quantize_int4, quantize_int8)

__all__ = [
    "LayerNorm", "RMSNorm", "layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref",
    "attention_ref", "flash_attention", "decode_attention",
    "paged_decode_attention", "paged_kv_write", "paged_prefill_attention", "patch", "PatchReport",
    "quantize_int8", "quantize_int4", "dequantize_int8", "dequantize_int4", "int8_linear", "int4_linear",
    "QuantLinear", "QuantEmbedding", "cpu_gemv", "cpu_gemv_ref", "cpu_gemv_available", "argmax_rows",
]
