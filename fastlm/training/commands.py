"""`fastlm train` and `fastlm eval`: thin argparse front ends of fastlm.train / fastlm.evaluate."""
import argparse
import os
import sys
from dataclasses import MISSING, fields

from fastlm.training.configs import preset_names
from fastlm.training.options import TrainOptions


def add_parsers(subparsers):
    _add_train_parser(subparsers)
    _add_eval_parser(subparsers)


def _add_train_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="fine-tune a checkpoint or train a preset from scratch on a text file",
        description="Fine-tune a checkpoint (--model, default: the embedded model) or train a preset from "
                    "scratch (--config) on a text file; saves a Hugging Face checkpoint in --out.")
    groups = {}
    for option in fields(TrainOptions):
        meta = dict(option.metadata)
        group = meta.pop("group", None)
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        target = groups[group] if group else p
        target.add_argument(meta.pop("flag", "--" + option.name.replace("_", "-")), dest=option.name,
                            **_argument(option, meta))
    p.set_defaults(func=run_train)


def _argument(option, meta):
    """argparse keywords of a TrainOptions field: its type from the default, its help with the default."""
    kwargs = {"help": meta.pop("help")}
    if option.name == "config":
        kwargs["help"] += f": {', '.join(preset_names())}"
    if option.default is MISSING:
        return {**kwargs, "required": True, **meta}
    if isinstance(option.default, bool) and "nargs" not in meta:
        return {**kwargs, "action": "store_false" if option.default else "store_true", **meta}
    if option.default is not None and option.default is not False:
        kwargs["help"] += f" (default {option.default})"
        kwargs["type"] = type(option.default)
    return {**kwargs, "default": option.default, **meta}


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


def run_train(args: argparse.Namespace):
    from fastlm.training.distributed import launched_by_torchrun

    code = _train(args)
    if launched_by_torchrun():
        # one rank of a torchrun launch: end without finalizing the interpreter. A gloo thread may still be
        # releasing the last collective's tensors, and a thread taking the GIL during finalization aborts
        # the process (SIGABRT, "terminate called without an active exception", ~1 run in 10 here) after
        # a run that succeeded, which torchrun then reports as failed. The tensor-parallel workers end so too.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(args) -> int:
    from fastlm.training import train
    from fastlm.training.distributed import RankFailed, is_main_process
    from fastlm.training.interrupts import TrainingInterrupted

    try:
        result = train(**{option.name: getattr(args, option.name) for option in fields(TrainOptions)})
    except TrainingInterrupted as stop:
        if is_main_process():  # under torchrun every rank stops at the same step; rank 0 says so
            print(f"fastlm train: {stop}", file=sys.stderr)
        return stop.exit_code
    except RankFailed as exc:
        print(f"fastlm train: error: {exc}", file=sys.stderr)
        return 1
    if not is_main_process():  # under torchrun rank 0 reports
        return 0
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
