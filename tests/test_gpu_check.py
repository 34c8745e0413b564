"""benchmarks/gpu_check.py: the no-GPU exit and the summary it builds from the benchmarks' CSVs."""
import csv
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_check import summary_rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA GPU" in proc.stdout


def test_summary_has_one_line_per_peer_ratio(tmp_path):
    path = tmp_path / "bench.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "ms", "prefill_x_hf", "decode_x_hf", "roofline_fraction"])
        writer.writeheader()
        writer.writerow({"model": "gpt2", "ms": 3, "prefill_x_hf": 2.5, "decode_x_hf": 1.5, "roofline_fraction": 0.7})
        writer.writerow({"model": "peerless", "ms": 3, "prefill_x_hf": "", "decode_x_hf": "", "roofline_fraction": ""})
    rows = summary_rows({"bench_generate": {"csvs": [str(path)]}})
    assert [(r["peer"], r["ratio"], r["fraction_of_ceiling"]) for r in rows] == [
        ("prefill_x_hf", "2.5", "0.7"), ("decode_x_hf", "1.5", "0.7")]
    assert rows[0]["figure"] == "model=gpt2"
