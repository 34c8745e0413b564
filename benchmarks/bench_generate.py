"""Generation speed: fastlm against transformers' generate on the same random checkpoint, in one run.

For a GPT-2-124M-shaped and a Llama-shaped (~150M, GQA) checkpoint, fp32 and bf16, batch 1 and 8:
prefill tokens/s (prompt tokens per second) and decode tokens/s (new tokens per second, all rows), for
fastlm (the runtime fastlm.LLM uses: bf16 linears prepacked on CPU, a CUDA graph per step on GPU) and for
transformers' `generate` (greedy, eos ignored; see fastlm/runtime/bench.py for how each is timed).
Each decode figure also reads as memory bandwidth: weight bytes per step x steps/s, against the
machine's measured read bandwidth (a large fp32 sum) and copy bandwidth, both measured in this run.

    python benchmarks/bench_generate.py            # full sizes (minutes on a 2-core CPU)
    python benchmarks/bench_generate.py --quick    # small models, fewer tokens
Writes benchmarks/out/bench_generate.csv and .png.
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import base_parser, check_device, describe_device, measure_copy_bandwidth, plot, write_csv  # noqa: E402
from fastlm.runtime.bench import (alternate_speeds, engine_run, fastlm_engine, hf_run, read_bandwidth_gbs,  # noqa: E402
                                  weight_bytes_per_step)

FULL = {
    "gpt2-124M": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "llama-150M": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                                 num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000,
                                 tie_word_embeddings=False)),
}
QUICK = {
    "gpt2-small": ("gpt2", dict(n_embd=256, n_layer=4, n_head=4, n_positions=512, vocab_size=8192)),
    "llama-small": ("llama", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512, vocab_size=8192,
                                  tie_word_embeddings=False)),
}


def save_random_checkpoint(family: str, kwargs: dict, folder: str) -> str:
    import transformers as tf

    config_cls, model_cls = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
                             "llama": (tf.LlamaConfig, tf.LlamaForCausalLM)}[family]
    torch.manual_seed(0)
    model_cls(config_cls(**kwargs)).save_pretrained(folder)
    return folder


def random_checkpoints(configs: dict, names, folder: str):
    """(name, checkpoint folder) for each config (only those in `names` unless it is empty), built in folder."""
    for name, (family, kwargs) in configs.items():
        if not names or name in names:
            yield name, save_random_checkpoint(family, kwargs, os.path.join(folder, name))


def bench_checkpoint(name, folder, device, dtypes, batch_sizes, prompt_len, new_tokens, repeats, read_gbs):
    import transformers as tf

    import fastlm

    rows = []
    for dtype in dtypes:
        ours = fastlm.LLM(folder, dtype=dtype, device=device).model
        theirs = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        weight_gb = weight_bytes_per_step(ours) / 1e9
        for batch in batch_sizes:
            engine = fastlm_engine(ours, batch, prompt_len, new_tokens)
            runs = {"fastlm": engine_run(engine, batch, prompt_len, new_tokens),
                    "hf": hf_run(theirs, batch, prompt_len, new_tokens)}
            speeds = alternate_speeds(runs, batch, prompt_len, new_tokens, repeats)  # in turns: same machine state
            a, b = speeds["fastlm"], speeds["hf"]
            gbs = a["decode_tok_s"] / batch * weight_gb
            rows.append(dict(model=name, dtype=dtype, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                             fastlm_prefill_tok_s=round(a["prefill_tok_s"], 1),
                             hf_prefill_tok_s=round(b["prefill_tok_s"], 1),
                             prefill_x_hf=round(a["prefill_tok_s"] / b["prefill_tok_s"], 2),
                             fastlm_decode_tok_s=round(a["decode_tok_s"], 2),
                             hf_decode_tok_s=round(b["decode_tok_s"], 2),
                             decode_x_hf=round(a["decode_tok_s"] / b["decode_tok_s"], 2),
                             weight_gb=round(weight_gb, 4), fastlm_weight_gbs=round(gbs, 2),
                             hf_weight_gbs=round(b["decode_tok_s"] / batch * weight_gb, 2),
                             roofline_fraction=round(gbs / read_gbs, 3)))
            print_row(rows[-1])
        del ours, theirs
    return rows


COLUMNS = [("model", 11), ("dtype", 8), ("batch", 5), ("fastlm_prefill_tok_s", 10), ("hf_prefill_tok_s", 10),
           ("prefill_x_hf", 7), ("fastlm_decode_tok_s", 10), ("hf_decode_tok_s", 10), ("decode_x_hf", 7),
           ("fastlm_weight_gbs", 9), ("roofline_fraction", 8)]
HEADER = ["model", "dtype", "batch", "prefill", "HF pref", "x HF", "decode", "HF dec", "x HF", "GB/s", "roofline"]


def print_row(row):
    print(" ".join(f"{row[key]!s:>{width}}" for key, width in COLUMNS), flush=True)


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=None, help="subset of the model names")
    args = parser.parse_args(argv)
    device = check_device(args.device, args.threads)
    configs = QUICK if args.quick else FULL
    prompt_len, new_tokens, repeats = (32, 16, 2) if args.quick else (128, 64, 3)
    read_gbs = read_bandwidth_gbs(device)
    copy_gbs = measure_copy_bandwidth(device, quick=args.quick)
    print(f"{describe_device(device)}; memory read {read_gbs:.1f} GB/s (fp32 sum), copy {copy_gbs:.1f} GB/s "
          f"(read + write); prompt {prompt_len} tokens, {new_tokens} new tokens, median of {repeats}")
    print(" ".join(f"{h:>{w}}" for h, (_, w) in zip(HEADER, COLUMNS)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in random_checkpoints(configs, args.models, tmp):
            rows += bench_checkpoint(name, folder, device, args.dtypes, args.batch_sizes, prompt_len, new_tokens,
                                     repeats, read_gbs)
    for row in rows:
        row.update(read_gbs=round(read_gbs, 1), copy_gbs=round(copy_gbs, 1), device=describe_device(device))
    csv_path = write_csv(rows, os.path.join(args.out, "bench_generate.csv"))
    png_path = plot(rows, os.path.join(args.out, "bench_generate.png"), x="batch", y="decode_x_hf",
                    series=lambda r: f"{r['model']} {r['dtype']}", title="decode tokens/s, fastlm / transformers",
                    ylabel="speedup over transformers' generate", hline=1.0, hline_label="transformers")
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
