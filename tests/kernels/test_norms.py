"""LayerNorm / RMSNorm kernels (fastlm.kernels.norms) under Triton's interpreter, against fp64 torch.

With FASTLM_TEST_DEVICE=cuda (tests/conftest.py) the same tests run the compiled kernels on the GPU.
Outputs and every gradient (x, residual, weight, bias, including a gradient flowing into the h output)
are judged by the comparison rule: error vs fp64 <= 2 x the error plain torch makes in the same dtype
(F.layer_norm; RMSNorm the way HF Llama computes it) + a small atol.
"""
import pytest
import torch
import torch.nn.functional as F

from fastlm.kernels import _norm, norms
from fastlm.kernels.norms import LayerNorm, RMSNorm, layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from tests.compare import assert_close_by_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
KINDS = ["layer_norm", "layer_norm_nobias", "rms_norm"]
EPS = 1e-5
pytestmark = pytest.mark.usefixtures("bf16_round_to_nearest")  # tests/kernels/conftest.py


def _inputs(kind, shape, dtype, residual, device=None):
    """x with a non-zero mean (so centering matters), weight/bias around 1/0, optional residual."""
    N = shape[-1]
    x = (torch.randn(shape, device=device) + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(N, device=device)).to(dtype)
    b = (0.5 * torch.randn(N, device=device)).to(dtype) if kind == "layer_norm" else None
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    return x, w, b, r


def _torch_norm(kind, h, w, b):
    """Plain torch in h's dtype (double when given doubles): the yardstick and the fp64 reference."""
    if kind == "rms_norm":  # HF Llama's RMSNorm: statistics in fp32 (or fp64), weight applied in h's dtype
        acc = h.double() if h.dtype == torch.float64 else h.float()
        return w * (acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)
    return F.layer_norm(h, (h.shape[-1],), w, b, EPS)


def _fastlm_norm(kind, x, w, b, r):
    if kind == "rms_norm":
        return rms_norm(x, w, eps=EPS, residual=r)
    return layer_norm(x, w, b, eps=EPS, residual=r)


def _run(fn, leaves, grads):
    """Forward through fn(*leaves) -> (y, h) or y; backward with the given output gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
    return outs, [t.grad if t is not None else None for t in leaves]


def _check(kind, shape, dtype, residual, grads_for=("y", "h"), device=None):
    x, w, b, r = _inputs(kind, shape, dtype, residual, device)
    gy = torch.randn(shape, device=device).to(dtype) if "y" in grads_for else None
    gh = torch.randn(shape, device=device).to(dtype) if residual and "h" in grads_for else None

    def torch_fn(x, w, b, r):
        h = x if r is None else x + r
        y = _torch_norm(kind, h, w, b)
        return (y, h) if r is not None else y

    leaves = (x, w, b, r)
    got, got_grads = _run(lambda *a: _fastlm_norm(kind, *a), leaves, (gy, gh))
    ref, ref_grads = _run(torch_fn, [t.double() if t is not None else None for t in leaves], (gy, gh))
    same, same_grads = _run(torch_fn, leaves, (gy, gh))
    for name, a, r64, t in zip(("y", "h"), got, ref, same):
        assert a.dtype == dtype
        assert_close_by_rule(a, r64, t, atol=ATOL[dtype], name=name)
    for name, a, r64, t in zip(("dx", "dweight", "dbias", "dresidual"), got_grads, ref_grads, same_grads):
        if r64 is not None:
            assert a is not None and a.dtype == dtype, name
            assert_close_by_rule(a, r64, t, atol=ATOL[dtype], name=name)


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN, so any element a kernel fails to write shows up."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(_norm, "_empty", nan_empty)


SHAPES = [(1, 1, 1), (1, 1, 7), (3, 5, 131), (2, 768), (7, 1000), (3, 4097), (2, 12288)]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_vs_fp64(poisoned, kind, dtype, shape, residual):
    _check(kind, shape, dtype, residual)


@pytest.mark.parametrize("grads_for", [("y",), ("h",)])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_gradient_from_one_output_only(poisoned, kind, grads_for):
    _check(kind, (5, 300), torch.float16, residual=True, grads_for=grads_for)


@pytest.mark.parametrize("N", [_norm.MAX_FUSED_N + 1, norms.MAX_N])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_chunk_boundary_and_longest_row(kind, N):
    _check(kind, (2, N), torch.float16, residual=True)


@pytest.mark.parametrize("N", [1000, 12288])
def test_large_mean_does_not_cancel(N):
    """A row with mean 1000 and std 1 in fp32: the variance must come out right (Chan's merge)."""
    x = 1000 + torch.randn(3, N)
    w, b = torch.randn(N), torch.randn(N)
    ref = F.layer_norm(x.double(), (N,), w.double(), b.double(), EPS)
    assert_close_by_rule(layer_norm(x, w, b, EPS), ref, F.layer_norm(x, (N,), w, b, EPS), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_fused_residual_equals_unfused(kind, dtype):
    """h is x + residual rounded to x's dtype, and norm(h) is exactly the unfused norm of that h."""
    x, w, b, r = _inputs(kind, (4, 520), dtype, residual=True)
    y, h = _fastlm_norm(kind, x, w, b, r)
    assert torch.equal(h, x + r)
    assert torch.equal(y, _fastlm_norm(kind, h, w, b, None))


@pytest.mark.parametrize("N", [96, 4097])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_non_contiguous_inputs(kind, N):
    """Strided rows, a transposed layout, a strided last dim, and stride-0 output gradients."""
    x, w, b, r = _inputs(kind, (6, 4, N), torch.float32, residual=True)
    cases = [
        (torch.randn(6, 4, N + 5)[..., :N], torch.randn(6, 4, N + 3)[..., :N]),  # row stride > N
        (torch.randn(4, 6, N).transpose(0, 1), r),  # rows not evenly strided
        (torch.randn(6, 4, 2 * N)[..., ::2], r.transpose(0, 1).contiguous().transpose(0, 1)),  # last-dim stride 2
    ]
    for xv, rv in cases:
        y, h = _fastlm_norm(kind, xv, w, b, rv)
        y_ref, h_ref = _fastlm_norm(kind, xv.contiguous(), w, b, rv.contiguous())
        assert torch.equal(h, h_ref) and torch.equal(y, y_ref)
    w_strided = torch.stack([w, torch.randn(N)], dim=1)[:, 0]  # a weight with stride 2
    assert torch.equal(_fastlm_norm(kind, x, w_strided, b, None), _fastlm_norm(kind, x, w, b, None))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    _fastlm_norm(kind, xg, wg, b, None).sum().backward()  # dy is an expanded (stride 0) tensor
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    _torch_norm(kind, x64, w64, None if b is None else b.double()).sum().backward()
    torch.testing.assert_close(xg.grad, x64.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wg.grad, w64.grad.float(), rtol=1e-4, atol=1e-3)


def test_empty_batch():
    x = torch.randn(0, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    y = layer_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_reference_path(reference_kernels, kind, dtype, residual):
    """FASTLM_KERNELS=reference on CPU: the PyTorch reference runs, and meets the same rule."""
    _check(kind, (3, 5, 131), dtype, residual, device="cpu")
    x, w, b, r = _inputs(kind, (2, 33), dtype, residual, device="cpu")
    ref = rms_norm_ref(x, w, EPS, r) if kind == "rms_norm" else layer_norm_ref(x, w, b, EPS, r)
    out = _fastlm_norm(kind, x, w, b, r)
    for a, e in zip(out if residual else (out,), ref if residual else (ref,)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_module_loads_torch_state_dict(bias):
    ref = torch.nn.LayerNorm(200, eps=1e-5, bias=bias)
    with torch.no_grad():
        ref.weight.normal_()
        if bias:
            ref.bias.normal_()
    mod = LayerNorm(200, eps=1e-5, bias=bias)
    mod.load_state_dict(ref.state_dict(), strict=True)
    x, r = torch.randn(3, 200), torch.randn(3, 200)
    torch.testing.assert_close(mod(x), ref(x))
    y, h = mod(x, r)
    torch.testing.assert_close(y, ref(x + r))
    torch.testing.assert_close(h, x + r)


def test_rms_norm_module_loads_llama_state_dict():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(200, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    mod = RMSNorm(200, eps=1e-6)
    mod.load_state_dict(ref.state_dict(), strict=True)
    assert list(mod.state_dict()) == ["weight"]
    x = torch.randn(3, 200)
    torch.testing.assert_close(mod(x), ref(x))


def _bad_calls():
    x, w = torch.randn(2, 8), torch.randn(8)
    return [
        ("x", lambda: layer_norm([[1.0]], torch.ones(1))),
        ("x", lambda: layer_norm(torch.ones(2, 8, dtype=torch.int32), w)),
        ("x", lambda: rms_norm(torch.randn(2, 0), torch.randn(0))),
        ("x", lambda: rms_norm(torch.randn(1, norms.MAX_N + 1), torch.randn(norms.MAX_N + 1))),
        ("weight", lambda: layer_norm(x, torch.randn(7))),
        ("weight", lambda: rms_norm(x, torch.randn(1, 8))),
        ("weight", lambda: layer_norm(x, w.half())),
        ("weight", lambda: rms_norm(x, torch.randn(8, device="meta"))),
        ("bias", lambda: layer_norm(x, w, torch.randn(9))),
        ("bias", lambda: layer_norm(x, w, torch.randn(8).bfloat16())),
        ("residual", lambda: layer_norm(x, w, residual=torch.randn(3, 8))),
        ("residual", lambda: rms_norm(x, w, residual=x.half())),
        ("residual", lambda: rms_norm(x, w, residual=torch.randn(2, 8, device="meta"))),
        ("eps", lambda: rms_norm(x, w, eps=0.0)),
        ("eps", lambda: layer_norm(x, w, eps=-1e-5)),
        ("hidden_size", lambda: LayerNorm(0)),
        ("hidden_size", lambda: RMSNorm(norms.MAX_N + 1)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()
