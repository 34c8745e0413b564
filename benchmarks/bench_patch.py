"""Training step of a transformers Llama-shaped model, unpatched vs `fastlm.kernels.patch`ed.

One step = forward + LM loss + backward + AdamW step. Reported per variant and sequence length: median
step time, tokens/s, peak memory (torch.cuda.max_memory_allocated over one step, CUDA only) and model
TFLOP/s (6 x params x tokens + causal attention) as a fraction of a large matmul measured in the same
run. Peers: transformers with sdpa (its default) and with eager attention; ratios are against sdpa.
On CPU use --quick: it only proves the plumbing (tiny model, reference kernels).

    python benchmarks/bench_patch.py            # GPU: bf16, Llama-1B-shaped slice
    python benchmarks/bench_patch.py --quick    # CPU plumbing check
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (base_parser, check_device, describe_device, measure_matmul_flops, plot,  # noqa: E402
                               synchronize, time_ms, write_csv)

VARIANTS = ("transformers-sdpa", "transformers-eager", "fastlm-patch")


def model_config(quick: bool, seq_len: int):
    """Llama-3.2-1B's layer shapes (GQA 32/8 heads, head dim 64) with fewer layers; tiny for --quick."""
    import transformers

    if quick:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
    else:
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000)
    return transformers.LlamaConfig(max_position_embeddings=max(seq_len, 128), **shape)


def build(variant: str, config, device, dtype):
    """The model for `variant`, with the same weights for every variant (seeded init)."""
    import transformers

    from fastlm.kernels import patch

    config._attn_implementation = "eager" if variant == "transformers-eager" else "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    report = patch(model) if variant == "fastlm-patch" else None
    return model, report


def model_flops(config, params: int, batch: int, seq_len: int) -> float:
    """Training FLOPs of one step: 6 per parameter per token, plus causal attention (fwd 2x2xS^2xD per head
    per layer halved by the mask, backward 2.5x the forward)."""
    head_dim = config.hidden_size // config.num_attention_heads
    attention = 4 * batch * config.num_attention_heads * seq_len**2 * head_dim * 0.5 * 3.5
    return 6 * params * batch * seq_len + config.num_hidden_layers * attention


def measure(variant, config, device, dtype, batch, seq_len, quick):
    model, report = build(variant, config, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warmup: Triton compilation, optimizer state allocation
    synchronize(device)
    routed = (report.flash_calls, report.fallback_calls) if report else (0, 0)  # attention calls in one step
    peak_mb = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    ms = time_ms(step, device, warmup=1, reps=3 if quick else 10)
    params = sum(p.numel() for p in model.parameters())
    row = dict(variant=variant, seq_len=seq_len, batch=batch, dtype=str(dtype).replace("torch.", ""),
               step_ms=round(ms, 3), tokens_per_s=round(batch * seq_len / (ms * 1e-3), 1),
               peak_mem_mb=round(peak_mb, 1), tflops=model_flops(config, params, batch, seq_len) / (ms * 1e-3) / 1e12,
               flash_calls_per_step=routed[0], fallback_calls_per_step=routed[1])
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 4 GPU, 2 CPU)")
    args = parser.parse_args(argv)
    device = check_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "0")  # the reference path: plumbing only
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (4 if device.type == "cuda" else 2)
    seq_lens = [64] if args.quick and device.type == "cpu" else ([512, 2048] if args.quick else [512, 1024, 2048, 4096])
    ceiling = measure_matmul_flops(device, dtype if device.type == "cuda" else torch.float32)
    print(f"# {describe_device(device)}; matmul ceiling {ceiling:.3g} TFLOP/s")

    rows = []
    for seq_len in seq_lens:
        config = model_config(args.quick or device.type == "cpu", seq_len)
        by_variant = {v: measure(v, config, device, dtype, batch, seq_len, args.quick) for v in VARIANTS}
        base = by_variant["transformers-sdpa"]
        for row in by_variant.values():
            row["speedup_vs_sdpa"] = round(base["step_ms"] / row["step_ms"], 3)
            row["mem_vs_sdpa"] = round(row["peak_mem_mb"] / base["peak_mem_mb"], 3) if device.type == "cuda" else ""
            row["fraction_of_matmul"] = round(row["tflops"] / ceiling, 3)
            row["tflops"] = round(row["tflops"], 2)
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()))

    csv_path = write_csv(rows, os.path.join(args.out, f"bench_patch_{device.type}.csv"))
    png_path = plot(rows, os.path.join(args.out, f"bench_patch_{device.type}.png"), x="seq_len", y="step_ms",
                    series="variant", title=f"Llama-shaped training step, batch {batch} ({describe_device(device)})",
                    xlabel="sequence length", ylabel="step time (ms)")
    print(f"# wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
