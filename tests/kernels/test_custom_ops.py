"""fastlm's kernels as PyTorch custom operators (the fastlm:: ops of fastlm/kernels/norms.py, attention.py).

- torch.compile(fullgraph=True) of a small module around each public kernel runs (no graph break) and
  matches eager, output and every gradient. On CPU this is the reference path (FASTLM_KERNELS=reference:
  compilation and the interpreter don't mix) with the aot_eager backend (Dynamo + AOTAutograd over the
  fake implementations: where a custom op can break), plus one Inductor build; on a GPU, Inductor.
- torch.library.opcheck on every op, reference and Triton paths (schema, fake tensors, autograd
  registration, AOT dispatch).
- The ops' reference path (what runs on CPU under torch.compile; eager CPU calls the references
  directly) against fp64 autograd through the references, forward and backward.
"""
import pytest
import torch

from fastlm.kernels import (attention_ref, decode_attention, flash_attention, layer_norm, layer_norm_ref, rms_norm,
                            rms_norm_ref)
from fastlm.kernels._utils import KERNELS_ENV
from fastlm.kernels.attention import decode_attn, flash_attn_fwd
from fastlm.kernels.norms import norm_fwd

ON_CUDA = torch.empty(0).device.type == "cuda"
BACKEND = "inductor" if ON_CUDA else "aot_eager"
N = 24  # hidden size of the norm modules
B, HQ, HKV, D = 2, 4, 2, 16  # attention modules: GQA
# Eager CPU runs the references directly, compiled code the ops (same math, other fp32 rounding).
TOL = dict(rtol=1e-4, atol=1e-5)


class NormModule(torch.nn.Module):
    """Linear -> norm (optionally the fused residual add) -> a use of both outputs."""

    def __init__(self, kind, residual):
        super().__init__()
        self.kind, self.residual = kind, residual
        self.proj = torch.nn.Linear(N, N)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(N))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(N)) if kind == "layer_norm" else None

    def forward(self, x):
        h = self.proj(x)
        r = x if self.residual else None
        out = layer_norm(h, self.weight, self.bias, 1e-5, r) if self.kind == "layer_norm" else \
            rms_norm(h, self.weight, 1e-6, r)
        return out[0] * 2 + out[1].sin() if self.residual else out


class FlashModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(D, D * (HQ + 2 * HKV))

    def forward(self, x):  # x (B, S, D)
        q, k, v = self.qkv(x).split([D * HQ, D * HKV, D * HKV], dim=-1)
        shape = x.shape[:2]
        return flash_attention(q.reshape(*shape, HQ, D), k.reshape(*shape, HKV, D), v.reshape(*shape, HKV, D))


class DecodeModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D, D * HQ)

    def forward(self, x, k_cache, v_cache, cache_seqlens):  # x (B, Sq, D)
        q = self.q_proj(x).reshape(*x.shape[:2], HQ, D)
        return decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=0.3)


def case(name):
    """(module, inputs); every floating input requires grad."""
    if name.startswith(("layer_norm", "rms_norm")):
        return NormModule(name.removesuffix("+residual"), name.endswith("+residual")), (torch.randn(3, 5, N),)
    if name == "flash_attention":
        return FlashModule(), (torch.randn(B, 9, D),)
    lengths = torch.tensor([3, 11], dtype=torch.int32)
    return DecodeModule(), (torch.randn(B, 2, D), torch.randn(B, 12, HKV, D), torch.randn(B, 12, HKV, D), lengths)


def run(module, inputs):
    """Output and the gradients of every parameter and floating input for a fixed cotangent."""
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    module.zero_grad(set_to_none=True)
    out = module(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = [p.grad for p in module.parameters()] + [t.grad for t in leaves if t.is_floating_point()]
    return out.detach(), grads


KERNELS = ["layer_norm", "layer_norm+residual", "rms_norm", "rms_norm+residual", "flash_attention",
           "decode_attention"]


@pytest.mark.parametrize("name", KERNELS)
def test_compiled_module_matches_eager(name, reference_kernels):
    module, inputs = case(name)
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND)
    (out, grads), (out_c, grads_c) = run(module, inputs), run(compiled, inputs)
    torch.testing.assert_close(out_c, out, **TOL)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, **TOL)


@pytest.mark.skipif(ON_CUDA, reason="on a GPU every compile test above already uses Inductor")
def test_inductor_builds_a_module_using_every_kernel(reference_kernels):
    """Inductor itself (C++ codegen around the opaque ops) once on CPU: slow to build, so one module."""
    class Everything(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.flash, self.decode = NormModule("rms_norm", True), FlashModule(), DecodeModule()

        def forward(self, x, k_cache, v_cache, cache_seqlens):
            h = self.norm(x.reshape(B, -1, N)).reshape(B, -1, D)  # (B, 9, D)
            return self.flash(h).sum() + self.decode(h[:, :2], k_cache, v_cache, cache_seqlens).sum()

    module = Everything()
    _, (_, k_cache, v_cache, lengths) = case("decode_attention")
    inputs = (torch.randn(B, 6, N), k_cache, v_cache, lengths)  # 6 x N = 9 x D features per sequence
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    (out, grads), (out_c, grads_c) = run(module, inputs), run(compiled, inputs)
    torch.testing.assert_close(out_c, out, **TOL)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, **TOL)


@pytest.mark.parametrize("path", ["reference", "triton"])  # on CPU "triton" is the interpreter
def test_opcheck_every_op(path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv(KERNELS_ENV, "reference")
    x, r, w, b = torch.randn(2, 3, N), torch.randn(2, 3, N), torch.randn(N), torch.randn(N)
    q, k, v = torch.randn(B, 5, HQ, D), torch.randn(B, 7, HKV, D), torch.randn(B, 7, HKV, D)
    lengths = torch.tensor([4, 7], dtype=torch.int32)
    for t in (x, r, w, b, q, k, v):
        t.requires_grad_()  # so opcheck exercises the autograd registrations
    ops = torch.ops.fastlm
    stats = [t.detach() for t in ops.norm_fwd(x, w, b, r, 1e-5, False)]
    o, lse = (t.detach() for t in ops.flash_attn_fwd(q, k, v, True, 0.25))
    cases = [
        (ops.norm_fwd, (x, w, b, r, 1e-5, False)),
        (ops.norm_fwd, (x, w, None, None, 1e-6, True)),
        (ops.norm_bwd, (torch.randn(2, 3, N), torch.randn(2, 3, N), stats[1], w.detach(), stats[2], stats[3], 1e-5,
                        True, False)),
        (ops.flash_attn_fwd, (q, k, v, True, 0.25)),
        (ops.flash_attn_bwd, (torch.randn(B, 5, HQ, D), *(t.detach() for t in (q, k, v)), o, lse, True, 0.25)),
        (ops.decode_attn, (q[:, :2], k, v, lengths, 0.25)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def _fp64_run(fn, inputs, cotangents):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [c.double() for c in cotangents])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def _run(fn, inputs, cotangents):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, cotangents)
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def assert_all_close(got, want64):
    assert len(got) == len(want64)
    for i, (g, g64) in enumerate(zip(got, want64)):
        torch.testing.assert_close(g, g64.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"output/grad {i}: {m}")


def _norm_op(x, weight, bias, residual, eps, is_rms):
    y, h, _, _ = norm_fwd(x, weight, bias, residual, eps, is_rms)
    return y if residual is None else (y, h)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("residual", [False, True])
def test_reference_norm_op_matches_autograd_fp64(kind, residual, reference_kernels):
    x, w = torch.randn(4, 7, 33), 1 + 0.1 * torch.randn(33)
    b = 0.1 * torch.randn(33) if kind == "layer_norm" else None
    r = torch.randn(4, 7, 33) if residual else None
    cot = [torch.randn(4, 7, 33) for _ in range(2 if residual else 1)]
    got = _run(lambda x, w, b, r: _norm_op(x, w, b, r, 1e-5, kind == "rms_norm"), (x, w, b, r), cot)
    if kind == "layer_norm":
        want = _fp64_run(lambda x, w, b, r: layer_norm_ref(x, w, b, 1e-5, r), (x, w, b, r), cot)
    else:
        want = _fp64_run(lambda x, w, r: rms_norm_ref(x, w, 1e-5, r), (x, w, r), cot)
    assert_all_close(got, want)


@pytest.mark.parametrize("sq,sk,causal", [(5, 9, True), (9, 5, True), (6, 6, False)])
def test_reference_flash_op_matches_autograd_fp64(sq, sk, causal, reference_kernels):
    q, k, v = torch.randn(B, sq, HQ, D), torch.randn(B, sk, HKV, D), torch.randn(B, sk, HKV, D)
    cot = [torch.randn(B, sq, HQ, D)]
    got = _run(lambda q, k, v: flash_attn_fwd(q, k, v, causal, 0.3)[0], (q, k, v), cot)
    assert_all_close(got, _fp64_run(lambda q, k, v: attention_ref(q, k, v, causal, 0.3), (q, k, v), cot))


def test_decode_op_matches_autograd_fp64(reference_kernels):
    q, k_cache, v_cache = torch.randn(B, 2, HQ, D), torch.randn(B, 10, HKV, D), torch.randn(B, 10, HKV, D)
    lengths = torch.tensor([2, 9], dtype=torch.int32)
    positions = lengths[:, None].long() - 2 + torch.arange(2)
    cot = [torch.randn(B, 2, HQ, D)]
    got = _run(lambda q, k, v: decode_attn(q, k, v, lengths, 0.3), (q, k_cache, v_cache), cot)
    want = _fp64_run(lambda q, k, v: attention_ref(q, k, v, True, 0.3, q_positions=positions, k_lengths=lengths),
                     (q, k_cache, v_cache), cot)
    assert_all_close(got, want)
