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


@pytest.mark.parametrize("force", ["onednn", "aten"])
def test_packed_tensor_parallel_layers_compute_the_same_logits(checkpoints, reference_kernels, monkeypatch, force):
    """A one-rank process group: the row-parallel projections and the LM head packed (their all-reduce
    and gather kept) give the unpacked shard's logits; a rank other than 0 adds no row-parallel bias."""
    import torch.distributed as dist

    from fastlm.model.parallel import RowParallelLinear, Shard
    from fastlm.model.parallel_loading import load_tensor_parallel
    from fastlm.runtime.cpu_linear import PackedParallelLinear

    if not packing_available(torch.float32, "cpu"):
        pytest.skip("oneDNN fp32 packing is unavailable on this machine")
    monkeypatch.setenv("FASTLM_CPU_KERNELS", force)
    folder = checkpoints["gpt2"][0]  # biases on the row-parallel projections
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain = load_tensor_parallel(folder, rank=0, world_size=1, dtype=torch.float32)
        packed = load_tensor_parallel(folder, rank=0, world_size=1, dtype=torch.float32)
        assert pack_linears(packed, min_bytes=0) == 2 * 4 + 1
        assert isinstance(packed.layers[0].attn.wo, PackedParallelLinear)
        assert isinstance(packed.lm_head, PackedParallelLinear)
        ids = torch.randint(0, plain.config.vocab_size, (2, 9))
        calls = _count_collectives(monkeypatch)
        with torch.no_grad():
            torch.testing.assert_close(packed(ids), plain(ids), rtol=0, atol=1e-5)
        n_layer = plain.config.n_layer
        assert calls == {"all_reduce": 2 * (2 * n_layer + 1), "gather": 2}  # the same in both models
    finally:
        dist.destroy_process_group()
    cfg = plain.config
    rank_1 = RowParallelLinear(cfg.dim, cfg.dim, True, Shard(1, 2, cfg))
    assert PackedParallelLinear(rank_1)._bias is None and rank_1.bias is not None


def _count_collectives(monkeypatch) -> dict:
    """Count the all-reduces and gathers of fastlm.model.parallel from now on."""
    import torch.distributed as dist

    import fastlm.model.parallel as parallel

    calls = {"all_reduce": 0, "gather": 0}
    all_reduce, gather = parallel._all_reduce, dist.gather

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(parallel, "_all_reduce", counted("all_reduce", all_reduce))
    monkeypatch.setattr(dist, "gather", counted("gather", gather))
    return calls
