"""The decode step captured in a CUDA graph and replayed (GPU only; CPU runs generate.DecodeStep).

A decode step launches hundreds of small kernels; at batch 1 their launch overhead rivals the memory
time. Capturing the step once per (batch, cache) and replaying it launches them all in one call.
What makes the capture valid for every later step: the model's decode path keeps all step state on
the device — the write positions come from cache.seqlens, which the step advances in place — and never
reads a device value on the host. The input tokens and the output logits live in static buffers; the
sampling that follows stays outside the graph (it reads the logits before the next replay).

Capture writes K/V at the current cache.seqlens and advances them (as any step does), so the lengths
are saved before and restored after; the garbage K/V lies beyond the restored lengths and is
overwritten by the next real step. Untested on this project's CPU machines (no GPU at hand).
"""
import warnings

import torch

from fastlm.runtime.generate import DecodeStep


class GraphedDecodeStep:
    """Same interface as DecodeStep: tokens (B,) -> logits (B, V), replaying a captured graph."""

    uses_cuda_graph = True
    capture_error = None

    def __init__(self, model, cache, warmup_steps: int = 2):
        if cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got device {cache.device}")
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)  # static input
        saved_lengths = cache.seqlens.clone()
        side = torch.cuda.Stream(device=cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):  # warm up (allocator, autotuning) outside the capture
            for _ in range(warmup_steps):
                model(self.tokens, cache=cache)
                cache.seqlens.copy_(saved_lengths)
        torch.cuda.current_stream(cache.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' calls (an LLM shared by threads) may run while this one captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = model(self.tokens, cache=cache)[:, -1]  # static output (B, V)
        cache.seqlens.copy_(saved_lengths)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens[:, 0].copy_(tokens)
        self.graph.replay()
        return self.logits


def make_decode_step(model, cache, use_graph: bool = True):
    """A CUDA graph step on a GPU; the eager step elsewhere. If capture fails the step is eager, with a
    warning and the reason in step.capture_error (step.uses_cuda_graph tells which one you got)."""
    if not use_graph or cache.device.type != "cuda":
        return DecodeStep(model, cache)
    try:
        return GraphedDecodeStep(model, cache)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be captured still generates, eagerly
        warnings.warn(f"CUDA graph capture of the decode step failed ({exc}); running eagerly", stacklevel=2)
        step = DecodeStep(model, cache)
        step.capture_error = f"{type(exc).__name__}: {exc}"
        return step
