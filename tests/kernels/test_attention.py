"""flash_attention (forward and backward) against an fp64 reference, by the comparison rule.

Runs the Triton kernels under the interpreter on CPU (fp32, fp16, and bf16 through the bf16_dot fixture
of tests/kernels/conftest.py, which widens the interpreter's bf16 dot operands as the GPU does), the
compiled kernels with FASTLM_TEST_DEVICE=cuda, and the CPU torch path (FASTLM_KERNELS=reference).
The launch configurations are sm_80's unless a test forces another GPU's (interpret_as)."""
import math

import pytest
import torch

from fastlm.kernels import _utils, attention_ref, flash_attention
from fastlm.kernels._flash import dkdv_group_splits, flash_bwd_config, flash_fwd_config
from tests.compare import assert_close_by_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 under the interpreter: the bf16_dot fixture
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ON_CUDA = torch.empty(0).is_cuda
GPU_SIZED = "GPU-sized, too slow for the interpreter: runs on a GPU (benchmarks/gpu_check.py runs this suite there)"


def attention_plain(q, k, v, causal=True, scale=None, q_positions=None, k_lengths=None):
    """Plain torch attention computed entirely in q's dtype (the yardstick of the rule), fp64 for
    the reference. Same mask conventions as attention_ref; fully masked rows give 0."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kx = k.repeat_interleave(Hq // Hkv, dim=2)  # (B, Sk, Hq, D)
    vx = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kx) * scale  # (B, Hq, Sq, Sk)
    cols = torch.arange(Sk, device=q.device)
    visible = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        pos = q_positions if q_positions is not None else torch.arange(Sq, device=q.device) + Sk - Sq
        visible = visible & (cols <= pos.reshape(-1, 1, Sq, 1))
    if k_lengths is not None:
        visible = visible & (cols < k_lengths.reshape(B, 1, 1, 1))
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    p = torch.where(visible.any(-1, keepdim=True), p, torch.zeros_like(p))
    return torch.einsum("bhqk,bkhd->bqhd", p, vx)


def make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, requires_grad=False):
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


# (B, Sq, Sk, Hq, Hkv, D, causal): lengths 1/7/127/129/300, GQA 1/4/8, Sq = 1, = Sk, < Sk, > Sk
FORWARD_CASES = [
    (1, 1, 1, 1, 1, 32, True),
    (2, 7, 7, 4, 1, 80, True),
    (1, 127, 127, 8, 1, 32, True),
    (1, 129, 129, 2, 2, 128, False),
    (1, 1, 129, 8, 1, 64, True),
    (1, 7, 300, 4, 1, 80, True),
    (1, 129, 40, 2, 1, 32, True),
    (1, 300, 300, 2, 2, 64, True),
    (1, 33, 70, 2, 1, 256, True),
    (2, 20, 45, 4, 4, 96, False),
]
BACKWARD_CASES = [
    (1, 7, 7, 4, 1, 80, True),
    (1, 127, 129, 8, 1, 32, True),
    (1, 129, 129, 2, 2, 128, False),
    (1, 1, 70, 4, 1, 64, True),
    (1, 70, 33, 2, 1, 32, True),
    (2, 20, 45, 2, 2, 96, False),
]


def check_forward(case, dtype, scale=None):
    B, Sq, Sk, Hq, Hkv, D, causal = case
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype)
    out = flash_attention(q, k, v, causal=causal, softmax_scale=scale)
    ref = attention_plain(q.double(), k.double(), v.double(), causal, scale)
    assert out.dtype == dtype
    assert_close_by_rule(out, ref, attention_plain(q, k, v, causal, scale), atol=ATOL[dtype])
    if causal and Sq > Sk:  # queries before the first key see nothing: defined as 0
        assert (out[:, : Sq - Sk] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward(case, dtype, bf16_dot):
    check_forward(case, dtype)


def check_backward(case, dtype):
    B, Sq, Sk, Hq, Hkv, D, causal = case
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, requires_grad=True)
    do = torch.randn(B, Sq, Hq, D, dtype=dtype)
    grads = torch.autograd.grad(flash_attention(q, k, v, causal=causal), (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(attention_plain(q64, k64, v64, causal), (q64, k64, v64), do.double())
    same = torch.autograd.grad(attention_plain(q, k, v, causal), (q, k, v), do)
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, ref, same):
        assert g.dtype == dtype
        assert_close_by_rule(g, r, s, atol=ATOL[dtype], name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward(case, dtype, bf16_dot):
    check_backward(case, dtype)


@pytest.mark.skipif(not ON_CUDA, reason=GPU_SIZED + "; the bf16 cases of test_forward / test_backward run the "
                                                    "same kernels at small sizes")
@pytest.mark.parametrize("check, case", [(check_forward, (2, 4096, 4096, 8, 2, 128, True)),
                                         (check_backward, (1, 1024, 1024, 8, 2, 128, True))])
def test_bf16_long(check, case):
    check(case, torch.bfloat16)


def _block_offsets(dtype, head_dim):
    """Causal offsets Sk - Sq at the backward's query-block edges: 1 and BLOCK_M - 1 of the dK/dV and dQ
    kernels, and their negatives (Sq > Sk: the first queries see no key)."""
    block_ms = {flash_bwd_config(head_dim, dtype, kernel)[0] for kernel in ("dkdv", "dq")}
    return sorted({sign * offset for offset in [1] + [m - 1 for m in block_ms] for sign in (1, -1)})


@pytest.mark.parametrize("dtype, offset", [
    pytest.param(dtype, offset, id=f"{str(dtype)[6:]}-offset{offset}") for dtype in (torch.float32, torch.float16)
    for offset in _block_offsets(dtype, 32)])  # bf16 launches fp16's tiles
def test_backward_causal_offsets_at_block_edges(dtype, offset):
    """Sk - Sq = +-1 and +-(BLOCK_M - 1), with more than one key block (the dK/dV kernel's first query
    block is rounded down to a BLOCK_M boundary) and rows past the last full query block."""
    sq = 70 + max(-offset, 0)
    check_backward((1, sq, sq + offset, 2, 1, 32, True), dtype)


@pytest.mark.parametrize("n_sms", [1, 10**6])
def test_backward_gqa_group_split(n_sms, interpret_as):
    """dK/dV summed over a whole GQA group in one program (many SMs busy already) and split over
    programs into fp32 partial sums (few programs)."""
    interpret_as(80, sms=n_sms)
    expected = 1 if n_sms == 1 else 8
    assert dkdv_group_splits(3, 8, n_sms) == expected
    check_backward((1, 37, 45, 8, 1, 32, True), torch.float16)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so an element a kernel fails to
    write shows up as non-finite output."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


SM90_CASES = [  # one per head-dim class of flash_fwd_config: sm_90's tiles differ from sm_80's in each
    (1, 130, 260, 2, 1, 64, True),
    (1, 150, 130, 2, 1, 128, True),
    (2, 45, 45, 2, 2, 80, False),
    (1, 70, 70, 2, 1, 256, True),
]


@pytest.mark.parametrize("case", SM90_CASES)
def test_sm90_tiles(case, interpret_as, poisoned_outputs):
    """The H100/H200 configurations (tiles chosen for arch 90), forward and backward, run numerically."""
    interpret_as(90)
    head_dim = case[5]
    assert flash_fwd_config(head_dim, torch.float16, _utils.gpu_arch(torch.device("cpu"))) != \
        flash_fwd_config(head_dim, torch.float16, 80), "the seam did not select sm_90's tiles"
    check_forward(case, torch.float16)
    check_backward(case, torch.float16)


@pytest.mark.parametrize("case", [(2, 37, 45, 4, 1, 80, True), (1, 45, 37, 2, 2, 80, False)])
def test_outputs_fully_written(case, poisoned_outputs):
    check_forward(case, torch.float16)
    check_backward(case, torch.float16)


def test_strided_inputs_and_scale():
    """q, k, v as views into one packed qkv projection (no copies); a custom softmax scale."""
    qkv = torch.randn(2, 37, 3, 4, 64, dtype=torch.float16)  # (B, S, 3, H, D)
    q, k, v = qkv.unbind(2)
    out = flash_attention(q, k, v, causal=True, softmax_scale=0.3)
    ref = attention_plain(q.double(), k.double(), v.double(), True, 0.3)
    assert_close_by_rule(out, ref, attention_plain(q, k, v, True, 0.3), atol=ATOL[torch.float16])


def test_attention_ref_matches_fp64():
    q, k, v = make_qkv(2, 9, 21, 4, 2, 32, torch.float32)
    ref = attention_plain(q.double(), k.double(), v.double(), True)
    assert_close_by_rule(attention_ref(q, k, v, True), ref, attention_plain(q, k, v, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 7, 7, 4, 1, 80, True), (1, 129, 40, 2, 1, 32, True),
                                  (1, 5, 130, 8, 2, 64, True), (2, 20, 45, 4, 4, 96, False)])
def test_cpu_path(case, dtype, reference_kernels):
    """The torch path the CPU runtime uses (interpreter off), gradients included."""
    if ON_CUDA:
        pytest.skip("CPU path only")
    check_forward(case, dtype)
    if dtype != torch.bfloat16:
        check_backward(case, dtype)


def _bad(**changes):
    args = dict(q=torch.randn(1, 4, 4, 32), k=torch.randn(1, 6, 2, 32), v=torch.randn(1, 6, 2, 32))
    args.update(changes)
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(q=torch.randn(4, 4, 32)), "q must have 4 dimensions"),
    (_bad(k=torch.randn(1, 6, 3, 32), v=torch.randn(1, 6, 3, 32)), "multiple of k heads"),
    (_bad(k=torch.randn(1, 6, 2, 16), v=torch.randn(1, 6, 2, 16)), "head dim 32"),
    (_bad(k=torch.randn(2, 6, 2, 32), v=torch.randn(2, 6, 2, 32)), "batch size"),
    (_bad(v=torch.randn(1, 5, 2, 32)), "v must have the shape of k"),
    (_bad(k=torch.randn(1, 6, 2, 32, dtype=torch.float16)), "k must have the same dtype"),
    (_bad(v=torch.randn(1, 6, 2, 32, device="meta")), "v must be on the same device"),
    (_bad(q=torch.randn(1, 4, 4, 320), k=torch.randn(1, 6, 2, 320), v=torch.randn(1, 6, 2, 320)), "head dim"),
    (_bad(q=torch.randint(0, 3, (1, 4, 4, 32))), "q must have dtype"),
    (_bad(q=torch.randn(1, 0, 4, 32)), "sizes >= 1"),
])
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(**args)


def test_bad_scale():
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attention(*make_qkv(1, 2, 2, 1, 1, 16, torch.float32), softmax_scale=float("nan"))
