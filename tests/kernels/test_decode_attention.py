"""decode_attention (split-KV) against an fp64 reference, by the comparison rule; ragged lengths."""
import pytest
import torch

from fastlm.kernels import decode_attention
from fastlm.kernels import _utils
from fastlm.kernels._decode import MAX_SPLITS, decode_config, decode_splits
from tests.compare import assert_close_by_rule
from tests.kernels.test_attention import ATOL, GPU_SIZED, ON_CUDA, attention_plain, poisoned_outputs  # noqa: F401

# (B, Sq, Hq, Hkv, S_max, D, lengths): lengths include 1 (or Sq) and S_max; group x Sq rows from 1 to 128
CASES = [
    (3, 1, 4, 1, 300, 32, [1, 300, 77]),
    (2, 4, 8, 1, 130, 80, [4, 130]),
    (2, 1, 2, 2, 129, 128, [129, 7]),
    (1, 8, 16, 1, 70, 32, [9]),
    (2, 4, 8, 2, 64, 256, [64, 5]),
]


def check_decode(case, dtype, packed_cache=False):
    B, Sq, Hq, Hkv, S_max, D, lengths = case
    q = torch.randn(B, Sq, Hq, D, dtype=dtype)
    if packed_cache:  # K and V as strided views of one (B, S_max, 2, Hkv, D) buffer
        k_cache, v_cache = torch.randn(B, S_max, 2, Hkv, D, dtype=dtype).unbind(2)
    else:
        k_cache = torch.randn(B, S_max, Hkv, D, dtype=dtype)
        v_cache = torch.randn(B, S_max, Hkv, D, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = decode_attention(q, k_cache, v_cache, seqlens)
    positions = seqlens[:, None].long() - Sq + torch.arange(Sq)  # (B, Sq)
    args = dict(causal=True, q_positions=positions, k_lengths=seqlens)
    ref = attention_plain(q.double(), k_cache.double(), v_cache.double(), **args)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_by_rule(out, ref, attention_plain(q, k_cache, v_cache, **args), atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_decode(case, dtype, bf16_dot):
    check_decode(case, dtype)


@pytest.mark.usefixtures("poisoned_outputs")
def test_decode_outputs_fully_written():
    check_decode((2, 3, 6, 2, 150, 80, [150, 3]), torch.float16)


def test_decode_strided_cache():
    check_decode((2, 2, 4, 2, 100, 64, [100, 2]), torch.float16, packed_cache=True)


@pytest.mark.skipif(not ON_CUDA,
                    reason=GPU_SIZED + "; test_decode's bf16 cases and test_decode_many_splits cover its paths")
def test_decode_bf16_long():
    check_decode((4, 1, 32, 8, 32768, 128, [32768, 1, 20000, 4097]), torch.bfloat16)


@pytest.mark.parametrize("arch, sms, n_splits", [(90, 132, MAX_SPLITS), (80, 108, 81)])
def test_decode_many_splits(arch, sms, n_splits, interpret_as):
    """The combine kernel merging many KV chunks (past 64: its widest block), ragged lengths leaving
    chunks empty, with the SM counts of an H100 and an A100 sizing the grid."""
    interpret_as(arch, sms)
    block_n = decode_config(32, torch.float32, 4)[1]
    s_max = n_splits * block_n
    assert decode_splits(2, 1, s_max, block_n, _utils.sm_count(torch.device("cpu")))[0] == n_splits
    check_decode((2, 2, 2, 1, s_max, 32, [s_max, s_max // 3]), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_cpu_path(dtype, reference_kernels):
    if ON_CUDA:
        pytest.skip("CPU path only")
    for case in CASES[:2] + [(2, 4, 8, 2, 50, 64, [50, 50]), (2, 1, 4, 4, 50, 32, [33, 33])]:  # ragged, equal
        check_decode(case, dtype)


def test_splits_cover_the_cache():
    for batch, heads, s_max, block in [(1, 8, 131072, 64), (64, 8, 1024, 64), (1, 1, 1, 32), (3, 2, 300, 64)]:
        n_splits, chunk = decode_splits(batch, heads, s_max, block)
        assert chunk % block == 0 and (n_splits - 1) * chunk < s_max <= n_splits * chunk


def _args(**changes):
    args = dict(q=torch.randn(2, 1, 4, 32), k_cache=torch.randn(2, 16, 2, 32), v_cache=torch.randn(2, 16, 2, 32),
                cache_seqlens=torch.tensor([3, 16], dtype=torch.int32))
    args.update(changes)
    return args


@pytest.mark.parametrize("args, match", [
    (_args(cache_seqlens=torch.tensor([3, 16])), "cache_seqlens must have dtype"),
    (_args(cache_seqlens=torch.tensor([3], dtype=torch.int32)), "cache_seqlens must have shape"),
    (_args(cache_seqlens=torch.tensor([0, 16], dtype=torch.int32)), "cache_seqlens must be in"),
    (_args(cache_seqlens=torch.tensor([3, 17], dtype=torch.int32)), "cache_seqlens must be in"),
    (_args(q=torch.randn(2, 9, 4, 32)), "at most 8 queries"),
    (_args(q=torch.randn(2, 4, 4, 32), cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), "cache_seqlens"),
    (_args(k_cache=torch.randn(2, 16, 3, 32), v_cache=torch.randn(2, 16, 3, 32)), "multiple of k_cache heads"),
    (_args(v_cache=torch.randn(2, 16, 2, 32, dtype=torch.float16)), "v_cache must have the same dtype"),
    (_args(k_cache=torch.randn(2, 16, 2, 64), v_cache=torch.randn(2, 16, 2, 64)), "head dim"),
    (_args(q=torch.randn(1, 4, 32)), "q must have 4 dimensions"),
])
def test_decode_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)
