"""Per-machine choice of CPU linear kernels (issue 16, item 1): forced by FASTLM_CPU_KERNELS, timed once
and cached on disk per machine, a corrupted cache ignored, numerically the linear it replaces."""
import json

import pytest
import torch
from torch import nn

from fastlm.kernels import cpu_choice
from fastlm.kernels.gemv import cpu_gemv_available
from fastlm.runtime.cpu_linear import PackedLinear, linear_choices, pack_linears, packing_available, size_class

pytestmark = pytest.mark.skipif(not packing_available(torch.float32, "cpu"), reason="no oneDNN fp32 packing here")

MACHINE = {"cpu": "Test CPU", "flags": "avx2 fma", "torch": "2.13.0"}


@pytest.fixture
def cache(tmp_path):
    return cpu_choice.ChoiceCache(tmp_path / "choices.json", MACHINE)


class _Calls(list):
    """The candidate names of each timing; .cold: whether each flushed the caches."""


@pytest.fixture
def timings(monkeypatch, tmp_path):
    """Replaces the timing: records each call's candidate names and makes "onednn" the fastest; an
    empty default cache folder."""
    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path / "default_cache"))
    calls = _Calls()

    def fake(candidates, rounds=cpu_choice.ROUNDS, cold=False):
        calls.append(sorted(candidates))
        colds.append(cold)
        return {name: (1.0 if name == "onednn" else 2.0) for name in candidates}
    monkeypatch.setattr(cpu_choice, "time_candidates", fake)
    monkeypatch.delenv(cpu_choice.ENV_FORCE, raising=False)
    colds = []
    calls.cold = colds  # whether each timing flushed the caches
    return calls


def _counting_candidates():
    ran = {"aten": 0, "onednn": 0}

    def make(name):
        def fn():
            ran[name] += 1
        return fn
    return ran, {name: make(name) for name in ran}


def test_forced_choice_skips_timing(cache, timings, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "aten")
    _, candidates = _counting_candidates()
    assert cpu_choice.choose("linear", "k", candidates, cache) == "aten"  # timing would pick onednn
    assert timings == [] and cache.items() == {}


def test_forced_unknown_name_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "mkl")
    with pytest.raises(ValueError, match="FASTLM_CPU_KERNELS must be auto or one of aten, compiled, dequant, eager, gemv, onednn, packed, got 'mkl'"):
        cpu_choice.choose("linear", "k", _counting_candidates()[1], cache)


def test_cached_choice_is_reused_without_timing(tmp_path, timings):
    path = tmp_path / "choices.json"
    first = cpu_choice.ChoiceCache(path, MACHINE)
    assert cpu_choice.choose("linear", "k", _counting_candidates()[1], first) == "onednn"
    assert len(timings) == 1
    stored = json.loads(path.read_text())
    assert stored["choices"] == {"linear|k": "onednn"} and stored["machine"] == MACHINE
    second = cpu_choice.ChoiceCache(path, MACHINE)  # a later process: reads the file
    assert cpu_choice.choose("linear", "k", _counting_candidates()[1], second) == "onednn"
    assert len(timings) == 1  # not timed again
    assert cpu_choice.choose("linear", "other", _counting_candidates()[1], second) == "onednn"
    assert len(timings) == 2  # another key is timed


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "choices": ["aten"]}', '{"format": 99, "choices": {}}',
                                     '{"format": 1, "choices": {"linear|k": 3}}'])
def test_corrupted_cache_file_is_ignored_and_rebuilt(tmp_path, timings, content):
    path = tmp_path / "choices.json"
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring the CPU kernel choice cache"):
        cache = cpu_choice.ChoiceCache(path, MACHINE)
    assert cpu_choice.choose("linear", "k", _counting_candidates()[1], cache) == "onednn"
    assert len(timings) == 1
    assert json.loads(path.read_text())["choices"] == {"linear|k": "onednn"}  # rewritten whole
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_cache_key_changes_with_torch_version_cpu_flags_candidates_and_cpp_sources(monkeypatch):
    here = cpu_choice.machine_description()
    assert cpu_choice.machine_key(here) == cpu_choice.machine_key()
    assert cpu_choice.machine_key({**here, "torch": here["torch"] + "-other"}) != cpu_choice.machine_key(here)
    assert cpu_choice.machine_key({**here, "flags": here["flags"] + " amx_tile"}) != cpu_choice.machine_key(here)
    assert here["candidates"] == cpu_choice.CANDIDATES_VERSION  # choices timed against older candidates: another file
    assert cpu_choice.machine_key({**here, "candidates": here["candidates"] - 1}) != cpu_choice.machine_key(here)
    assert here["native"] == cpu_choice.native_sources_digest()  # a changed C++ kernel: another file
    assert cpu_choice.machine_key({**here, "native": "0" * 16}) != cpu_choice.machine_key(here)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert cpu_choice.machine_description()["torch"] == "9.9.9"
    assert cpu_choice.machine_key() != cpu_choice.machine_key(here)


def test_cpp_sources_digest_covers_the_shared_header(tmp_path, monkeypatch):
    # the kernels include csrc/simd.h: an edit there must rebuild them and re-time the choices too
    import shutil

    for path in cpu_choice.NATIVE_SOURCES.iterdir():
        shutil.copy(path, tmp_path / path.name)
    assert (tmp_path / "simd.h").exists()
    monkeypatch.setattr(cpu_choice, "NATIVE_SOURCES", tmp_path)
    cpu_choice.native_sources_digest.cache_clear()
    try:
        before = cpu_choice.native_sources_digest()
        cpu_choice.native_sources_digest.cache_clear()
        (tmp_path / "simd.h").write_text((tmp_path / "simd.h").read_text() + "\n// edited\n")
        assert cpu_choice.native_sources_digest() != before
    finally:
        cpu_choice.native_sources_digest.cache_clear()


def test_default_cache_lives_in_fastlm_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    cache = cpu_choice.default_cache()
    assert cache.path.parent == tmp_path and cache.path.name.startswith("cpu_kernels-")
    assert cpu_choice.machine_key() in cache.path.name


def test_time_candidates_runs_each_once_per_round():
    ran, candidates = _counting_candidates()
    times = cpu_choice.time_candidates(candidates, rounds=3)
    assert set(times) == {"aten", "onednn"} and all(t >= 0 for t in times.values())
    assert ran == {"aten": 4, "onednn": 4}  # a warm-up round + 3


def test_cold_timing_flushes_the_caches_before_each_call(monkeypatch):
    events = []
    monkeypatch.setattr(cpu_choice, "_cache_flusher", lambda: (lambda: events.append("flush")))
    candidates = {name: (lambda name=name: events.append(name)) for name in ("aten", "onednn")}
    cpu_choice.time_candidates(candidates, rounds=2, cold=True)
    assert events == ["flush", "aten", "flush", "onednn"] * 3
    assert cpu_choice._largest_cache_bytes() >= 0


def _model(dtype):
    return nn.Sequential(nn.Linear(48, 96), nn.Linear(96, 48, bias=False), nn.Linear(48, 96)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not packing_available(torch.bfloat16, "cpu"), reason="no oneDNN bf16 packing here"))])
@pytest.mark.parametrize("force", ["aten", "onednn", "gemv", "auto"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_chosen_path_matches_f_linear(monkeypatch, dtype, force, rows):
    monkeypatch.setenv(cpu_choice.ENV_FORCE, force)
    plain = _model(dtype)
    packed = _model(dtype)
    packed.load_state_dict(plain.state_dict())
    assert pack_linears(packed, min_bytes=0) == 3
    x = torch.randn(rows, 48, dtype=dtype)
    with torch.no_grad():
        expected, got = plain(x), packed(x)
        exact = plain.double()(x.double())
    chosen = set(linear_choices(packed).values())
    gemv_offered = rows <= 16 and cpu_gemv_available()  # a decode-sized input, the C++ kernel built here
    if force == "auto" or (force == "gemv" and not gemv_offered):
        names = {"aten", "onednn", "gemv"} if gemv_offered else {"aten", "onednn"}
        assert chosen <= names and len(linear_choices(packed)) == 2  # two shapes, one size class
    else:
        assert chosen == {force}
    if force == "aten":
        assert torch.equal(got, expected)  # the very same F.linear
    else:
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert (got.double() - exact).abs().max() <= 2 * (expected.double() - exact).abs().max() + tol


def test_layers_of_one_shape_share_one_choice(monkeypatch, timings):
    model = _model(torch.float32)
    pack_linears(model, min_bytes=0)
    first, _, third = model
    assert isinstance(first, PackedLinear) and first.group is third.group
    with torch.no_grad():
        model(torch.randn(1, 48))
        model(torch.randn(2, 48))
    assert len(timings) == 4  # 2 shapes x 2 size classes; the third layer reused the first's choice
    keys = linear_choices(model)
    assert len(keys) == 4 and set(keys.values()) == {"onednn"}
    assert any(k.startswith("float32|96x48|rows=1|t") for k in keys)


def test_size_classes():
    assert [size_class(r) for r in (1, 2, 16, 17, 4096)] == [0, 1, 1, 2, 2]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_choice_is_timed_once_per_machine_and_forcible(monkeypatch, timings, reference_kernels, bits):
    """The quantized linears' CPU path ("packed" kernel or "dequant" + linear) goes through cpu_choice:
    timed on the first call, cached on disk (a new process reads it without timing), forcible."""
    from fastlm.kernels import _quant_cpu
    from fastlm.kernels.quant import int4_linear, int8_linear, quantize_int4, quantize_int8

    if not (_quant_cpu.int8_packed_available() if bits == 8 else _quant_cpu.int4_packed_available()):
        pytest.skip("no packed quantized kernels in this PyTorch")
    linear = int8_linear if bits == 8 else int4_linear
    q = quantize_int8(torch.randn(32, 64)) if bits == 8 else quantize_int4(torch.randn(32, 64), 32)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    linear(x, *q)
    names = ["dequant", "gemv", "packed"] if cpu_gemv_available() else ["dequant", "packed"]  # gemv: fastlm's C++
    assert timings == [names] and timings.cold == [True]  # decode sizes: timed streaming from memory
    cached = json.loads(next((cpu_choice.cache_dir()).glob("cpu_kernels-*.json")).read_text())
    key = f"int{bits}_linear|bfloat16|decode|32x64|threads={torch.get_num_threads()}|{'+'.join(names)}"
    assert key in cached["choices"]
    monkeypatch.setattr(_quant_cpu, "_choices", {})  # a later process: the disk cache, no timing
    cpu_choice._caches.clear()
    linear(x, *q)
    assert len(timings) == 1
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "packed")
    linear(torch.randn(20, 64, dtype=torch.bfloat16), *q)  # prefill size: never timed, forced
    assert len(timings) == 1 and _quant_cpu.choices()[(f"int{bits}", torch.bfloat16, "prefill", "32x64")] == "packed"
    monkeypatch.delenv(cpu_choice.ENV_FORCE)
    other = quantize_int8(torch.randn(48, 64)) if bits == 8 else quantize_int4(torch.randn(48, 64), 32)
    linear(x, *other)  # another weight shape: its own choice, timed
    assert len(timings) == 2
