"""Prefill and decode speed of fastlm and of transformers' generate on the same checkpoint.

Used by `fastlm bench` and benchmarks/bench_generate.py. Prompts are random ids, decoding is greedy and
ignores eos (every row runs the full length), so both engines do the same work.
- fastlm: B requests submitted to a fresh engine (prefix caching off, so repeats recompute everything):
  prefill = the first step, which prefills all B prompts (B x prompt_len tokens) and samples their first
  tokens; decode = the new_tokens decode steps after it (B tokens per step), each timed as a whole.
- transformers: generate() with a streamer noting the time of each step: prefill = up to the first new
  token (it includes generate's setup, which is part of what a user waits for), decode = the N steps
  after it.
engine_speed times a given engine the same way (`fastlm bench` times its LLM's, tensor-parallel or not).
Compared side by side (alternate_speeds), each is warmed up once and then they take turns, repeat by
repeat, so a shared machine's swings in speed fall on both alike rather than on whichever ran second.
Weight bytes per step: every parameter a decode step reads (linear layers, norms, the lm_head), not
the input embedding table (it reads B rows of it) nor learned positions; quantized layers count their
integer weights and scales.
"""
import statistics
import time
from typing import Callable, Dict, Tuple

import torch

from fastlm.kernels.quant import QuantLinear
from fastlm.runtime.engine import Engine
from fastlm.runtime.engine.kv_pool import bytes_per_token
from fastlm.runtime.sampling import SamplingParams


def weight_bytes_per_step(model) -> int:
    """Bytes of the parameters one decode step reads (tied lm_head counted once)."""
    skip = {id(model.tok_emb.weight)} - {id(model.lm_head.weight)}
    if getattr(model, "pos_emb", None) is not None:
        skip.add(id(model.pos_emb.weight))
    seen, total = set(), 0
    quantized = [b for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers()]
    for p in list(model.parameters()) + quantized:
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def whole_model_weight_bytes(model) -> int:
    """weight_bytes_per_step of the whole model, also for one rank's shard of a tensor-parallel model
    (counted on a meta-device copy of the whole model: no memory)."""
    shard = getattr(model, "shard", None)
    if shard is None:
        return weight_bytes_per_step(model)
    from fastlm.model import Transformer

    with torch.device("meta"):
        whole = Transformer(shard.full).to(model.dtype)
    return weight_bytes_per_step(whole)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_engine(model, batch_size: int, length: int, **options) -> Engine:
    """An engine for batch_size sequences of `length` tokens, no prefix caching (repeats recompute)."""
    block = 16
    memory = batch_size * -(-length // block) * block * bytes_per_token(model)
    options = dict(dict(max_num_seqs=batch_size, kv_cache_memory=memory, enable_prefix_caching=False), **options)
    return Engine(model, block_size=block, **options)


Run = Callable[[], Tuple[float, float]]  # one timed generation: (prefill seconds, decode seconds)


def fastlm_speed(model, batch_size: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
    """{'prefill_tok_s', 'decode_tok_s'} of fastlm's engine (median of `repeats`, after a warmup)."""
    return engine_speed(fastlm_engine(model, batch_size, prompt_len, new_tokens), batch_size, prompt_len,
                        new_tokens, repeats)


def fastlm_engine(model, batch_size: int, prompt_len: int, new_tokens: int) -> Engine:
    """The engine fastlm_speed times: room for batch_size rows, every prompt prefilled in one step."""
    return bench_engine(model, batch_size, prompt_len + new_tokens + 1, max_num_batched_tokens=batch_size * prompt_len)


def engine_speed(engine: Engine, batch_size: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
    """fastlm_speed on a given engine, which must run batch_size sequences at once, prefill their prompts
    in one step and have prefix caching off (as bench_engine's); e.g. a tensor-parallel LLM's engine."""
    run = engine_run(engine, batch_size, prompt_len, new_tokens)
    return alternate_speeds({"engine": run}, batch_size, prompt_len, new_tokens, repeats)["engine"]


def alternate_speeds(runs: Dict[str, Run], batch_size: int, prompt_len: int, new_tokens: int,
                     repeats: int = 3) -> Dict[str, dict]:
    """{name: {'prefill_tok_s', 'decode_tok_s'}} of each run: each warmed up once, then `repeats` rounds in
    which every run goes once, in turn; medians over the rounds."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: {"prefill_tok_s": batch_size * prompt_len / statistics.median(t[0] for t in ts),
                   "decode_tok_s": batch_size * new_tokens / statistics.median(t[1] for t in ts)}
            for name, ts in times.items()}


def engine_run(engine: Engine, batch_size: int, prompt_len: int, new_tokens: int) -> Run:
    """A Run on `engine` (see engine_speed) of batch_size random prompts: prefill = its first step, which
    prefills every prompt and samples their first tokens; decode = the steps after it."""
    prompts = torch.randint(0, engine.model.config.vocab_size, (batch_size, prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens + 1, temperature=0, ignore_eos=True)

    def run():
        for p in prompts:
            engine.add_request(p, params)
        t0 = time.perf_counter()
        engine.step()  # every prompt prefilled, first tokens sampled (read back: synchronized)
        t1 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return t1 - t0, time.perf_counter() - t1

    return run


class _TokenClock:
    """A transformers streamer that only notes when each step's tokens arrive (put 0 is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_run(hf_model, batch_size: int, prompt_len: int, new_tokens: int) -> Run:
    """A Run of transformers' generate() (greedy, eos ignored) on batch_size random prompts, with a streamer
    timing each step: prefill = until the first new token, decode = the rest."""
    device = hf_model.device
    ids = torch.randint(0, hf_model.config.vocab_size, (batch_size, prompt_len), device=device)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0

    @torch.no_grad()
    def run():
        clock = _TokenClock()
        _sync(device)
        start = time.perf_counter()
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1, do_sample=False,
                          eos_token_id=None, pad_token_id=0, streamer=clock)
        return clock.times[1] - start, clock.times[-1] - clock.times[1]

    return run


def read_bandwidth_gbs(device, nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """GB/s of reading a large fp32 tensor once (a sum): the memory roofline of a decode step."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    x.sum()
    return nbytes / _median_seconds(lambda: x.sum(), device, repeats) / 1e9
