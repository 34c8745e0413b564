"""fastlm.kernels: fused Triton kernels, usable on their own in any PyTorch project.

Imports only torch and triton (never transformers, never the rest of fastlm).
CUDA tensors run the Triton kernels; CPU tensors run the PyTorch references, or the Triton kernels
under the interpreter when TRITON_INTERPRET=1.
"""
from fastlm.kernels.attention import attention_ref, decode_attention, flash_attention
from fastlm.kernels.norms import LayerNorm, RMSNorm, layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from fastlm.kernels.patch import PatchReport, patch
from fastlm.kernels.quant import (QuantLinear, dequantize_int4, dequantize_int8, int4_linear, int8_linear,
                                  quantize_int4, quantize_int8)

__all__ = [
    "LayerNorm", "RMSNorm", "layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref",
    "attention_ref", "flash_attention", "decode_attention", "patch", "PatchReport",
    "quantize_int8", "quantize_int4", "dequantize_int8", "dequantize_int4", "int8_linear", "int4_linear",
    "QuantLinear",
]
