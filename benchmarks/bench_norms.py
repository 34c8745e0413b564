"""LayerNorm / RMSNorm throughput: fastlm against torch, in GB/s, next to the measured copy bandwidth.

Peers: torch.nn.functional.layer_norm, and RMSNorm written in eager torch the way Llama implementations
do (upcast, pow/mean/rsqrt, downcast, times weight). With --residual variants ("+res"), the input is
h = x + residual first (fastlm fuses it; torch adds, then normalizes) and the h output gets a gradient too.

GB/s counts the minimal traffic, each tensor read or written once:
  forward:  read x (+ residual), weight (+ bias); write y (+ h)
  backward: read h, dy (+ dh), weight; write dx (the residual's gradient is the same tensor), dw (+ db)
On CUDA fastlm runs its Triton kernels; on CPU it runs its PyTorch reference (the CPU path), so CPU
figures compare that path with torch, not the kernels.

    python benchmarks/bench_norms.py --quick            # CPU: under a minute
    python -m benchmarks.bench_norms --device cuda      # GPU: fp16 + bf16, hidden 768 .. 16384
"""
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (base_parser, check_device, describe_device, measure_copy_bandwidth, plot,  # noqa: E402
                               time_ms_each, write_csv)
from fastlm.kernels import layer_norm, rms_norm  # noqa: E402

SIZES = [768, 1024, 2048, 4096, 5120, 8192, 12288, 16384]
QUICK_SIZES = [768, 4096, 16384]
EPS = 1e-5


def llama_rms_norm(x, weight, eps=EPS):
    """RMSNorm as HF's LlamaRMSNorm computes it, in eager torch."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def make_op(name, provider):
    """(x, w, b, r) -> y or (y, h), for op name in layer_norm / rms_norm with an optional '+res'."""
    kind, residual = name.split("+")[0], name.endswith("+res")
    if provider == "fastlm":
        if kind == "layer_norm":
            return lambda x, w, b, r: layer_norm(x, w, b, EPS, r if residual else None)
        return lambda x, w, b, r: rms_norm(x, w, EPS, r if residual else None)

    def torch_op(x, w, b, r):
        h = x + r if residual else x
        y = F.layer_norm(h, (h.shape[-1],), w, b, EPS) if kind == "layer_norm" else llama_rms_norm(h, w)
        return (y, h) if residual else y
    return torch_op


def traffic_bytes(name, M, N, dtype, backward):
    e, residual, bias = torch.finfo(dtype).bits // 8, name.endswith("+res"), name.startswith("layer_norm")
    params = N * e * (2 if bias else 1)
    fwd = M * N * e * (4 if residual else 2) + params
    bwd = M * N * e * (4 if residual else 3) + 2 * params
    return fwd + (bwd if backward else 0)


def bench_pair(name, M, N, dtype, device, backward, quick):
    """Median ms of fastlm and torch on the same inputs: {"fastlm": ms, "torch": ms}."""
    x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=backward)
    r = torch.randn(M, N, device=device, dtype=dtype, requires_grad=backward)
    w = torch.randn(N, device=device, dtype=dtype, requires_grad=backward)
    b = torch.randn(N, device=device, dtype=dtype, requires_grad=backward) if name.startswith("layer_norm") else None
    inputs = [t for t in (x, w, b, r if name.endswith("+res") else None) if t is not None]
    grads = [torch.randn(M, N, device=device, dtype=dtype) for _ in range(2)]

    def timed(op):
        if not backward:
            return lambda: op(x, w, b, r)

        def fwd_bwd():
            out = op(x, w, b, r)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.grad(outs, inputs, grads[:len(outs)])
        return fwd_bwd

    fns = {provider: timed(make_op(name, provider)) for provider in ("fastlm", "torch")}
    with torch.set_grad_enabled(backward):
        return time_ms_each(fns, device, warmup=1 if quick else 2, reps=5 if quick else 20, cuda_ms=20 if quick else 50)


def check_agreement(name, M, N, dtype, device):
    """A wrong kernel must not produce a fast number: compare fastlm with torch first."""
    x, r, w = (torch.randn(s, device=device, dtype=dtype) for s in ((M, N), (M, N), (N,)))
    b = torch.randn(N, device=device, dtype=dtype) if name.startswith("layer_norm") else None
    got, want = make_op(name, "fastlm")(x, w, b, r), make_op(name, "torch")(x, w, b, r)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)


def rows_for(N, device, quick):
    """Enough rows that the tensors dwarf the caches (GPU: 64M elements, 128 MB in fp16; CPU: 16-32 MB of fp32)."""
    target = 1 << 26 if device.type == "cuda" else (1 << 22 if quick else 1 << 23)
    return max(target // N, 1)


def run(args):
    device = check_device(args.device, args.threads)
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    sizes = QUICK_SIZES if args.quick and device.type == "cpu" else SIZES
    ops = ["layer_norm", "rms_norm", "layer_norm+res", "rms_norm+res"]
    copy_gbps = measure_copy_bandwidth(device, quick=args.quick)
    print(f"device: {describe_device(device)}   copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")
    print(f"{'op':<15} {'mode':<8} {'dtype':<9} {'N':>6} {'rows':>6} {'fastlm GB/s':>12} {'torch GB/s':>11} "
          f"{'ratio':>6} {'fastlm/copy':>12}")
    rows = []
    for dtype in dtypes:
        for name in ops:
            for N in sizes:
                M = rows_for(N, device, args.quick)
                check_agreement(name, min(M, 64), N, dtype, device)
                for backward in (False, True):
                    mode = "fwd+bwd" if backward else "fwd"
                    times = bench_pair(name, M, N, dtype, device, backward, args.quick)
                    nbytes = traffic_bytes(name, M, N, dtype, backward)
                    gbps = {provider: nbytes / (ms * 1e-3) / 1e9 for provider, ms in times.items()}
                    rows.append(dict(op=name, mode=mode, dtype=str(dtype)[6:], N=N, rows=M,
                                     fastlm_GBps=round(gbps["fastlm"], 2), torch_GBps=round(gbps["torch"], 2),
                                     ratio_vs_torch=round(gbps["fastlm"] / gbps["torch"], 3),
                                     fraction_of_copy=round(gbps["fastlm"] / copy_gbps, 3),
                                     ms_fastlm=round(times["fastlm"], 4), ms_torch=round(times["torch"], 4)))
                    print(f"{name:<15} {mode:<8} {str(dtype)[6:]:<9} {N:>6} {M:>6} {gbps['fastlm']:>12.1f} "
                          f"{gbps['torch']:>11.1f} {gbps['fastlm'] / gbps['torch']:>6.2f} "
                          f"{gbps['fastlm'] / copy_gbps:>11.0%}", flush=True)
    return rows, copy_gbps, device


def save(rows, copy_gbps, device, out):
    csv_path = write_csv(rows, os.path.join(out, f"bench_norms_{device.type}.csv"))
    print(f"wrote {csv_path}")
    long = [dict(r, provider=p, GBps=r[f"{p}_GBps"]) for r in rows for p in ("fastlm", "torch")]
    for mode in ("fwd", "fwd+bwd"):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            sel = [r for r in long if r["mode"] == mode and r["dtype"] == dtype]
            path = os.path.join(out, f"bench_norms_{device.type}_{mode.replace('+', '_')}_{dtype}.png")
            plot(sel, path, x="N", y="GBps", series=lambda r: f"{r['provider']} {r['op']}",
                 title=f"norms {mode}, {dtype}, {describe_device(device)}", xlabel="hidden size N",
                 ylabel="GB/s (bytes read + written / time)", hline=copy_gbps, hline_label="copy bandwidth")
            print(f"wrote {path}")


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    rows, copy_gbps, device = run(args)
    save(rows, copy_gbps, device, args.out)


if __name__ == "__main__":
    main()
