"""Weight-only int8 / int4 against bf16, in one run: the linear layers alone, then whole decode steps.

1. Linears (bench_quant_linear.csv): fastlm.kernels.int8_linear and int4_linear (group 128) against the
   peer torch.nn.functional.linear with the bf16 weight, for the weight shapes of GPT-2-124M (and of a 7B
   Llama on CUDA), x of 1, 8 and 128 bf16 rows. GB/s counts the bytes of the weight as each stores it (int8 + scales,
   packed int4 + scales + zeros, bf16), so a kernel that reads its weight at the bf16 peer's speed shows
   the same GB/s and a 2x (int8) or ~3.6x (int4) shorter time. On CUDA these are the Triton kernels, on CPU
   the path quant.py picks on this machine (PyTorch's packed kernels or dequantize + linear).
2. Decode (bench_quant_decode.csv): fastlm's runtime (fastlm.LLM(..., quantize=...)) on random GPT-2-124M
   and Llama-150M shaped checkpoints in bf16, int8 and int4-g128, batch 1 and 8: decode tokens/s, weight
   bytes per step, their GB/s and its fraction of the measured read bandwidth, the speedup over fastlm's
   own bf16, and the model's resident weight bytes relative to bf16 (with the CPU int4 kernel's repacked
   copies). "+head": the token embedding and LM head quantized too (quantize_head). The formats are timed
   in turns.

    python benchmarks/bench_quant.py --quick           # small shapes and models (CPU: ~1 minute)
    python benchmarks/bench_quant.py --skip-linears --device cpu --threads 2 --compile   # compiled CPU steps
    python -m benchmarks.bench_quant --device cuda
Writes benchmarks/out/bench_quant_{linear,decode}.csv and .png.
"""
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_generate import FULL, QUICK, save_random_checkpoint  # noqa: E402
from benchmarks.common import base_parser, check_device, describe_device, plot, time_ms_each, write_csv  # noqa: E402
from fastlm.kernels import _quant_cpu, int4_linear, int8_linear, quantize_int4, quantize_int8  # noqa: E402
from fastlm.kernels.quant import QuantLinear  # noqa: E402
from fastlm.runtime.bench import bench_engine, engine_speed, read_bandwidth_gbs, weight_bytes_per_step  # noqa: E402

SHAPES = {"gpt2 qkv": (2304, 768), "gpt2 mlp up": (3072, 768), "gpt2 mlp down": (768, 3072)}
SHAPES_7B = {"7B qkv": (12288, 4096), "7B mlp up": (22016, 4096), "7B mlp down": (4096, 11008)}  # CUDA only
QUICK_SHAPES = {"gpt2 qkv": (2304, 768), "gpt2 mlp down": (768, 3072)}
FORMATS = ("bf16", "int8", "int4")  # the linears benchmark
DECODE_FORMATS = ("bf16", "int8", "int4", "int8+head", "int4+head")  # +head: embedding and LM head quantized too


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_linears(shapes, rows_list, device, reps):
    rows = []
    for label, (N, K) in shapes.items():
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        q8, q4 = quantize_int8(w), quantize_int4(w, 128)
        sizes = {"bf16": _nbytes(w), "int8": _nbytes(*q8), "int4": _nbytes(*q4)}
        for M in rows_list:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            ms = time_ms_each({"bf16": lambda: F.linear(x, w), "int8": lambda: int8_linear(x, *q8),
                               "int4": lambda: int4_linear(x, *q4)}, device, reps=reps)
            for fmt in FORMATS:
                rows.append(dict(shape=label, N=N, K=K, M=M, format=fmt, ms=round(ms[fmt], 4),
                                 weight_mb=round(sizes[fmt] / 1e6, 2),
                                 weight_gbs=round(sizes[fmt] / (ms[fmt] * 1e-3) / 1e9, 2),
                                 ratio_vs_bf16_linear=round(ms["bf16"] / ms[fmt], 2)))
                print(" ".join(f"{rows[-1][k]!s:>{w}}" for k, w in LINEAR_COLUMNS), flush=True)
    return rows


LINEAR_COLUMNS = [("shape", 14), ("M", 4), ("format", 6), ("ms", 9), ("weight_gbs", 8), ("ratio_vs_bf16_linear", 6)]
DECODE_COLUMNS = [("model", 11), ("format", 9), ("batch", 5), ("decode_tok_s", 9), ("weight_gb", 7),
                  ("weight_gbs", 7), ("roofline_fraction", 6), ("ratio_vs_bf16", 6), ("memory_x_bf16", 6)]


def _resident_bytes(model):
    """Parameters and buffers, plus the copies the CPU int4 kernel repacks the weights into (cached
    beside the module's own integers, see fastlm/kernels/_quant_cpu.py)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.bits == 4:
            cached = _quant_cpu._int4_cache.get(id(module.weight))
            tensors.update({id(t): t for t in (cached[3] if cached else ())})
    return sum(_nbytes(t) for t in tensors.values())


def bench_decode(configs, device, batch_sizes, prompt_len, new_tokens, repeats, read_gbs, compile=False):
    """The three formats of one model are timed in turns (bf16, int8, int4, bf16, ...), each turn a whole
    decode run, and each reports its median: load from other processes falls on every format alike.
    compile: the engines' decode steps through torch.compile where timed faster (CPU; LLM(compile=True))."""
    import fastlm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, kwargs) in configs.items():
            folder = save_random_checkpoint(family, kwargs, os.path.join(tmp, name))
            models = {fmt: fastlm.LLM(folder, dtype="bfloat16", device=device,
                                      quantize=None if fmt == "bf16" else fmt.removesuffix("+head"),
                                      quantize_head=fmt.endswith("+head")).model for fmt in DECODE_FORMATS}
            for batch in batch_sizes:
                # one engine per format, kept across the turns (compile: one compiled step per engine)
                engines = {fmt: bench_engine(model, batch, prompt_len + new_tokens + 1, compile=compile,
                                             max_num_batched_tokens=batch * prompt_len)
                           for fmt, model in models.items()}
                runs = {fmt: [] for fmt in DECODE_FORMATS}
                for _ in range(repeats):
                    for fmt, engine in engines.items():
                        runs[fmt].append(engine_speed(engine, batch, prompt_len, new_tokens, 1)["decode_tok_s"])
                for fmt, model in models.items():
                    rows.append(_decode_row(name, fmt, batch, statistics.median(runs[fmt]),
                                            statistics.median(runs["bf16"]), model, models["bf16"], read_gbs))
                    print(" ".join(f"{rows[-1][k]!s:>{w}}" for k, w in DECODE_COLUMNS), flush=True)
            del models
    return rows


def _decode_row(name, fmt, batch, tok_s, bf16_tok_s, model, bf16_model, read_gbs):
    weight_gb = weight_bytes_per_step(model) / 1e9
    gbs = tok_s / batch * weight_gb
    return dict(model=name, format=fmt, batch=batch, decode_tok_s=round(tok_s, 2), weight_gb=round(weight_gb, 4),
                weight_gbs=round(gbs, 2), roofline_fraction=round(gbs / read_gbs, 3),
                ratio_vs_bf16=round(tok_s / bf16_tok_s, 2),
                memory_x_bf16=round(_resident_bytes(model) / _resident_bytes(bf16_model), 3))


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip-linears", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="CPU: decode steps through torch.compile where timed faster (LLM(compile=True))")
    args = parser.parse_args(argv)
    device = check_device(args.device, args.threads)
    if args.compile and device.type != "cpu":
        parser.error("--compile is for CPU decode steps (CUDA runs CUDA graphs)")
    read_gbs = read_bandwidth_gbs(device)
    print(f"{describe_device(device)}; memory read {read_gbs:.1f} GB/s (fp32 sum)")
    written = []
    if not args.skip_linears:
        print(" ".join(f"{k:>{w}}" for k, w in LINEAR_COLUMNS))
        shapes = QUICK_SHAPES if args.quick else dict(SHAPES, **(SHAPES_7B if device.type == "cuda" else {}))
        rows = bench_linears(shapes, (1, 8) if args.quick else (1, 8, 128), device,
                             reps=5 if args.quick else 20)
        for row in rows:
            row.update(read_gbs=round(read_gbs, 1), device=describe_device(device))
        written.append(write_csv(rows, os.path.join(args.out, "bench_quant_linear.csv")))
        written.append(plot([r for r in rows if r["format"] != "bf16"], os.path.join(args.out, "bench_quant_linear.png"),
                            x="M", y="ratio_vs_bf16_linear", series=lambda r: f"{r['shape']} {r['format']}",
                            title="weight-only linears: speedup over bf16 F.linear", ylabel="x bf16 F.linear",
                            hline=1.0, hline_label="bf16 F.linear"))
    if not args.skip_decode:
        print(" ".join(f"{k:>{w}}" for k, w in DECODE_COLUMNS))
        prompt_len, new_tokens, repeats = (16, 8, 2) if args.quick else (128, 64, 5)
        rows = bench_decode(QUICK if args.quick else FULL, device, (1, 8), prompt_len, new_tokens, repeats, read_gbs,
                            compile=args.compile)
        for row in rows:
            row.update(prompt_len=prompt_len, new_tokens=new_tokens, read_gbs=round(read_gbs, 1),
                       device=describe_device(device), compile=args.compile)
        written.append(write_csv(rows, os.path.join(args.out, "bench_quant_decode.csv")))
        written.append(plot(rows, os.path.join(args.out, "bench_quant_decode.png"), x="batch", y="decode_tok_s",
                            series=lambda r: f"{r['model']} {r['format']}", title="decode tokens/s by weight format",
                            ylabel="tokens/s"))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
