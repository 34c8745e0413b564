"""The GEMVs of a batch-1 CPU decode step, per implementation, against the memory's read bandwidth.

A decode step at batch 1 reads every weight once; its floor is bytes / read bandwidth. This times the
chain of the 48 linear layers of a GPT-2-124M-shaped model (12 x qkv 2304x768, out 768x768, up
3072x768, down 768x3072, ~340 MB in fp32: far beyond the caches) on one row, each layer's output
feeding the next, through:
  - aten: F.linear (torch's BLAS);
  - onednn: fastlm's oneDNN-prepacked weights (fastlm.runtime.cpu_linear.PackedLinear);
  - compiled: torch.compile with Inductor freezing + max-autotune's C++ GEMM templates (what
    `--compile` / LLM(compile=True) uses for the decode step, fastlm.runtime.compiled_step);
  - gemv: fastlm's C++ GEMV (fastlm.kernels.gemv; skipped where it does not build).
Reported as ms per chain, GB/s of weights and the fraction of the read bandwidth measured in the same
run (a large fp32 sum). Rounds alternate the implementations; medians.

    python benchmarks/bench_cpu_gemv.py [--threads 2] [--dtypes float32 bfloat16]
Writes benchmarks/out/bench_cpu_gemv.csv.
"""
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import base_parser, check_device, write_csv  # noqa: E402

SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072))  # (out, in) of one GPT-2 block's linears
LAYERS = 12


class Chain(nn.Module):
    """The block's four linears, LAYERS times; each output feeds the next (sliced to the next's width)."""

    def __init__(self, dtype):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(k, n, dtype=dtype) for _ in range(LAYERS) for n, k in SHAPES)

    def forward(self, x):
        for i in range(0, len(self.linears), 4):
            qkv, out, up, down = self.linears[i:i + 4]
            x = down(up(out(qkv(x)[..., :768]))) + x
        return x


def implementations(dtype):
    from fastlm.kernels.gemv import cpu_gemv_available, cpu_gemv_build_error
    from fastlm.runtime.compiled_step import INDUCTOR_OPTIONS
    from fastlm.runtime.cpu_linear import pack_linears
    import torch._inductor.config as inductor_config

    aten = Chain(dtype).eval()
    onednn = copy.deepcopy(aten)
    pack_linears(onednn, 1, min_bytes=0)
    for module in onednn.modules():  # the packed path, whatever the timed choice would be
        if hasattr(module, "group"):
            module.group.choices = ["onednn"] * len(module.group.choices)
    compiled = torch.compile(copy.deepcopy(aten), dynamic=False)

    def run_compiled(x):
        with inductor_config.patch(INDUCTOR_OPTIONS):
            return compiled(x)
    nbytes = sum(p.numel() * p.element_size() for p in aten.parameters())
    impls = {"aten": aten, "onednn": onednn, "compiled": run_compiled}
    if cpu_gemv_available():
        gemv = copy.deepcopy(aten)
        pack_linears(gemv, 1, min_bytes=0)
        for module in gemv.modules():
            if hasattr(module, "group"):
                module.group.choices = ["gemv"] * len(module.group.choices)
        impls["gemv"] = gemv
    else:
        print(f"gemv skipped: {cpu_gemv_build_error()}")
    return impls, nbytes


def read_gbs():
    from fastlm.runtime.bench import read_bandwidth_gbs

    return read_bandwidth_gbs("cpu")


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    check_device("cpu", args.threads)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        impls, nbytes = implementations(dtype)
        x = torch.randn(1, 768, dtype=dtype)
        times = {name: [] for name in impls}
        with torch.no_grad():
            for fn in impls.values():  # warm-up (and the compile, with its autotuning)
                fn(x)
            bandwidth = read_gbs()
            for _ in range(args.rounds):
                for name, fn in impls.items():
                    start = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            seconds = statistics.median(values)
            row = {"dtype": dtype_name, "impl": name, "threads": torch.get_num_threads(), "weights_mb": round(nbytes / 1e6, 1),
                   "ms": round(seconds * 1e3, 3), "gbs": round(nbytes / seconds / 1e9, 1),
                   "read_gbs": round(bandwidth, 1), "of_read": round(nbytes / seconds / 1e9 / bandwidth, 3)}
            print(row, flush=True)
            rows.append(row)
    print(f"wrote {write_csv(rows, os.path.join(args.out, 'bench_cpu_gemv.csv'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
