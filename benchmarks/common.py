"""Small helpers shared by the benchmark scripts: device choice, timing, ceilings, CSV and plots.

Timing returns the median in milliseconds: on CUDA via `triton.testing.do_bench` (which flushes the
L2 cache between runs), on CPU via repeated `time.perf_counter` after a warmup. Each benchmark also
measures its own ceiling in the same run (a large copy for bandwidth, a large matmul for FLOP/s), so
results read as a fraction of what this machine can do right now.
"""
import argparse
import csv
import os
import statistics
import time
from typing import Optional

import torch

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_parser(description: str, threads_default: Optional[int] = 1) -> argparse.ArgumentParser:
    """The arguments every benchmark shares: --device, --out, --quick, --threads (threads_default None:
    the physical cores, resolved by the benchmark)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                        help="where to run (default: cuda when available)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the CSV and PNG (default: benchmarks/out/)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--threads", type=int, default=threads_default,
                        help="CPU threads for torch (default 1: steadier timings on a shared machine)"
                        if threads_default == 1 else "CPU threads for torch (default: the physical cores)")
    return parser


def check_device(device: str, threads: int = None) -> torch.device:
    """Validate --device; on CPU also apply --threads (called from a script's main, never at import)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    return torch.device(device)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, *, warmup: int = 3, reps: int = 20, min_time_s: float = 0.0, cuda_ms: int = 100) -> float:
    """Median wall time of fn() in milliseconds. CPU: `warmup` + `reps` calls (and at least
    `min_time_s`); CUDA: do_bench with about `cuda_ms` ms of repetitions after cuda_ms/4 of warmup."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(cuda_ms // 4, 1), rep=cuda_ms, return_mode="median"))
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms_each(fns: dict, device, *, warmup: int = 2, reps: int = 20, cuda_ms: int = 100) -> dict:
    """Median ms of each of several candidates {name: fn}. On CPU the calls interleave (a, b, a, b, ...)
    so that load from other processes on a shared machine falls on every candidate alike."""
    if torch.device(device).type == "cuda":
        return {name: time_ms(fn, device, cuda_ms=cuda_ms) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_copy_bandwidth(device, *, nbytes: int = None, quick: bool = False) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written over time)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20 if quick else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=5 if quick else 20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_flops(device, dtype=torch.float16, *, n: int = None) -> float:
    """TFLOP/s of a large square matmul (2·n³ flops)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPU half matmul is an emulation, not the machine's ceiling
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def write_csv(rows, path) -> str:
    """rows: a list of dicts with the same keys. Creates the folder; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows, path, *, x, y, series, title="", xlabel=None, ylabel=None, hline=None, hline_label=None,
         logx=True) -> str:
    """One line per distinct value of `series` (a key or a function of a row), y against x; PNG out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label_of = series if callable(series) else (lambda r: str(r[series]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label in dict.fromkeys(label_of(r) for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if label_of(r) == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", label=hline_label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def describe_device(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"
