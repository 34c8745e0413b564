"""oneDNN-prepacked linear layers (CPU fp32 and bf16) against nn.Linear, and generation with them."""
import pytest
import torch
from torch import nn

from fastlm.model import Transformer
from fastlm.runtime.cpu_linear import PackedLinear, pack_linears, packing_available
from fastlm.runtime.engine import Engine
from fastlm.runtime.sampling import SamplingParams
from tests.runtime.engine_util import generate


def _if_packing(dtype):
    """The dtype as a parameter, skipped only where oneDNN cannot pack it (bf16 needs CPU support that
    fp32 does not: a machine without it still tests the fp32 packing)."""
    reason = f"oneDNN {dtype} packing is unavailable on this machine"
    return pytest.param(dtype, marks=pytest.mark.skipif(not packing_available(dtype, "cpu"), reason=reason))


DTYPES = [_if_packing(torch.float32), _if_packing(torch.bfloat16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 7, 64), (5, 64), (130, 64)])
def test_packed_linear_matches_nn_linear(dtype, bias, shape):
    linear = nn.Linear(64, 131, bias=bias, device="cpu").to(dtype)
    x = torch.randn(shape, dtype=dtype, device="cpu")
    with torch.no_grad():
        expected = linear(x).double()
        exact = nn.functional.linear(x.double(), linear.weight.double(),
                                     None if linear.bias is None else linear.bias.double())
        got = PackedLinear(linear)(x).double()
    assert got.shape == expected.shape
    assert (got - exact).abs().max() <= 2 * (expected - exact).abs().max() + (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_model_generates_like_the_plain_one(checkpoints, reference_kernels, dtype):
    folder = checkpoints["llama_gqa"][0]
    plain = Transformer.from_pretrained(folder, dtype=dtype, device="cpu")
    packed = Transformer.from_pretrained(folder, dtype=dtype, device="cpu")
    assert pack_linears(packed, min_bytes=0) == 2 * 2 + 2 * 2 + 1  # per layer wqkv, wo, w_up, w_down; the lm_head
    assert pack_linears(Transformer.from_pretrained(folder, dtype=dtype, device="cpu")) == 0  # all tiny
    keys = set(plain.state_dict())
    assert set(packed.state_dict()) == keys
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert generate(Engine(packed), prompts, params) == generate(Engine(plain), prompts, params)
