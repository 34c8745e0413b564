"""Test-suite setup.

Without a GPU, the kernel tests run the real Triton kernels on CPU tensors under Triton's interpreter,
which must be switched on before triton is imported (it is read when @triton.jit runs).
With FASTLM_TEST_DEVICE=cuda (benchmarks/gpu_check.py sets it), the interpreter stays off and tensors
created without an explicit device land on the GPU, so the same tests exercise the compiled kernels.
"""
import os

ON_CUDA = os.environ.get("FASTLM_TEST_DEVICE", "cpu") == "cuda"
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Import the kernels now, while the interpreter setting is the session's: @triton.jit reads it once, at
# import, so a first import inside a test that switches to the reference path would leave compiled-mode
# kernels behind for every later interpreter test.
import fastlm.kernels  # noqa: E402,F401
from fastlm.kernels._utils import KERNELS_ENV  # noqa: E402

if ON_CUDA:
    torch.set_default_device("cuda")


@pytest.fixture(scope="session", autouse=True)
def cpu_kernel_cache(tmp_path_factory):
    """The CPU kernel choices (fastlm.kernels.cpu_choice) of the session in a temporary folder, not in
    the user's ~/.cache (subprocesses inherit it through the environment)."""
    old = os.environ.get("FASTLM_CACHE_DIR")
    os.environ["FASTLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("fastlm_cache"))
    yield os.environ["FASTLM_CACHE_DIR"]
    if old is None:
        del os.environ["FASTLM_CACHE_DIR"]
    else:
        os.environ["FASTLM_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def reference_kernels(monkeypatch):
    """On CPU, fastlm's PyTorch references instead of the interpreter (FASTLM_KERNELS=reference, the
    kernels' documented switch): for model and runtime tests, where the kernels themselves are tested
    elsewhere and the interpreter is slow. On a GPU the compiled kernels are fast and keep running."""
    if not ON_CUDA:
        monkeypatch.setenv(KERNELS_ENV, "reference")


@pytest.fixture
def cpp_kernels(monkeypatch):
    """The CPU path users get (no interpreter, no forced references), with fastlm's C++ CPU kernels;
    skips where they did not build (tests/kernels/test_cpu_gemv.py fails if a compiler is present)."""
    from fastlm.kernels import _cpu_ext

    if ON_CUDA:
        pytest.skip("fastlm's C++ kernels are the CPU path")
    if not _cpu_ext.load():
        pytest.skip(f"fastlm's C++ CPU kernels did not build here: {_cpu_ext.build_error()}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(KERNELS_ENV, raising=False)

