"""Weight-only int8/int4 (fastlm.kernels.quant): formats, the Triton kernels under the interpreter (compiled
on a GPU with FASTLM_TEST_DEVICE=cuda), the CPU paths, QuantLinear and the argument errors.

Linears are judged against x @ dequantize(...).T + bias in fp64 by the comparison rule: error <= 2 x the
error of torch's F.linear with the dequantized weight in the same dtype, + a small atol."""
import pytest
import torch
import torch.nn.functional as F

from fastlm.kernels import _quant, _quant_cpu
from fastlm.kernels._utils import KERNELS_ENV
from fastlm.kernels.quant import (QuantEmbedding, QuantLinear, dequantize_int4, dequantize_int8, int4_linear, int4_linear_ref,
                                  int8_linear, int8_linear_ref, quantize_int4, quantize_int8)
from tests.compare import assert_close_by_rule
from tests.conftest import ON_CUDA

ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (M, N, K): one row, odd sizes, exactly GEMV_MAX_ROWS, the GEMM path with ragged tiles
SHAPES = [(1, 1, 1), (1, 37, 100), (5, 64, 129), (16, 48, 256), (17, 65, 200), (40, 130, 96)]


def _weight(N, K):
    return torch.randn(N, K) * (1 + torch.rand(N, 1) * 4)  # rows of different ranges


def _quantized(bits, N, K, group):
    w = _weight(N, K)
    return quantize_int8(w) if bits == 8 else quantize_int4(w, group)


def _dequantized(bits, q, K, dtype=torch.float64):
    return dequantize_int8(*q, dtype=dtype) if bits == 8 else dequantize_int4(*q, in_features=K, dtype=dtype)


def _check_linear(bits, M, N, K, dtype, group=128, bias=True, lead=()):
    q = _quantized(bits, N, K, group)
    x = torch.randn(*lead, M, K).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    fn = int8_linear if bits == 8 else int4_linear
    y = fn(x, *q, bias=b)
    w64 = _dequantized(bits, q, K)
    ref = F.linear(x.double(), w64, None if b is None else b.double())
    torch_y = F.linear(x, w64.to(dtype), b)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    assert_close_by_rule(y, ref, torch_y, atol=ATOL[dtype] * max(1.0, ref.abs().max().item() / 10))


# ---------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("N, K", [(1, 1), (7, 33), (64, 256)])
def test_int8_round_trip_within_half_a_step(N, K):
    w = _weight(N, K)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (N, K) and scale.dtype == torch.float32 and scale.shape == (N,)
    err = (dequantize_int8(q, scale, dtype=torch.float64) - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(q.abs().amax(1), torch.full((N,), 127, dtype=torch.int8))  # the full range is used


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("N, K", [(1, 1), (5, 130), (16, 256)])
def test_int4_round_trip_within_half_a_step(N, K, group):
    w = _weight(N, K)
    packed, scale, zero = quantize_int4(w, group)
    Kp = -(-K // group) * group
    assert packed.dtype == torch.uint8 and packed.shape == (N, Kp // 2)
    assert scale.shape == zero.shape == (N, Kp // group) and scale.dtype == zero.dtype == torch.float32
    deq = dequantize_int4(packed, scale, zero, in_features=K, dtype=torch.float64)
    assert deq.shape == (N, K)
    step = scale.double().repeat_interleave(group, dim=1)[:, :K]
    assert ((deq - w.double()).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()


def test_int4_packs_two_values_per_byte_low_nibble_first():
    w = torch.arange(32, dtype=torch.float32).view(1, 32)  # one group: min 0, scale 31 / 15
    packed, scale, zero = quantize_int4(w, 32)
    q = torch.round(w / scale[0, 0]).to(torch.uint8)
    assert torch.equal(packed[0], q[0, 0::2] | (q[0, 1::2] << 4))
    assert torch.allclose(zero, 8 * scale)  # zero = min + 8 * scale with min = 0


def test_constant_rows_round_trip_exactly():
    w = torch.full((3, 64), 0.25)
    assert torch.equal(dequantize_int8(*quantize_int8(w)), w)
    assert torch.equal(dequantize_int4(*quantize_int4(w, 32)), w)


# ---------------------------------------------------------------------------- kernels (interpreter / GPU)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_int8_linear(M, N, K, dtype):
    _check_linear(8, M, N, K, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_int4_linear(M, N, K, group, dtype):
    _check_linear(4, M, N, K, dtype, group)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 24])
def test_linear_without_bias_and_with_leading_dims(bits, M):
    _check_linear(bits, M, 33, 70, torch.float32, group=32, bias=False, lead=(2,))


@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_bf16(bits):
    """The GEMV converts to fp32 before any arithmetic, so the interpreter runs it in bf16 too."""
    _check_linear(bits, 3, 40, 160, torch.bfloat16, group=32)


@pytest.mark.skipif(not ON_CUDA, reason="the interpreter cannot do bf16 arithmetic in tl.dot (triton#11584)")
@pytest.mark.parametrize("bits", [8, 4])
def test_gemm_bf16_cuda(bits):
    _check_linear(bits, 70, 96, 256, torch.bfloat16, group=64)


@pytest.mark.parametrize("M", [3, 20])  # the GEMV and the GEMM
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_reads_strided_weight_and_scales(bits, M):
    """Views whose rows are farther apart than their width (a slice of wider tensors): the kernels follow
    the weight's row stride and the launchers compact the scales, instead of assuming contiguity."""
    _check_strided_views(bits, M, torch.float32)


def _check_strided_views(bits, M, dtype):
    q = _quantized(bits, 48, 96, 32)
    weight, *scales = q
    weight_view = torch.cat((weight, torch.ones_like(weight)), dim=1)[:, : weight.shape[1]]  # rows 2x apart
    scale_views = [torch.stack((t, torch.ones_like(t)), dim=-1)[..., 0] for t in scales]  # every other value
    views = [weight_view, *scale_views]
    assert not any(v.is_contiguous() for v in views)
    x = torch.randn(M, 96).to(dtype)
    fn = int8_linear if bits == 8 else int4_linear
    torch.testing.assert_close(fn(x, *views), fn(x, *q))


@pytest.mark.skipif(not ON_CUDA, reason="FASTLM_KERNELS=reference on a GPU (CPU tensors take the CPU paths)")
@pytest.mark.parametrize("bits", [8, 4])
def test_reference_switch_on_a_gpu_runs_the_reference(monkeypatch, bits):
    """Not the CPU paths: PyTorch's packed weight-only kernels take CPU tensors only."""
    monkeypatch.setenv(KERNELS_ENV, "reference")
    q, x = _quantized(bits, 32, 64, 32), torch.randn(3, 64)
    fn, ref = (int8_linear, int8_linear_ref) if bits == 8 else (int4_linear, int4_linear_ref)
    assert torch.equal(fn(x, *q), ref(x, *q))


def test_launcher_picks_gemv_up_to_16_rows_then_gemm(monkeypatch):
    launched = []
    for name in ("_int8_gemv", "_int8_gemm"):
        kernel = getattr(_quant, name)
        monkeypatch.setattr(_quant, name, _Recorder(kernel, name, launched))
    q = quantize_int8(torch.randn(8, 32))
    for M in (1, 16, 17):
        _quant.launch_int8_linear(torch.randn(M, 32), *q, None)
    assert launched == ["_int8_gemv", "_int8_gemv", "_int8_gemm"]


class _Recorder:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


# ------------------------------------------------------------------------------------------ CPU paths

cpu_only = pytest.mark.skipif(ON_CUDA, reason="CPU paths")


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 9])
def test_cpu_int8_packed_kernel(M, dtype):
    if not _quant_cpu.int8_packed_available():
        pytest.skip("this PyTorch has no aten._weight_int8pack_mm")
    q, b = quantize_int8(_weight(48, 96)), torch.randn(48).to(dtype)
    x = torch.randn(M, 96).to(dtype)
    ref = F.linear(x.double(), dequantize_int8(*q, dtype=torch.float64), b.double())
    torch_y = F.linear(x, dequantize_int8(*q, dtype=dtype), b)
    assert_close_by_rule(_quant_cpu.int8_packed(x, *q, b), ref, torch_y, atol=ATOL[dtype] * 10)


@cpu_only
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M, N, K", [(1, 32, 96), (9, 32, 256), (3, 37, 96)])
def test_cpu_int4_packed_kernel(M, N, K, dtype, group):
    """N = 37: the repacked copy takes whole tiles of 16 rows (zero rows added, their outputs sliced off)."""
    if not _quant_cpu.int4_packed_available():
        pytest.skip("this PyTorch has no aten._weight_int4pack_mm_for_cpu")
    q, b = quantize_int4(_weight(N, K), group), torch.randn(N).to(dtype)
    x = torch.randn(M, K).to(dtype)
    w64 = dequantize_int4(*q, in_features=K, dtype=torch.float64)
    ref, torch_y = F.linear(x.double(), w64, b.double()), F.linear(x, w64.to(dtype), b)
    assert_close_by_rule(_quant_cpu.int4_packed(x, *q, b), ref, torch_y, atol=ATOL[dtype] * 10)


@cpu_only
def test_cpu_int4_repacking_is_cached_and_follows_in_place_changes():
    q = quantize_int4(_weight(16, 64), 32)
    first = _quant_cpu._int4_packed(*q, torch.bfloat16)
    assert _quant_cpu._int4_packed(*q, torch.bfloat16) is first
    q[1].mul_(2)  # the scales change in place: the cached copy must not be used
    again = _quant_cpu._int4_packed(*q, torch.bfloat16)
    assert again is not first and torch.equal(again[1][..., 0], q[1].t().bfloat16())


@cpu_only
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 20])
def test_cpu_dispatch_matches_reference(reference_kernels, bits, M):
    """Interpreter off: the timed choice (packed kernel or dequantize + linear), whichever it is."""
    _check_linear(bits, M, 32, 64, torch.bfloat16, group=32)
    assert (f"int{bits}", torch.bfloat16, "decode" if M <= 16 else "prefill", "32x64") in _quant_cpu.choices()


@cpu_only
@pytest.mark.parametrize("candidate", ["dequant", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_each_candidate_matches_reference(reference_kernels, monkeypatch, bits, dtype, candidate):
    """Every CPU candidate the timing may pick (bf16 int8 "dequant" scales the output instead of the weight)."""
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    monkeypatch.setenv("FASTLM_CPU_KERNELS", candidate)
    for M in (3, 20):
        _check_linear(bits, M, 32, 64, dtype, group=32)


@cpu_only
@pytest.mark.parametrize("candidate", ["dequant", "packed"])
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_candidates_read_strided_weight_and_scales(reference_kernels, monkeypatch, bits, candidate):
    monkeypatch.setattr(_quant_cpu, "_choices", {})
    monkeypatch.setenv("FASTLM_CPU_KERNELS", candidate)
    for M in (3, 20):
        _check_strided_views(bits, M, torch.bfloat16)


# ---------------------------------------------------------------------------------- module and errors

@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_from_linear(bits):
    linear = torch.nn.Linear(70, 24)
    module = QuantLinear.from_linear(linear, bits, group_size=32)
    x = torch.randn(3, 70)
    q = [module.weight, module.weight_scale] + ([module.weight_zero] if bits == 4 else [])
    ref = F.linear(x.double(), _dequantized(bits, q, 70), linear.bias.double())
    assert_close_by_rule(module(x), ref, F.linear(x, _dequantized(bits, q, 70, torch.float32), linear.bias))
    assert set(dict(module.named_buffers())) == {"weight", "weight_scale"} | ({"weight_zero"} if bits == 4 else set())


@pytest.mark.parametrize("bits, dtype", [(8, torch.float32), (4, torch.float32), (8, torch.bfloat16), (4, torch.bfloat16)])
def test_quant_embedding_looks_up_dequantized_rows(bits, dtype):
    """Each looked-up row is its dequantized table row (70 columns: int4 pads to 96 with groups of 32),
    in the module's dtype, for ids of any shape; shares QuantLinear's buffers and formats."""
    emb = torch.nn.Embedding(37, 70).to(dtype)
    module = QuantEmbedding.from_embedding(emb, bits, group_size=32)
    q = [module.weight, module.weight_scale] + ([module.weight_zero] if bits == 4 else [])
    table = _dequantized(bits, q, 70, dtype)
    ids = torch.tensor([[0, 36, 5], [5, 5, 1]])
    out = module(ids)
    assert out.shape == (2, 3, 70) and out.dtype == dtype and torch.equal(out, table[ids])
    assert (table.float() - emb.weight.float()).abs().max() <= module.weight_scale.max() / 2 + 1e-2 * (dtype != torch.float32)
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        module(ids.float())
    with pytest.raises(IndexError):
        module(torch.tensor([37]))


@pytest.mark.parametrize("call, message", [
    (lambda: quantize_int8(torch.randn(4)), "w must have 2 dimensions"),
    (lambda: quantize_int8(torch.tensor([[1.0, float("nan")]])), "non-finite"),
    (lambda: quantize_int4(torch.randn(4, 64), group_size=48), "group_size must be one of"),
    (lambda: quantize_int4(torch.randn(4, 64).to(torch.int32)), "w must have dtype"),
    (lambda: int8_linear(torch.randn(2, 5), *quantize_int8(torch.randn(3, 4))), r"x's last dimension \(5\)"),
    (lambda: int8_linear(torch.randn(2, 4), torch.zeros(3, 4), torch.ones(3)), "weight must have dtype"),
    (lambda: int8_linear(torch.randn(2, 4), *quantize_int8(torch.randn(3, 4)), bias=torch.ones(4)),
     r"bias must have shape \(3,\)"),
    (lambda: int4_linear(torch.randn(2, 20), *quantize_int4(torch.randn(3, 64), 32)), "x's last dimension must be in"),
    (lambda: int4_linear(torch.randn(2, 64), *quantize_int4(torch.randn(3, 64), 32)[:2], torch.ones(3, 1)),
     r"zero must have shape \(3, 2\)"),
    (lambda: dequantize_int4(*quantize_int4(torch.randn(3, 64), 32), in_features=65), "in_features must be in"),
    (lambda: QuantLinear(8, 8, bits=3), "bits must be 4 or 8"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------- custom ops, compile

@pytest.mark.parametrize("path", ["reference", "triton"])  # on CPU "triton" is the interpreter
def test_opcheck_quantized_linear_ops(path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, b = torch.randn(3, 64), torch.randn(16)
    torch.library.opcheck(torch.ops.fastlm.int8_linear.default, (x, *quantize_int8(torch.randn(16, 64)), b))
    torch.library.opcheck(torch.ops.fastlm.int4_linear.default, (x, *quantize_int4(torch.randn(16, 64), 32), None))


@cpu_only
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quant_linear_has_no_graph_break(bits, reference_kernels):
    module = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(40, 32), bits, 32), torch.nn.GELU(),
                                 QuantLinear.from_linear(torch.nn.Linear(32, 8), bits, 32))
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5)
