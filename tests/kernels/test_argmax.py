"""argmax_rows: exactly torch.argmax(x, dim=-1) (first of tied maxima, first NaN), through fastlm's C++
CPU kernel where it is built, torch.argmax elsewhere; argument errors name the argument."""
import pytest
import torch

from fastlm.kernels import argmax_rows
from tests.compare import ops_run


def _cases(dtype):
    gen = torch.Generator().manual_seed(0)
    yield torch.randn(1, 50257, generator=gen).to(dtype)  # GPT-2's vocabulary
    yield torch.randn(9, 17, generator=gen).to(dtype)  # rows in parallel, a vector tail
    yield torch.randn(2, 1, generator=gen).to(dtype)
    yield torch.randn(3, 100, generator=gen).to(dtype)[:, :61]  # a vocabulary's slice: rows 100 apart
    special = torch.randn(5, 40, generator=gen).to(dtype)
    special[0, [3, 33]] = 9.0  # a tie: the first
    special[1, [7, 20]] = float("nan")  # NaN counts as the maximum: the first NaN
    special[2] = -float("inf")  # nothing but -inf: index 0
    special[3, 39] = float("inf")
    special[4] = 0.0  # all equal
    yield special


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_kernel_is_torch_argmax(dtype, cpp_kernels):
    for x in _cases(dtype):
        ids, ops = ops_run(lambda: argmax_rows(x))
        assert "fastlm_cpu::argmax_rows" in ops
        assert ids.dtype == torch.int64 and torch.equal(ids, torch.argmax(x, dim=-1)), x


def test_other_dtypes_and_forced_references_take_torch_argmax(monkeypatch):
    for x in _cases(torch.float16):
        ids, ops = ops_run(lambda: argmax_rows(x))
        assert "fastlm_cpu::argmax_rows" not in ops and torch.equal(ids, torch.argmax(x, dim=-1))
    monkeypatch.setenv("FASTLM_KERNELS", "reference")
    x = torch.randn(2, 33)
    ids, ops = ops_run(lambda: argmax_rows(x))
    assert "fastlm_cpu::argmax_rows" not in ops and torch.equal(ids, torch.argmax(x, dim=-1))


@pytest.mark.parametrize("x,match", [
    (torch.randn(5), r"x must have 2 dimensions"),
    (torch.randn(2, 0), r"x must have at least one column"),
    (torch.arange(6).view(2, 3), r"x must .*float"),
    ([[1.0, 2.0]], r"x must be a torch.Tensor"),
])
def test_bad_arguments_name_the_argument(x, match):
    with pytest.raises(ValueError, match=match):
        argmax_rows(x)
