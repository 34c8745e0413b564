"""--threads on `fastlm generate` / `fastlm bench` (default: the physical cores), FASTLM_CPU_KERNELS
errors on the command line, and the kernel choices bench prints (issue 16, items 1 and 2)."""
import os

import pytest
import torch
from torch import nn

from fastlm.runtime import commands
from fastlm.runtime.cpu_linear import LinearShapeGroup, pack_linears, packing_available
from fastlm.runtime.cpu_threads import physical_cores, set_threads
from tests.runtime.test_errors import run_cli


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_physical_cores_within_the_allowed_cpus():
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= physical_cores() <= allowed


def test_set_threads(restore_threads):
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    assert set_threads(None) == physical_cores() == torch.get_num_threads()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="threads must be"):
            set_threads(bad)


@pytest.mark.parametrize("threads", [["--threads", "1"], []])
def test_bench_threads(checkpoints, reference_kernels, capsys, restore_threads, threads):
    code, out, err = run_cli(capsys, "bench", "--model", str(checkpoints["gpt2"][0]), "--device", "cpu", *threads,
                             "--batch-size", "1", "--prompt-len", "3", "--new-tokens", "2", "--repeats", "1")
    assert (code, err) == (0, ""), err
    expected = 1 if threads else physical_cores()
    assert f"; 1 rank x {expected} CPU threads" in out.splitlines()[0] and torch.get_num_threads() == expected


@pytest.mark.parametrize("command", [["generate", "hi", "--max-new-tokens", "2"], ["bench", "--repeats", "1"]])
def test_threads_zero_is_an_error(checkpoints, capsys, command):
    code, out, err = run_cli(capsys, *command, "--model", str(checkpoints["gpt2"][0]), "--threads", "0")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "threads must be >= 1, got 0" in err


def test_unknown_forced_kernel_is_a_one_line_error(checkpoints, capsys, monkeypatch):
    if not packing_available(torch.float32, "cpu"):
        pytest.skip("no oneDNN packing here: linears are never swapped")
    monkeypatch.setenv("FASTLM_CPU_KERNELS", "fastest")
    code, out, err = run_cli(capsys, "generate", "hi", "--model", str(checkpoints["gpt2"][0]), "--device", "cpu",
                             "--dtype", "float32", "--max-new-tokens", "2")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert "FASTLM_CPU_KERNELS must be auto or one of aten, compiled, dequant, eager, gemv, onednn, packed, got 'fastest'" in err


@pytest.mark.parametrize("force, source", [("onednn", "forced by FASTLM_CPU_KERNELS"), ("auto", "timed, cached in")])
def test_bench_prints_the_kernel_choices(capsys, monkeypatch, force, source):
    if not packing_available(torch.float32, "cpu"):
        pytest.skip("no oneDNN packing here")
    monkeypatch.setenv("FASTLM_CPU_KERNELS", force)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
    pack_linears(model, min_bytes=0)
    with torch.no_grad():
        model(torch.randn(1, 32))
    commands._print_kernel_choices(model)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"CPU linear kernels ({source}") and len(lines) == 3
    names = LinearShapeGroup.candidate_names(0)  # aten, onednn (+ gemv where fastlm's C++ kernels built)
    assert all(line.split(": ")[1] in (("onednn",) if force == "onednn" else names) for line in lines[1:])
    assert sorted(line.split(": ")[0].strip() for line in lines[1:]) == \
        [f"float32|{shape}|rows=1|t{torch.get_num_threads()}|{'+'.join(names)}" for shape in ("32x64", "64x32")]


def test_on_passing_thread_returns_or_raises_on_the_caller():
    import threading

    from fastlm.runtime.cpu_threads import on_passing_thread

    seen = []

    def work(x, y=1):
        seen.append(threading.current_thread())
        return x + y
    assert on_passing_thread(work, 2, y=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()  # another thread, ended

    def broken():
        raise KeyError("bad checkpoint")
    with pytest.raises(KeyError, match="bad checkpoint"):
        on_passing_thread(broken)


def test_llm_loads_on_a_passing_thread(checkpoints, monkeypatch):
    """The model is loaded and the engine built on a thread that ends (its OpenMP pool goes with it)."""
    import threading

    import fastlm
    from fastlm.runtime.llm import LLM

    threads = []
    real = LLM._load

    def spy(*args):
        threads.append(threading.current_thread())
        return real(*args)
    monkeypatch.setattr(LLM, "_load", staticmethod(spy))
    llm = fastlm.LLM(str(checkpoints["gpt2"][0]), device="cpu", dtype="float32")
    assert threads[0].name == "fastlm-load" and not threads[0].is_alive()
    assert llm.generate_tokens([[1, 2, 3]], max_new_tokens=2, temperature=0)[0]
