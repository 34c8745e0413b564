"""One-command GPU validation: environment, ceilings, the CUDA test suite, and every benchmark.

    python -m benchmarks.gpu_check --out DIR          # on a machine with an NVIDIA GPU, < 8 minutes
    python -m benchmarks.gpu_check --out DIR --plumbing  # on a CPU: runs each stage at toy sizes

Writes DIR/environment.json, DIR/tests.xml (JUnit), one sub-folder of CSV + PNG per benchmark, and
DIR/summary.csv; prints one summary table (figure, peer, ratio, fraction of the measured ceiling).
Without a GPU (and without --plumbing) it says so in one line and exits 2.
"""
import argparse
import csv
import glob
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import measure_copy_bandwidth, measure_matmul_flops  # noqa: E402

# benchmark module -> extra arguments on a GPU; each stage has a wall-clock budget (seconds)
BENCHMARKS = {
    "bench_norms": [],
    "bench_attention": [],
    "bench_paged_attention": ["--quick"],
    "bench_generate": [],
    "bench_quant": [],
    "bench_throughput": ["--requests", "64"],
}
BUDGET_S = {"tests": 240, "bench_norms": 80, "bench_attention": 100, "bench_paged_attention": 60,
            "bench_generate": 120, "bench_quant": 150, "bench_throughput": 150}


def environment(device: str) -> dict:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, driver=_driver_version())
    else:
        env.update(gpu="none (CPU plumbing run)", cpu_threads=torch.get_num_threads())
    return env


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_tests(out_dir: str, device: str) -> dict:
    """The test suite on the GPU (compiled kernels, bf16 included); on CPU, the kernel tests only."""
    xml_path = os.path.join(out_dir, "tests.xml")
    env = dict(os.environ)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
        env["FASTLM_TEST_DEVICE"] = "cuda"
        cmd = ["tests", "-n", "8"]
    else:
        cmd = ["tests/kernels/test_norms.py", "-n", "2"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}"] + cmd
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUDGET_S["tests"])
        tail = proc.stdout[-4000:]
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {BUDGET_S['tests']} s", "seconds": BUDGET_S["tests"]}
    with open(os.path.join(out_dir, "tests.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    counts = _junit_counts(xml_path)
    counts.update(seconds=round(time.time() - started), tail=tail.splitlines()[-1:] if tail else [])
    return counts


def _junit_counts(xml_path: str) -> dict:
    if not os.path.exists(xml_path):
        return {"status": "no JUnit report written"}
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def run_benchmark(name: str, out_dir: str, device: str) -> dict:
    bench_out = os.path.join(out_dir, name)
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--device", device, "--out", bench_out]
    cmd += BENCHMARKS[name] if device == "cuda" else ["--quick"]
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUDGET_S[name])
    except subprocess.TimeoutExpired as exc:
        _write_log(bench_out, name, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                   else (exc.stdout or ""))
        return {"status": f"timed out after {BUDGET_S[name]} s"}
    _write_log(bench_out, name, proc.stdout + proc.stderr)
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    return {"status": status, "seconds": round(time.time() - started),
            "csvs": sorted(glob.glob(os.path.join(bench_out, "*.csv")))}


def _write_log(folder, name, text):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.log"), "w") as f:
        f.write(text)


def _is_ratio(key: str) -> bool:
    return key.startswith("ratio") or "_x_" in key  # ratio_vs_sdpa, ratio_vs_torch, decode_x_hf, ...


def _is_fraction(key: str) -> bool:
    return "fraction" in key


def summary_rows(bench_results: dict) -> list:
    """One line per (CSV row, peer ratio it carries): the figure, the ratio, the fraction of the ceiling."""
    rows = []
    for name, result in bench_results.items():
        for path in result.get("csvs", []):
            with open(path) as f:
                for r in csv.DictReader(f):
                    fraction = next((r[k] for k in r if _is_fraction(k) and r[k] != ""), "")
                    figure = ", ".join(f"{k}={v}" for k, v in r.items()
                                       if v != "" and not _is_ratio(k) and not _is_fraction(k) and k != "ms")
                    for key in (k for k in r if _is_ratio(k) and r[k] != ""):
                        peer = key.replace("ratio_vs_", "").replace("ratio_", "")
                        rows.append({"benchmark": name, "figure": figure, "peer": peer, "ratio": r[key],
                                     "fraction_of_ceiling": fraction})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "gpu_check"))
    parser.add_argument("--plumbing", action="store_true", help="run every stage at toy sizes on the CPU")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.plumbing:
        print("gpu_check: no CUDA GPU visible to torch; nothing to validate (use --plumbing for a CPU dry run)")
        return 2
    device = "cuda" if torch.cuda.is_available() and not args.plumbing else "cpu"
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    env = environment(device)
    env["copy_gbps"] = round(measure_copy_bandwidth(device, quick=device == "cpu"), 1)
    env["matmul_tflops"] = round(measure_matmul_flops(device, torch.bfloat16 if device == "cuda" else torch.float32), 2)
    print(json.dumps(env, indent=1))
    results = {"environment": env}
    if not args.skip_tests:
        results["tests"] = run_tests(args.out, device)
        print("tests:", json.dumps(results["tests"]))
    benches = {name: run_benchmark(name, args.out, device) for name in BENCHMARKS}
    results["benchmarks"] = {k: {kk: vv for kk, vv in v.items() if kk != "csvs"} for k, v in benches.items()}
    rows = summary_rows(benches)
    if rows:
        with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    results["seconds"] = round(time.time() - started)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    _print_summary(results, rows)
    tests_ok = args.skip_tests or (results["tests"].get("failed", 1) == 0 and results["tests"].get("errors", 1) == 0)
    return 0 if tests_ok and all(b["status"] == "ok" for b in benches.values()) else 1


def _print_summary(results, rows):
    env = results["environment"]
    print(f"\n== {env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    print(f"ceilings: copy {env['copy_gbps']} GB/s, matmul {env['matmul_tflops']} TFLOP/s")
    if "tests" in results:
        print("tests:", {k: v for k, v in results["tests"].items() if k != "tail"})
    for name, b in results["benchmarks"].items():
        print(f"{name}: {b['status']} ({b.get('seconds', '?')} s)")
    print(f"{'benchmark':<16} {'peer':<12} {'ratio':>7} {'of ceiling':>10}  figure")
    for r in rows:
        print(f"{r['benchmark']:<16} {r['peer']:<12} {r['ratio']:>7} {r['fraction_of_ceiling']:>10}  {r['figure']}")
    print(f"total {results['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
