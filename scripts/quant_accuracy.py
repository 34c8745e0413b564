"""Accuracy of fastlm's weight-only formats on a trained checkpoint: perplexity on a held-out text and
greedy agreement with the unquantized model, one table.

For each format (int8, int4 with groups of 128/64/32, and int8 / int4-g128 with the embedding and LM head
quantized too) the checkpoint is written by `fastlm quantize`, then
- perplexity: fastlm.evaluate(..., precision="bf16") on --data (bf16 autocast, as the models train);
- greedy agreement: 16 prompts of 32 tokens cut at even offsets of --data, 64 new tokens each (bf16,
  temperature 0, eos ignored), compared position by position with the unquantized model's tokens.

    python scripts/quant_accuracy.py --model fastlm/default_model --data eval.txt --block-size 512
"""
import argparse
import json
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORMATS = [("int8", []), ("int4-g128", []), ("int4-g64", []), ("int4-g32", []),
           ("int8", ["--quantize-head"]), ("int4-g128", ["--quantize-head"])]
PROMPTS, PROMPT_LEN, NEW_TOKENS = 16, 32, 64


def quantize_args(name, extra, model, out):
    bits = ["--bits", "8"] if name == "int8" else ["--bits", "4", "--group-size", name.split("-g")[1]]
    return ["quantize", "--model", model, "--out", out, *bits, *extra]


def prompts_from(text_path, tokenizer):
    ids = tokenizer.encode(open(text_path, encoding="utf-8").read())
    step = (len(ids) - PROMPT_LEN) // PROMPTS
    return [ids[i * step: i * step + PROMPT_LEN] for i in range(PROMPTS)]


def greedy(folder, prompts):
    import fastlm

    llm = fastlm.LLM(folder, dtype="bfloat16", device="cpu")
    return llm.generate_tokens(prompts, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def agreement(ours, reference):
    equal = sum(a == b for x, y in zip(ours, reference) for a, b in zip(x, y))
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) for x, y in zip(ours, reference)]
    return dict(positions_equal=round(equal / sum(len(y) for y in reference), 3),
                identical=sum(p == len(y) for p, y in zip(prefixes, reference)),
                mean_identical_prefix=round(sum(prefixes) / len(prefixes), 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="held-out text")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--out", default=None, help="write the rows as JSON lines here")
    args = p.parse_args(argv)
    import fastlm
    from fastlm.cli import main as cli
    from fastlm.model import load_tokenizer

    prompts = prompts_from(args.data, load_tokenizer(args.model))
    reference = greedy(args.model, prompts)
    base = fastlm.evaluate(args.model, args.data, block_size=args.block_size, precision="bf16", device="cpu")
    rows = [dict(format="unquantized", perplexity=round(base["perplexity"], 4), delta_pct=0.0,
                 tokens=base["tokens"], positions_equal=1.0, identical=PROMPTS, mean_identical_prefix=NEW_TOKENS)]
    print(json.dumps(rows[0]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in FORMATS:
            out = os.path.join(tmp, name + "".join(extra))
            if cli(quantize_args(name, extra, args.model, out)) != 0:
                raise SystemExit(f"fastlm quantize failed for {name}")
            ppl = fastlm.evaluate(out, args.data, block_size=args.block_size, precision="bf16", device="cpu")["perplexity"]
            rows.append(dict(format=name + (" +head" if extra else ""), perplexity=round(ppl, 4),
                             delta_pct=round(100 * (ppl / base["perplexity"] - 1), 3), tokens=base["tokens"],
                             **agreement(greedy(out, prompts), reference)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
