"""`fastlm train` and `fastlm eval`: thin argparse front ends of fastlm.train / fastlm.evaluate."""
import argparse

from fastlm.training.configs import preset_names


def add_parsers(subparsers):
    _add_train_parser(subparsers)
    _add_eval_parser(subparsers)


def _add_train_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="fine-tune a checkpoint or train a preset from scratch on a text file",
        description="Fine-tune a checkpoint (--model, default: the embedded model) or train a preset from "
                    "scratch (--config) on a text file; saves a Hugging Face checkpoint in --out.")
    p.add_argument("--data", required=True, help="training text file")
    p.add_argument("--eval", help="evaluation text file (perplexity every --eval-every steps and at the end)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint folder to fine-tune (default: the embedded model)")
    src.add_argument("--config", help=f"preset to train from scratch: {', '.join(preset_names())}")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's; from scratch: a BPE trained "
                                       "on --data)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the BPE trained from scratch")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1 when --steps is absent)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default min(100, steps/10))")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping, 0 disables (default 1)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: final save only)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoint-N folders kept (default 2)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out, or from the given checkpoint folder; "
                        "the schedule, batch shape, seed and data order come from the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA GPUs that support it, fp32 elsewhere")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_train)


def _add_eval_parser(subparsers):
    p = subparsers.add_parser("eval", help="perplexity of a model on a text file",
                              description="Perplexity of a checkpoint on a text file, over the training packing.")
    p.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    p.add_argument("--data", required=True, help="text file")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu, cuda... (default: cuda when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.set_defaults(func=run_eval)


TRAIN_ARGS = ("data", "eval", "model", "config", "tokenizer", "vocab_size", "out", "block_size", "batch_size",
              "grad_accum", "steps", "epochs", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip",
              "eval_every", "save_every", "keep_checkpoints", "resume", "seed", "device", "precision", "progress")


def run_train(args: argparse.Namespace):
    from fastlm.training import train

    result = train(**{name: getattr(args, name) for name in TRAIN_ARGS})
    print(f"trained {result.steps} steps, {result.tokens:,} tokens, {result.tokens_per_second:,.0f} tokens/s "
          f"({result.train_seconds:.0f} s)")
    if result.train_loss is not None:
        print(f"final train loss {result.train_loss:.4f}")
    if result.eval_loss is not None:
        print(f"eval loss {result.eval_loss:.4f}, perplexity {result.eval_perplexity:.2f}")
    print(f"model saved in {result.out}")
    return 0


def run_eval(args: argparse.Namespace):
    from fastlm.training import evaluate

    r = evaluate(args.model, args.data, block_size=args.block_size, batch_size=args.batch_size,
                 device=args.device, precision=args.precision)
    print(f"perplexity {r['perplexity']:.4f} (loss {r['loss']:.4f} nats/token) over {r['tokens']:,} tokens "
          f"in {r['blocks']} blocks of {args.block_size}")
    return 0
