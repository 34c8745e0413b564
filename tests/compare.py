"""The comparison rule (after flash-attention's tests): a result in a low-precision dtype is judged
against an fp64 reference, with the error plain torch makes in the same dtype as the yardstick."""
import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(actual, reference64, torch_same_dtype, *, atol=1e-5, factor=2.0, name="output"):
    """max|actual - ref| <= factor * max|torch - ref| + atol."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert torch.isfinite(actual.double()).all(), f"{name}: non-finite values"
    err = max_abs_err(actual, reference64)
    base = max_abs_err(torch_same_dtype, reference64)
    assert err <= factor * base + atol, f"{name}: error {err:.3e} > {factor} x torch error {base:.3e} + {atol:.1e}"


def ops_run(fn):
    """(fn(), the names of the torch ops it ran), by torch.profiler."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {event.key for event in prof.key_averages()}
