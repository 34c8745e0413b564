"""The fixed cost of a decode step: time per batch-1 decode step of tiny models whose weights cost
nothing (dim 64, vocab 256), against their number of layers. The slope is the Python and dispatch cost
per layer, the intercept the per-step cost outside the layers (embedding, final norm, head, sampling).

    python benchmarks/bench_step_overhead.py [--threads 1] [--layers 1 4 16]
Writes benchmarks/out/bench_step_overhead.csv.
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_generate import save_random_checkpoint  # noqa: E402
from benchmarks.common import base_parser, check_device, write_csv  # noqa: E402

FAMILIES = {
    "gpt2": dict(n_embd=64, n_head=2, n_positions=512, vocab_size=256),
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=512, vocab_size=256, tie_word_embeddings=False),
}
LAYER_KEY = {"gpt2": "n_layer", "llama": "num_hidden_layers"}


def fit(xs, ys):
    """Least-squares (slope, intercept)."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    check_device("cpu", args.threads)
    from fastlm import LLM
    from fastlm.runtime.bench import fastlm_speed

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, kwargs in FAMILIES.items():
            for layers in args.layers:
                folder = save_random_checkpoint(family, {**kwargs, LAYER_KEY[family]: layers},
                                                os.path.join(tmp, f"{family}{layers}"))
                llm = LLM(folder, dtype="float32", device="cpu")
                speed = fastlm_speed(llm.model, 1, 8, args.new_tokens, repeats=5)
                rows.append({"family": family, "layers": layers, "step_us": round(1e6 / speed["decode_tok_s"], 1)})
                print(rows[-1], flush=True)
            mine = [r for r in rows if r["family"] == family]
            slope, intercept = fit([r["layers"] for r in mine], [r["step_us"] for r in mine])
            print(f"{family}: {slope:.1f} us per layer + {intercept:.1f} us per step "
                  f"({torch.get_num_threads()} threads)", flush=True)
    print("wrote", write_csv(rows, os.path.join(args.out, "bench_step_overhead.csv")))


if __name__ == "__main__":
    main()
