"""fastlm's C++ CPU kernels (csrc/*.cpp): built at first use for this machine, loaded as torch ops.

The ops (namespace fastlm_cpu), each called by a public function that validates its arguments:
  - gemv(x (M, K), w (N, K), bias?) -> (M, N)           fastlm.kernels.gemv
  - paged_decode(q (B, Hq, D), k_cache, v_cache, block_tables, seqlens, scale) -> (B, Hq, D)
                                                          fastlm.kernels.paged_attention (CPU, one query per row)
  - int8_gemv(x, q, scale, bias?), int4_gemv(x, q, scale, zero, bias?) -> (M, N)
                                                          fastlm.kernels.quant's CPU paths (_quant_cpu.py)
Why C++ at all: a CPU decode step is bound by reading the weights plus a fixed cost per call; on the
development AMD EPYC neither aten nor oneDNN read bf16 weights at the memory's bandwidth, and the
PyTorch decode attention spent most of its time in call overhead (the .cpp headers give the figures).

Build: all sources into one shared library with the system's C++ compiler ($CXX, else c++) against
torch's headers, -O3 -march=native -fopenmp (the binary is this CPU's), cached as
fastlm_cpu-<hash>.so in fastlm.kernels.cpu_choice.cache_dir(), the hash covering the machine (CPU model,
ISA flags, torch version), the sources and the command, so later processes load it without building
(~10 s on 2 cores). Written to a temporary file and renamed into place: concurrent processes never load
a half-written library. No compiler, a failed build, or FASTLM_CPU_EXTENSION=0: `load()` is False,
`build_error()` says why, and the callers keep their PyTorch paths.
"""
import hashlib
import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from fastlm.kernels import cpu_choice

SOURCES = tuple(sorted(cpu_choice.NATIVE_SOURCES.glob("*.cpp")))
ENV_DISABLE = "FASTLM_CPU_EXTENSION"  # "0": never build or use the C++ kernels
BUILD_TIMEOUT_S = 600
_lock = threading.Lock()
_state = {"loaded": False, "error": None}


def load() -> bool:
    """True when the library is loaded (building it first if needed); once per process."""
    if _state["loaded"]:
        return True
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        if os.environ.get(ENV_DISABLE, "1").strip() == "0":
            _state["error"] = f"disabled by {ENV_DISABLE}=0"
            return False
        try:
            torch.ops.load_library(str(build()))
            _register_fakes()
            _state["loaded"] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _state["error"] = f"{type(exc).__name__}: {exc}"
        return _state["loaded"]


def build_error() -> Optional[str]:
    """Why the library is not loaded (None while loaded or not yet tried)."""
    return _state["error"]


def _register_fakes():
    """Shapes for torch.compile's tracing."""
    @torch.library.register_fake("fastlm_cpu::gemv")
    def _(x, w, bias):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("fastlm_cpu::paged_decode")
    def _(q, k_cache, v_cache, block_tables, seqlens, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("fastlm_cpu::argmax_rows")
    def _(x):
        return x.new_empty((x.shape[0],), dtype=torch.long)

    @torch.library.register_fake("fastlm_cpu::int8_gemv")
    def _(x, q, scale, bias):
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("fastlm_cpu::int4_gemv")
    def _(x, q, scale, zero, bias):
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("fastlm_cpu::int4_dequantize")
    def _(q, scale, zero, K, dtype):
        return q.new_empty((q.shape[0], K), dtype=dtype)


def _compile_command(output: Path):
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()
    return [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            *[f"-I{p}" for p in cpp_extension.include_paths()], *map(str, SOURCES), "-o", str(output),
            *[f"-L{p}" for p in libraries], *[f"-Wl,-rpath,{p}" for p in libraries], "-lc10", "-ltorch_cpu", "-ltorch"]


def build() -> Path:
    """The library for this machine, torch and sources: the cached one, else compiled now."""
    # the machine description includes the sources' digest (cpu_choice.native_sources_digest)
    identity = json.dumps({"machine": cpu_choice.machine_description(), "command": _compile_command(Path("out"))},
                          sort_keys=True)
    target = cpu_choice.cache_dir() / f"fastlm_cpu-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"the C++ build failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
