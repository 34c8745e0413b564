"""fastlm.kernels.gemv: the C++ CPU GEMV against fp64, odd shapes, its checks; the C++ library's build
cache and fallback (fastlm.kernels._cpu_ext)."""
import os
import subprocess
import sys

import pytest
import torch

from fastlm.kernels import _cpu_ext
from fastlm.kernels.gemv import cpu_gemv, cpu_gemv_available, cpu_gemv_build_error, cpu_gemv_ref
from tests.compare import ops_run

built = pytest.mark.skipif(not cpu_gemv_available(), reason=f"the C++ GEMV did not build here: {cpu_gemv_build_error()}")


def _inputs(lead, K, N, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def _exact(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,K,N", [((1,), 768, 2304), ((3,), 77, 33), ((2, 4), 100, 19), ((9,), 31, 17),
                                      ((1,), 1, 5), ((8,), 513, 64), ((17,), 40, 3), ((5,), 16, 1),
                                      # every pass width 2-8, K past the 32-wide vectors
                                      ((2,), 100, 37), ((4,), 64, 21), ((6,), 33, 10), ((7,), 96, 50)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64(dtype, lead, K, N, bias):
    x, w, b = _inputs(lead, K, N, dtype, bias)
    y = cpu_gemv(x, w, b)
    assert y.shape == (*lead, N) and y.dtype == dtype
    exact = _exact(x, w, b)
    # fp32 sums; bf16 output rounding is half an ulp (2^-9 relative) of each value
    tol = 2 ** -8 * exact.abs() + 1e-3 if dtype == torch.bfloat16 else 1e-5 * exact.abs() + 1e-5
    assert ((y.double() - exact).abs() <= tol).all()
    assert (cpu_gemv_ref(x, w, b).double() - exact).abs().max() <= tol.max()


@built
def test_rows_beyond_one_pass_and_empty_inputs():
    x, w, b = _inputs((20,), 64, 48, torch.float32)  # 8 + 8 + 4 rows: three passes over w
    assert torch.allclose(cpu_gemv(x, w, b).double(), _exact(x, w, b), atol=1e-5)
    assert cpu_gemv(torch.randn(0, 64), w, b).shape == (0, 48)
    assert cpu_gemv(torch.randn(2, 64), torch.randn(0, 64)).shape == (2, 0)


@built
def test_non_contiguous_inputs():
    x, w, b = _inputs((6,), 96, 40, torch.float32)
    xt, wt = x.t().contiguous().t(), w.t().contiguous().t()  # same values, transposed storage
    assert torch.allclose(cpu_gemv(xt, wt, b), cpu_gemv(x, w, b))


@pytest.mark.parametrize("call,match", [
    (lambda: cpu_gemv(torch.randn(2, 8), torch.randn(4, 9)), "weight must have shape"),
    (lambda: cpu_gemv(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.bfloat16)), "weight must have the same dtype"),
    (lambda: cpu_gemv(torch.randn(2, 8, dtype=torch.float16), torch.randn(4, 8, dtype=torch.float16)), "x must have dtype"),
    (lambda: cpu_gemv(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), "bias must have shape"),
    (lambda: cpu_gemv(torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, dtype=torch.bfloat16)), "bias must have the same dtype"),
    (lambda: cpu_gemv(torch.randn(2, 8), torch.randn(8)), "weight must have 2 dimensions"),
    (lambda: cpu_gemv(torch.tensor(1.0), torch.randn(4, 8)), "x must have at least 1"),
    (lambda: cpu_gemv(torch.randn(2, 8, device="meta"), torch.randn(4, 8, device="meta")), "x must be a CPU tensor"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@built
def test_traced_by_torch_compile_as_one_op():
    x, w, b = _inputs((3,), 64, 40, torch.bfloat16)
    compiled = torch.compile(lambda x: cpu_gemv(x, w, b) * 2, dynamic=False, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), cpu_gemv(x, w, b) * 2)


def _run_fresh(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@built
def test_build_is_cached_per_machine(tmp_path):
    code = ("import torch; from fastlm.kernels import _cpu_ext as e; assert e.load(), e.build_error();"
            "print(e.build())")
    first = _run_fresh(code, FASTLM_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    library = tmp_path / os.path.basename(first.stdout.strip())
    assert library.exists() and library.name.startswith("fastlm_cpu-") and library.suffix == ".so"
    built_at = library.stat().st_mtime_ns
    second = _run_fresh(code, FASTLM_CACHE_DIR=str(tmp_path))  # a later process loads it, no rebuild
    assert second.returncode == 0 and library.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no temporary file left


def test_disabled_or_failed_build_falls_back_to_the_reference(tmp_path):
    code = ("import torch; from fastlm.kernels import gemv as g;"
            "x, w = torch.randn(2, 8), torch.randn(4, 8);"
            "assert not g.cpu_gemv_available();"
            "assert torch.equal(g.cpu_gemv(x, w), g.cpu_gemv_ref(x, w)); print(g.cpu_gemv_build_error())")
    disabled = _run_fresh(code, FASTLM_CPU_EXTENSION="0", FASTLM_CACHE_DIR=str(tmp_path))
    assert disabled.returncode == 0, disabled.stderr
    assert "disabled by FASTLM_CPU_EXTENSION=0" in disabled.stdout
    broken = _run_fresh(code, CXX="/nonexistent/c++", FASTLM_CACHE_DIR=str(tmp_path))
    assert broken.returncode == 0, broken.stderr
    assert "FileNotFoundError" in broken.stdout and list(tmp_path.iterdir()) == []


def test_the_library_builds_where_a_compiler_is():
    """Every C++ test above skips where the library does not build; where a compiler is present it must."""
    import shutil

    if shutil.which(os.environ.get("CXX", "c++")) is None or os.environ.get(_cpu_ext.ENV_DISABLE) == "0":
        pytest.skip("no C++ compiler here (or disabled): the PyTorch paths run")
    assert _cpu_ext.load(), _cpu_ext.build_error()


def test_sources_ship_with_the_package():
    import fnmatch
    import re
    from pathlib import Path

    assert {p.name for p in _cpu_ext.SOURCES} >= {"cpu_gemv.cpp", "cpu_paged_attention.cpp", "cpu_quant_gemv.cpp"}
    setup = (Path(__file__).parents[2] / "setup.py").read_text()
    patterns = [p.removeprefix("kernels/csrc/") for p in re.findall(r'"(kernels/csrc/[^"]+)"', setup)]
    csrc = Path(_cpu_ext.SOURCES[0]).parent
    unshipped = [f.name for f in csrc.iterdir() if not any(fnmatch.fnmatch(f.name, p) for p in patterns)]
    assert patterns and unshipped == []  # setup.py's package_data ships every file the build reads


# ---------------------------------------------------------------------------------------------------
# The weight-only int8 / int4 GEMVs (csrc/cpu_quant_gemv.cpp), reading fastlm's formats as stored

from fastlm.kernels.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8  # noqa: E402


def _quant_exact(x, w_dequantized, bias):
    y = x.double() @ w_dequantized.double().T
    return y if bias is None else y + bias.double()


def _close(y, exact, dtype):
    # fp32 sums against fp64 over the dequantized weights; bf16 adds the output's rounding (2^-9 relative)
    tol = 2 ** -8 * exact.abs() + 2e-3 if dtype == torch.bfloat16 else 2e-5 * exact.abs() + 2e-5
    assert ((y.double() - exact).abs() <= tol).all(), (y.double() - exact).abs().max()


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (1, 200, 37), (2, 333, 21), (3, 77, 33), (8, 100, 19), (11, 31, 17),
                                   (1, 1, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_gemv_matches_fp64(dtype, M, K, N, bias):
    x, w, b = _inputs((M,), K, N, dtype, bias)
    q, scale = quantize_int8(w.float())
    y = torch.ops.fastlm_cpu.int8_gemv(x, q, scale, b)
    assert y.shape == (M, N) and y.dtype == dtype
    _close(y, _quant_exact(x, dequantize_int8(q, scale), b), dtype)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,G", [(1, 768, 2304, 128), (1, 3072, 24, 32), (3, 77, 33, 32), (8, 100, 19, 64),
                                       (9, 256, 17, 128), (2, 33, 5, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_gemv_matches_fp64(dtype, M, K, N, G, bias):
    x, w, b = _inputs((M,), K, N, dtype, bias)
    q, scale, zero = quantize_int4(w.float(), group_size=G)
    y = torch.ops.fastlm_cpu.int4_gemv(x, q, scale, zero, b)
    assert y.shape == (M, N) and y.dtype == dtype
    _close(y, _quant_exact(x, dequantize_int4(q, scale, zero, K), b), dtype)


@built
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linears_take_the_gemv_where_forced(bits, cpp_kernels, monkeypatch, tmp_path):
    from fastlm.kernels import cpu_choice, int4_linear, int8_linear

    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "gemv")
    x, w, b = _inputs((2, 3), 96, 40, torch.bfloat16)
    if bits == 8:
        q = quantize_int8(w.float())
        run, exact = (lambda: int8_linear(x, *q, bias=b)), _quant_exact(x.view(6, 96), dequantize_int8(*q), b)
    else:
        q = quantize_int4(w.float(), group_size=32)
        run, exact = (lambda: int4_linear(x, *q, bias=b)), _quant_exact(x.view(6, 96), dequantize_int4(*q, 96), b)
    y, ran = ops_run(run)
    assert f"fastlm_cpu::int{bits}_gemv" in ran
    _close(y.view(6, 40), exact, torch.bfloat16)


@built
def test_timed_int4_choice_other_than_packed_keeps_no_repacked_copy(cpp_kernels, monkeypatch, tmp_path):
    from fastlm.kernels import _quant_cpu, cpu_choice, int4_linear

    if not _quant_cpu.int4_packed_available():
        pytest.skip("no PyTorch int4 packed CPU kernel here")
    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(cpu_choice.ENV_FORCE, raising=False)
    monkeypatch.setattr(cpu_choice, "time_candidates",
                        lambda candidates, rounds=5, cold=False: {n: (c(), 1.0 if n == "gemv" else 2.0)[1]
                                                                  for n, c in candidates.items()})
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    x, w, _ = _inputs((1,), 64, 48, torch.bfloat16, bias=False)
    q = quantize_int4(w.float(), group_size=32)
    int4_linear(x, *q)  # timed: the packed candidate ran (and repacked the weight), gemv won
    assert id(q[0]) not in _quant_cpu._int4_cache
    assert ("int4", torch.bfloat16, "decode", "48x64") in _quant_cpu.choices()


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,G", [(5, 7, 32), (33, 200, 64), (17, 256, 128), (3, 129, 32)])
def test_int4_dequantize_is_the_definition_bitwise(dtype, N, K, G):
    """The C++ dequantize (the prefill path's dequantize + linear) computes quant.dequantize_int4's values."""
    q, scale, zero = quantize_int4(torch.randn(N, K), group_size=G)
    got = torch.ops.fastlm_cpu.int4_dequantize(q, scale, zero, K, dtype)
    assert got.dtype == dtype and torch.equal(got, dequantize_int4(q, scale, zero, K, dtype))


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_runs_its_settled_cpu_path_directly(bits, cpp_kernels, monkeypatch, tmp_path):
    """Once a call's CPU path is chosen, QuantLinear runs it without the public function (the eager decode
    hot path); the same values, and anything unusual still goes through the public function's checks."""
    from fastlm.kernels import _quant_cpu, cpu_choice, quant

    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    # the C++ GEMV, whatever timing would pick: its one bf16 rounding is what _close allows ("dequant" in bf16
    # rounds twice); the choice is recorded and settled as a timed one is
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "gemv")
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    module = quant.QuantLinear.from_linear(torch.nn.Linear(72, 40).bfloat16(), bits, group_size=32)
    x = torch.randn(2, 3, 72, dtype=torch.bfloat16)
    first = module(x)  # the public function: validates, settles the choice
    public = {name: getattr(quant, name) for name in ("int8_linear", "int4_linear")}
    for name in public:
        monkeypatch.setattr(quant, name, lambda *a, **k: pytest.fail("took the public function"))
    second = module(x)
    assert second.shape == (2, 3, 40) and torch.equal(second, first)
    if bits == 8:
        w = dequantize_int8(module.weight, module.weight_scale)
    else:
        w = dequantize_int4(module.weight, module.weight_scale, module.weight_zero, 72)
    _close(second.view(6, 40), _quant_exact(x.view(6, 72), w, module.bias), torch.bfloat16)  # against fp64
    for name, fn in public.items():
        monkeypatch.setattr(quant, name, fn)
    with pytest.raises(ValueError, match="x"):
        module(torch.randn(3, 40, dtype=torch.bfloat16))


def test_packed_int8_is_not_timed_where_it_crashed(cpp_kernels, monkeypatch, tmp_path):
    """PyTorch 2.13's _weight_int8pack_mm ended the process (segmentation fault) for K = 72 at 6 rows while
    fastlm timed the candidates: layers with K % 16 != 0 are timed without it, and give the fp64 values."""
    from fastlm.kernels import _quant_cpu, cpu_choice, int8_linear

    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(cpu_choice.ENV_FORCE, raising=False)
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    x, w, b = _inputs((6,), 72, 40, torch.float32, True)
    q, scale = quantize_int8(w.float())
    assert "packed" not in _quant_cpu._int8_names(x)
    _close(int8_linear(x, q, scale, b), _quant_exact(x, dequantize_int8(q, scale), b), torch.float32)  # timed
    assert ("int8", torch.float32, "decode", "40x72") in _quant_cpu.choices()


@pytest.mark.parametrize("forced,inline", [("packed", "aten._weight_int8pack_mm"), ("gemv", "fastlm_cpu.int8_gemv")])
def test_settled_int8_paths_are_traced_inline(forced, inline, cpp_kernels, monkeypatch, tmp_path):
    """Under torch.compile a settled int8 choice runs as its own op in the graph, not through the opaque
    fastlm::int8_linear (a Python call per layer and step); the values are the eager call's."""
    from fastlm.kernels import _quant_cpu, cpu_choice, quant

    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cpu_choice.ENV_FORCE, forced)
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    module = quant.QuantLinear.from_linear(torch.nn.Linear(64, 40).bfloat16(), 8)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    eager = module(x)  # settles the choice
    graphs = []

    def recorder(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(module, backend=recorder)(x)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any(inline in t for t in targets) and not any("int8_linear" in t for t in targets), targets
    assert torch.equal(compiled, eager)
