"""Fixtures that make Triton's interpreter behave like the GPU where it falls short, and that run other
GPUs' launch configurations on CPU. On a GPU run (FASTLM_TEST_DEVICE=cuda) they change nothing."""
import numpy as np
import pytest
import triton.language as tl
from triton.runtime import interpreter

from fastlm.kernels import _utils


@pytest.fixture
def bf16_round_to_nearest(monkeypatch):
    """Triton 3.9's interpreter converts fp32 -> bf16 by truncation, where the GPU (cvt.rn) rounds to
    nearest even; emulate the GPU so bf16 stores are judged as they will run."""
    convert = interpreter._convert_float

    def convert_rne(data, src, dst, rounding_mode):
        if not (src == tl.float32 and dst == tl.bfloat16 and rounding_mode is None):
            return convert(data, src, dst, rounding_mode)
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = ((bits >> 16) | 0x40).astype(np.uint16)
        return np.where(np.isnan(data), nan, rounded).reshape(data.shape)

    monkeypatch.setattr(interpreter, "_convert_float", convert_rne)


@pytest.fixture
def bf16_dot(monkeypatch, bf16_round_to_nearest):
    """The interpreter keeps bf16 values as raw uint16 bit patterns and tl.dot multiplies those integers
    (triton-lang/triton#11584). Widen bf16 operands to fp32 first (exact), as the GPU's bf16 MMA does
    before accumulating in fp32; with the fixture above, the kernels' bf16 casts round as on the GPU."""
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = np.ascontiguousarray(handle.data, dtype=np.uint16).astype(np.uint32) << 16  # bf16 = fp32's top half
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def dot_bf16_as_fp32(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot_bf16_as_fp32)


@pytest.fixture
def interpret_as(monkeypatch):
    """interpret_as(arch, sms): run the launch configurations (tiles, split grids) that a GPU of compute
    capability `arch` with `sms` multiprocessors gets, under the interpreter."""
    def set_target(arch, sms=_utils.INTERPRETED_GPU.sms):
        monkeypatch.setattr(_utils, "INTERPRETED_GPU", _utils.GpuTarget(arch=arch, sms=sms))
    return set_target
