"""Offline throughput: fastlm's engine against transformers' generate in padded static batches of 8.

Workload "mixed": --requests requests (default 200) with prompt lengths uniform in [32, 512] and output
lengths uniform in [16, 256], random ids, seeded. fastlm gets every request at once (continuous
batching, paged KV, chunked prefill); transformers runs them in arrival order in left-padded batches
of 8, each batch generating until its longest output (greedy, eos ignored, as fastlm). Both count only
the requested output tokens: tokens/s = sum of output lengths / wall time, requests/s likewise.
Workload "shared": every request starts with the same 256-token system prompt (then 16-128 tokens of
its own, outputs 16-128): fastlm with prefix caching on against off.

    python benchmarks/bench_throughput.py                       # GPT-2-124M and Llama-150M shapes, bf16
    python benchmarks/bench_throughput.py --requests 64 --models gpt2-124M   # a reduced run
    python benchmarks/bench_throughput.py --quick               # small models, 40 requests (minutes)
Writes benchmarks/out/bench_throughput.csv and .png.
"""
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_generate import FULL, QUICK, random_checkpoints  # noqa: E402
from benchmarks.common import base_parser, check_device, describe_device, synchronize, write_csv  # noqa: E402

FULL_SIZES = dict(prompt=(32, 512), output=(16, 256), system=256, suffix=(16, 128), shared_output=(16, 128))
QUICK_SIZES = dict(prompt=(16, 128), output=(8, 64), system=64, suffix=(8, 32), shared_output=(8, 32))


def mixed_workload(n, vocab, sizes, seed=0):
    """[(prompt ids, output length)] with lengths uniform in the ranges, seeded."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*sizes["prompt"]))], rng.randint(*sizes["output"]))
            for _ in range(n)]


def shared_workload(n, vocab, sizes, seed=1):
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(sizes["system"])]
    return [(system + [rng.randrange(vocab) for _ in range(rng.randint(*sizes["suffix"]))],
             rng.randint(*sizes["shared_output"])) for _ in range(n)]


def run_fastlm(model, workload, **engine_options) -> dict:
    """Every request submitted at once to a fresh engine, stepped to the end."""
    from fastlm.runtime.engine import Engine
    from fastlm.runtime.sampling import SamplingParams

    engine = Engine(model, **engine_options)
    for prompt, n_out in workload[:2]:  # warm up (first-call allocations)
        engine.add_request(prompt[:16], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    hits_before = engine.stats()["prefix_cache_hit_tokens"]
    synchronize(model.device)
    start = time.perf_counter()
    for prompt, n_out in workload:
        engine.add_request(prompt, SamplingParams(max_new_tokens=n_out, temperature=0, ignore_eos=True))
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(out.token_ids) for out in engine.step())
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return dict(seconds=seconds, tokens=tokens, hit_tokens=stats["prefix_cache_hit_tokens"] - hits_before,
                preemptions=stats["preemptions"])


@torch.no_grad()
def run_hf(hf_model, workload, batch_size=8) -> dict:
    """transformers' generate over left-padded static batches in arrival order."""
    device = hf_model.device
    hf_model.generation_config.eos_token_id = None
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = workload[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        longest = max(n for _, n in batch)
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == width + longest
        tokens += sum(n for _, n in batch)  # only the requested tokens count
    synchronize(device)
    return dict(seconds=time.perf_counter() - start, tokens=tokens)


def row(model, dtype, workload_name, engine, workload, result, **extra):
    return dict(model=model, dtype=dtype, workload=workload_name, engine=engine, requests=len(workload),
                prompt_tokens=sum(len(p) for p, _ in workload), output_tokens=result["tokens"],
                seconds=round(result["seconds"], 2), tokens_per_s=round(result["tokens"] / result["seconds"], 1),
                requests_per_s=round(len(workload) / result["seconds"], 3), **extra)


def bench_model(name, folder, device, dtype, n_requests, sizes, with_hf, workloads=("mixed", "shared")):
    import fastlm

    llm = fastlm.LLM(folder, dtype=dtype, device=device)
    rows = _bench_mixed(name, folder, llm, dtype, n_requests, sizes, with_hf) if "mixed" in workloads else []
    return rows + (_bench_shared(name, llm, dtype, n_requests, sizes) if "shared" in workloads else [])


def _bench_mixed(name, folder, llm, dtype, n_requests, sizes, with_hf):
    import transformers as tf

    mixed = mixed_workload(n_requests, llm.model.config.vocab_size, sizes)
    ours = run_fastlm(llm.model, mixed)
    rows = [row(name, dtype, "mixed", "fastlm", mixed, ours, preemptions=ours["preemptions"])]
    if with_hf:
        hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(llm.device).eval()
        theirs = run_hf(hf, mixed)
        rows[0]["tokens_x_hf"] = round(theirs["seconds"] / ours["seconds"], 2)
        rows.append(row(name, dtype, "mixed", "transformers", mixed, theirs))
    for r in rows:
        print_row(r)
    return rows


def _bench_shared(name, llm, dtype, n_requests, sizes):
    shared = shared_workload(n_requests, llm.model.config.vocab_size, sizes)
    on, off = (run_fastlm(llm.model, shared, enable_prefix_caching=flag) for flag in (True, False))
    rows = [row(name, dtype, "shared", "fastlm prefix cache", shared, on, prefix_hit_tokens=on["hit_tokens"],
                prefix_x_off=round(off["seconds"] / on["seconds"], 2)),
            row(name, dtype, "shared", "fastlm no prefix cache", shared, off)]
    for r in rows:
        print_row(r)
    return rows


def print_row(r):
    ratio = r.get("tokens_x_hf", r.get("prefix_x_off", ""))
    print(f"{r['model']:>11} {r['workload']:>7} {r['engine']:>23} {r['requests']:>5} {r['output_tokens']:>7} "
          f"{r['seconds']:>8} {r['tokens_per_s']:>8} {r['requests_per_s']:>7} {ratio!s:>6}", flush=True)


def bar_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['workload']}\n{r['engine']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 5))
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color=[
        "tab:blue" if r["engine"].startswith("fastlm") else "tab:gray" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("output tokens/s")
    ax.set_title("offline throughput: fastlm engine vs transformers' generate (static batches of 8)")
    ax.grid(True, axis="y", alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--requests", type=int, default=None, help="requests per workload (default 200, quick 40)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of the model names")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (fastlm figures only)")
    parser.add_argument("--workloads", nargs="+", default=["mixed", "shared"], choices=["mixed", "shared"])
    args = parser.parse_args(argv)
    device = check_device(args.device, args.threads)
    configs, sizes = (QUICK, QUICK_SIZES) if args.quick else (FULL, FULL_SIZES)
    n_requests = args.requests or (40 if args.quick else 200)
    if n_requests < 1:
        raise SystemExit("--requests must be >= 1")
    print(f"{describe_device(device)}; {n_requests} requests per workload, {args.dtype}, threads {torch.get_num_threads()}")
    print(f"{'model':>11} {'work':>7} {'engine':>23} {'reqs':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8} "
          f"{'req/s':>7} {'ratio':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in random_checkpoints(configs, args.models, tmp):
            rows += bench_model(name, folder, device, args.dtype, n_requests, sizes, not args.no_hf, args.workloads)
    for r in rows:
        r["device"] = describe_device(device)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    csv_path = write_csv(rows, os.path.join(args.out, "bench_throughput.csv"))
    png_path = bar_plot(rows, os.path.join(args.out, "bench_throughput.png"))
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
