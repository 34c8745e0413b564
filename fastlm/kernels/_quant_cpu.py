"""CPU paths of the quantized linears: PyTorch's packed weight-only kernels, fastlm's C++ GEMVs, or
dequantize + F.linear.

Candidates per call, x (M, K) 2-D:
  - "packed": torch.ops.aten._weight_int8pack_mm(x, weight int8, scale in x's dtype), and for int4
    _weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros (Kp/G, N, 2)) on the weight repacked once by
    _convert_weight_to_int4pack_for_cpu (cached per weight tensor, see _int4_packed). They exist in recent
    PyTorch only (probed at run time); the int4 one wants N % 16 == 0, so other N (a 50257-token LM head)
    get zero rows in the repacked copy and their outputs are sliced off.
  - "gemv" (decode sizes, fp32/bf16 x): fastlm's C++ GEMVs (csrc/cpu_quant_gemv.cpp, where they build)
    reading the formats as stored: no repacked copy (a timed int4 "packed" copy is dropped when another
    candidate wins, so the weights take the format's memory).
  - "dequant": the weight dequantized to x's dtype, then F.linear (int4: dequantized by the C++ library
    where it builds, the same values ~50x faster than the PyTorch definition); for int8 in bf16 instead
    F.linear with the integers converted to x's dtype (exact) and the per-channel scale applied to its
    output in fp32: a plain conversion is ~5x faster than torch's mixed int8 x fp32 multiply, and the
    matmul then costs what the bf16 one does (prefill).
Which is faster depends on the CPU, the activations' dtype and the size: on the development machine (AMD
EPYC, avx512_bf16, 2 threads, GPT-2 shapes) one bf16 row took the C++ GEMVs 15-30% less time than the packed
kernels when the weights stream from memory (as in a decode step), but more when the weight sits in cache;
128 bf16 rows took 0.8 ms dequantized (C++) against 1.4 ms packed for a 2304 x 768 int4 weight. So the
choice is timed by fastlm.kernels.cpu_choice (families "int8_linear" / "int4_linear", key: dtype, decode or
prefill size, weight shape, threads, the candidates' names), decode sizes with the caches flushed before
each call: the first call for a (format, dtype, size class, shape) on a machine times the candidates on
its own inputs, the choice is cached on disk for later processes and kept in memory for this one
(`choices()` shows them); FASTLM_CPU_KERNELS=packed|dequant|gemv forces one. Under torch.compile a settled
"gemv" or "dequant" is traced inline (settled_cpu_path); "packed" and unsettled calls stay behind
quant.py's opaque custom op.
"""
import weakref

import torch
import torch.nn.functional as F

from fastlm.kernels import _cpu_ext, cpu_choice

DECODE_MAX_ROWS = 16
INT4_PACK_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants N % 16 == 0: other N are padded with zero rows
_choices = {}  # (format, dtype, "decode" | "prefill", "NxK") -> candidate name
_int4_cache = {}  # id(packed weight) -> (weakrefs to packed/scale/zero, their versions, dtype, converted tensors)


def choices() -> dict:
    """The decisions made so far in this process: {(format, dtype, size class, "NxK"): candidate}."""
    return dict(_choices)


def _op(name):
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):  # older PyTorch: the op does not exist
        return None


def int8_packed_available() -> bool:
    return _op("_weight_int8pack_mm") is not None


def int4_packed_available() -> bool:
    return _op("_weight_int4pack_mm_for_cpu") is not None and _op("_convert_weight_to_int4pack_for_cpu") is not None


def int8_linear_cpu(x, weight, scale, bias, dequantize):
    """dequantize: fastlm.kernels.quant.dequantize_int8 (the one definition of the format)."""
    memo = _memo("int8", x, shape_key(weight.shape))
    name = _choices.get(memo) or _choose(memo, x, _int8_names(x),
                                         lambda n: run_int8(n, x, weight, scale, bias, dequantize))
    return run_int8(name, x, weight, scale, bias, dequantize)


INT8_PACK_K = 16  # PyTorch 2.13's _weight_int8pack_mm crashed (segmentation fault) for K % 16 != 0 at 2+ rows


def _int8_names(x):
    names = ["dequant"]
    if int8_packed_available() and x.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and x.shape[1] % INT8_PACK_K == 0:
        names.append("packed")
    if _gemv_offered(x):
        names.append("gemv")
    return names


def run_int8(name, x, weight, scale, bias, dequantize):
    """x (M, K) @ the int8 weight through the candidate `name` ("gemv" | "packed" | "dequant")."""
    if name == "gemv":
        return torch.ops.fastlm_cpu.int8_gemv(x, weight, scale.float(), _cast(bias, x))
    if name == "packed":
        return int8_packed(x, weight, scale, bias)
    if x.dtype != torch.bfloat16:  # fp16: x @ q.T (|q| <= 127) could overflow before the scale
        return F.linear(x, dequantize(weight, scale, x.dtype), _cast(bias, x))
    return _scaled_after(F.linear(x, weight.to(x.dtype)), scale, bias)


def _scaled_after(y, scale, bias):
    """(y * scale + bias) computed in fp32, returned in y's dtype."""
    out = y.float() * scale.float()
    return (out if bias is None else out + bias.float()).to(y.dtype)


def int8_packed(x, weight, scale, bias):
    if x.shape[1] % INT8_PACK_K:
        raise ValueError(f"the packed int8 kernel takes in_features divisible by {INT8_PACK_K} (PyTorch's "
                         f"_weight_int8pack_mm crashed on others), got {x.shape[1]}")
    y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight.contiguous(), scale.to(x.dtype))
    return y if bias is None else y + bias.to(y.dtype)


def int4_linear_cpu(x, weight, scale, zero, bias, dequantize):
    """dequantize: fastlm.kernels.quant.dequantize_int4."""
    memo = _memo("int4", x, shape_key((weight.shape[0], x.shape[1])))
    name = _choices.get(memo)
    if name is None:
        name = _choose(memo, x, _int4_names(x), lambda n: run_int4(n, x, weight, scale, zero, bias, dequantize))
        if name != "packed":  # timing may have repacked this weight: drop that copy
            _int4_cache.pop(id(weight), None)
    return run_int4(name, x, weight, scale, zero, bias, dequantize)


def _int4_names(x):
    names = ["dequant"]
    if int4_packed_available() and x.dtype in (torch.float32, torch.bfloat16):
        names.append("packed")
    if _gemv_offered(x):
        names.append("gemv")
    return names


def run_int4(name, x, weight, scale, zero, bias, dequantize):
    """x (M, K) @ the int4 weight through the candidate `name` ("gemv" | "packed" | "dequant")."""
    if name == "gemv":
        return torch.ops.fastlm_cpu.int4_gemv(x, weight, scale.float(), zero.float(), _cast(bias, x))
    if name == "packed":
        return int4_packed(x, weight, scale, zero, bias)
    if _cpu_ext.load():  # the same weights as `dequantize`, ~50x faster (csrc/cpu_quant_gemv.cpp)
        w = torch.ops.fastlm_cpu.int4_dequantize(weight, scale.float(), zero.float(), x.shape[1], x.dtype)
    else:
        w = dequantize(weight, scale, zero, x.shape[1], x.dtype)
    return F.linear(x, w, _cast(bias, x))


def settled_choice(fmt, x, shape):
    """The candidate chosen for a call of x (M, K) on a weight of `shape` ("NxK", see shape_key) in this
    process, or None (not timed yet): fastlm.kernels.quant.QuantLinear then runs it without the public
    function's checks and dispatch (~50 calls per token)."""
    return _choices.get(_memo(fmt, x, shape))


def settled_cpu_path(fmt, x, weight_shape):
    """The candidate already chosen for this call in this process where a traced call (torch.compile) can
    run it inline ("gemv": a custom op with a fake; "dequant": plain torch ops; int8's "packed": one aten op
    with a meta kernel, its scale cast folded by freezing), else None: the opaque fastlm::int*_linear op,
    whose Python dispatch and casts cost ~15-20 us a call in a compiled step (int4's "packed" keeps it: its
    repacked-weight cache is not traceable)."""
    name = settled_choice(fmt, x, shape_key(weight_shape))
    return name if name in ("gemv", "dequant") or (fmt, name) == ("int8", "packed") else None


def _gemv_offered(x) -> bool:
    """fastlm's C++ GEMVs (csrc/cpu_quant_gemv.cpp) read the formats as stored: decode sizes, fp32/bf16 x."""
    return x.shape[0] <= DECODE_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16) and _cpu_ext.load()


def int4_packed(x, weight, scale, zero, bias):
    packed, scales_zeros = _int4_packed(weight, scale, zero, x.dtype)
    Kp = 2 * weight.shape[1]
    x = F.pad(x, (0, Kp - x.shape[1])) if x.shape[1] != Kp else x.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, Kp // scale.shape[1], scales_zeros)
    y = y[:, :weight.shape[0]] if y.shape[1] != weight.shape[0] else y  # rows padded to a multiple of 16
    return y if bias is None else y + bias.to(y.dtype)


def _cast(bias, x):
    return None if bias is None else bias.to(x.dtype)


def _int4_packed(weight, scale, zero, dtype):
    """(_convert_weight_to_int4pack_for_cpu(q), scales_and_zeros (Kp/G, N, 2) in dtype), built once per
    weight tensor and dtype; rebuilt when the tensors change in place (their versions) or are freed."""
    key = id(weight)
    tensors = (weight, scale, zero)
    hit = _int4_cache.get(key)
    if hit is not None:
        refs, versions, cached_dtype, value = hit
        if all(r() is t for r, t in zip(refs, tensors)) and versions == [t._version for t in tensors] \
                and cached_dtype == dtype:
            return value
    pad = -weight.shape[0] % INT4_PACK_ROWS  # the packed layout takes whole tiles of 16 output rows
    q = torch.stack((weight & 15, weight >> 4), dim=2).view(weight.shape[0], -1).to(torch.int32)
    q, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (q, scale, zero))  # zero rows: outputs sliced off
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_zeros = torch.stack((scale.t(), zero.t()), dim=2).to(dtype).contiguous()
    value = (packed, scales_zeros)
    refs = [weakref.ref(t, lambda _, k=key: _int4_cache.pop(k, None)) for t in tensors]
    _int4_cache[key] = (refs, [t._version for t in tensors], dtype, value)
    return value


def shape_key(weight_shape) -> str:
    """(N, K) -> "NxK", the shape in choices' keys."""
    return "x".join(map(str, weight_shape))


def _memo(fmt, x, shape):
    """(fmt, x's dtype, x's size class, shape_key): one choice for every layer of a shape.
    Per shape: one choice for every layer picked dequantize + linear for a 32000-row int8 LM head after
    timing a 768-wide layer (converting the whole head each step)."""
    return fmt, x.dtype, "decode" if x.shape[0] <= DECODE_MAX_ROWS else "prefill", shape


def _choose(memo, x, names, run):
    """Times the candidates `names` (run(name) runs one on this call's inputs) through cpu_choice and
    keeps the choice in memory; see the module docstring. The key names the candidates: a choice made
    without one is not reused with it."""
    fmt, _, size, shape = memo
    key = (f"{str(x.dtype).removeprefix('torch.')}|{size}|{shape}|threads={torch.get_num_threads()}"
           f"|{'+'.join(sorted(names))}")
    cold = size == "decode"  # a decode step streams its weights from memory: time them that way
    name = cpu_choice.choose(f"{fmt}_linear", key, {n: (lambda n=n: run(n)) for n in names}, cold=cold)
    _choices[memo] = name if name in names else "dequant"
    return _choices[memo]
