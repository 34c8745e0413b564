"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, in the configurations its launcher
uses, with no register spills (STACK/LOCAL == 0) and with tensor cores where the spec expects them."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import triton

from fastlm.kernels.compile_check import KERNEL_MODULES, TARGETS


def _jit_functions(module):
    kinds = (triton.runtime.jit.JITFunction,)
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds += (InterpretedFunction,)
    except ImportError:
        pass
    return {name for name, obj in vars(module).items() if isinstance(obj, kinds)}


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


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_every_kernel_has_a_compile_spec(module_name):
    module = importlib.import_module(module_name)
    covered = {spec.fn.__name__ if hasattr(spec.fn, "__name__") else spec.fn.fn.__name__
               for spec in module.compile_specs()}
    missing = {name for name in _jit_functions(module)} - covered
    assert not missing, f"kernels without a compile spec in {module_name}: {sorted(missing)}"
