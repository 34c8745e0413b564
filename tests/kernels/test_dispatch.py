"""The dispatch rule (fastlm.kernels._utils.use_triton), read at every call: CPU tensors run the Triton
kernels under TRITON_INTERPRET=1 (this suite's default), the references with FASTLM_KERNELS=reference."""
import pytest
import torch

from fastlm.kernels import norms, rms_norm, rms_norm_ref
from fastlm.kernels._utils import KERNELS_ENV

ON_CUDA = torch.empty(0).is_cuda


@pytest.fixture
def launches(monkeypatch):
    """Counts the norm forward launcher's calls."""
    calls = []
    launch = norms.launch_norm_fwd
    monkeypatch.setattr(norms, "launch_norm_fwd", lambda *args: calls.append(1) or launch(*args))
    return calls


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_switch_is_read_at_call_time(mode, launches, monkeypatch):
    x, w = torch.randn(3, 40), torch.randn(40)
    monkeypatch.setenv(KERNELS_ENV, mode)
    y = rms_norm(x, w)
    assert len(launches) == (1 if mode == "auto" else 0)
    if mode == "reference":
        assert torch.equal(y, rms_norm_ref(x, w))


@pytest.mark.skipif(ON_CUDA, reason="the interpreter setting only matters for CPU tensors")
def test_cpu_without_interpreter_runs_the_reference(launches, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(3, 40), torch.randn(40)
    assert torch.equal(rms_norm(x, w), rms_norm_ref(x, w)) and not launches


def test_unknown_switch_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton")
    with pytest.raises(ValueError, match=KERNELS_ENV):
        rms_norm(torch.randn(2, 8), torch.randn(8))
