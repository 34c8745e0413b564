"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, in the configurations its launcher
uses, with no register spills (STACK/LOCAL == 0) and with tensor cores where the launch expects them."""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import triton

from fastlm.kernels.compile_check import KERNEL_MODULES, TARGETS

# The kernels each module launches from the host. Counted here so that a lookup finding no kernel (a
# Triton release renaming the jit function types, say) fails instead of passing with nothing to check.
LAUNCHED_KERNELS = {
    "fastlm.kernels._norm": {"_norm_fwd", "_norm_fwd_chunked", "_norm_bwd", "_norm_bwd_chunked"},
    "fastlm.kernels._flash": {"_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq"},
    "fastlm.kernels._decode": {"_decode_split", "_decode_combine"},
    "fastlm.kernels._quant": {"_int8_gemv", "_int8_gemm", "_int4_gemv", "_int4_gemm"},
    "fastlm.kernels._paged": {"_paged_decode_split", "_paged_prefill"},
}


def _jit_functions(module):
    kinds = (triton.runtime.jit.JITFunction,)
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds += (InterpretedFunction,)
    except ImportError:
        pass
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, kinds)}


def _launched_kernels(module):
    """The module's jit functions that no other jit function of it calls (device helpers are called)."""
    functions = _jit_functions(module)
    sources = {name: inspect.getsource(getattr(fn, "fn", fn)) for name, fn in functions.items()}
    return {name for name in functions
            if not any(re.search(rf"\b{name}\(", src) for other, src in sources.items() if other != name)}


def test_kernel_modules_are_all_listed():
    assert set(KERNEL_MODULES) == set(LAUNCHED_KERNELS)


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_kernels_compile_without_spills(module_name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastlm.kernels.compile_check", "--json", "--module", module_name],
                          capture_output=True, text=True, env=env, timeout=1200)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, f"no kernel compiled for {module_name}:\n{proc.stderr[-3000:]}"
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"spills or missing tensor cores: {bad}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["arch"] for r in results} == set(TARGETS)
    compiled = {re.match(r"\w+", r["name"]).group(0) for r in results}
    assert compiled == {name.lstrip("_") for name in LAUNCHED_KERNELS[module_name]}


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_every_kernel_has_a_compile_spec(module_name):
    module = importlib.import_module(module_name)
    launched = _launched_kernels(module)
    assert launched == LAUNCHED_KERNELS[module_name], \
        f"found {sorted(launched)}: a lookup that misses kernels, or LAUNCHED_KERNELS needs updating"
    covered = {launch.kernel.__name__ if hasattr(launch.kernel, "__name__") else launch.kernel.fn.__name__
               for launch in module.LAUNCHES}
    missing = launched - covered
    assert not missing, f"kernels without a compile spec in {module_name}: {sorted(missing)}"
