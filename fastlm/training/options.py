"""TrainOptions: every knob of `fastlm train` / `fastlm.train(...)`, validated in one place."""
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch

from fastlm.model.devices import resolve_device
from fastlm.model.validation import check_choice, check_int, check_number, check_seed

PRECISIONS = ("auto", "fp32", "bf16")


def _option(default=MISSING, help="", **cli):
    """A TrainOptions field; `help` and `cli` (argparse keywords: type, flag, group, ...) make its
    `fastlm train` argument (fastlm.training.commands builds the parser from these)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainOptions:
    data: Union[str, Path] = _option(help="training text file")
    out: Union[str, Path] = _option(help="output folder: final model, checkpoint-N/ folders, log.jsonl "
                                         "(must be empty or new, unless resuming or --overwrite)")
    eval: Optional[Union[str, Path]] = _option(None, "evaluation text file (perplexity every --eval-every steps "
                                                     "and at the end)")
    model: Optional[Union[str, Path]] = _option(None, "checkpoint folder to fine-tune (default: the embedded "
                                                      "model)", group="source")
    config: Optional[str] = _option(None, "preset to train from scratch (see fastlm.training.configs)",
                                    group="source")
    tokenizer: Optional[Union[str, Path]] = _option(None, "tokenizer folder (default: the model's; from scratch: "
                                                          "a BPE trained on --data)")
    vocab_size: int = _option(4096, "vocabulary of the BPE trained from scratch")
    block_size: int = _option(128, "tokens per sequence")
    batch_size: int = _option(8, "sequences per micro-batch")
    grad_accum: int = _option(1, "micro-batches per optimizer step")
    steps: Optional[int] = _option(None, "optimizer steps", type=int, group="length")
    epochs: Optional[float] = _option(None, "passes over the data (default 1 when --steps is absent)", type=float,
                                      group="length")
    lr: float = _option(3e-4, "peak learning rate")
    min_lr_ratio: float = _option(0.1, "the cosine decays to min_lr_ratio * lr")
    warmup: Optional[int] = _option(None, "linear warmup steps (default min(100, steps/10))", type=int)
    weight_decay: float = _option(0.1, "AdamW weight decay on matrices (never on norms, biases, embeddings)")
    clip: float = _option(1.0, "max global gradient norm; 0 disables clipping")
    eval_every: int = _option(0, "steps between evaluations (0: only at the end)")
    eval_batch_size: Optional[int] = _option(None, "evaluation batch size (default: --batch-size)", type=int)
    save_every: int = _option(0, "steps between checkpoints (0: only the final save)")
    keep_checkpoints: int = _option(2, "checkpoint-N folders kept")
    resume: Union[bool, str, Path] = _option(
        False, "continue from the latest checkpoint in --out, or from the given checkpoint folder; the schedule, "
               "batch shape, seed and data order come from the checkpoint", nargs="?", const=True, metavar="CHECKPOINT")
    seed: int = _option(0, "model init and data order")
    device: Optional[str] = _option(None, "cpu, cuda, cuda:1... (default: cuda when available)")
    precision: str = _option("auto", "auto: bf16 autocast on CUDA GPUs that support it, fp32 elsewhere",
                             choices=PRECISIONS)
    progress: bool = _option(True, "no progress bar", flag="--no-progress")
    log_every: int = _option(10, "steps between progress/log updates (each one syncs the device)")
    overwrite: bool = _option(False, "replace the contents of a non-empty --out that holds no run to resume")
    fsdp: bool = _option(False, "under torchrun: shard weights, gradients and optimizer state across the ranks "
                                "(FSDP2) instead of replicating them (DDP)")
    dist_timeout: float = _option(300.0, "under torchrun: seconds a rank waits for the others before failing")

    def __post_init__(self):
        for name in ("data", "out"):
            if not isinstance(getattr(self, name), (str, Path)) or not str(getattr(self, name)):
                raise ValueError(f"{name} must be a path, got {getattr(self, name)!r}")
        if self.model is not None and self.config is not None:
            raise ValueError("give either model (a checkpoint to fine-tune) or config (a preset to train from "
                             "scratch), not both")
        if self.config is not None:
            from fastlm.training.configs import PRESETS, preset_names

            if self.config not in PRESETS:
                raise ValueError(f"unknown config name {self.config!r}; known configs: {', '.join(preset_names())}")
        check_int("block_size", self.block_size, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum", self.grad_accum, 1)
        check_int("vocab_size", self.vocab_size, 257)
        check_int("steps", self.steps, 1, optional=True)
        check_int("warmup", self.warmup, 0, optional=True)
        check_int("eval_every", self.eval_every, 0)
        check_int("eval_batch_size", self.eval_batch_size, 1, optional=True)
        check_int("save_every", self.save_every, 0)
        check_int("keep_checkpoints", self.keep_checkpoints, 1)
        check_seed("seed", self.seed)
        check_int("log_every", self.log_every, 1)
        check_number("lr", self.lr, 0.0, min_open=True)
        check_number("epochs", self.epochs, 0.0, min_open=True, optional=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_number("clip", self.clip, 0.0)
        check_number("dist_timeout", self.dist_timeout, 0.0, min_open=True)
        check_choice("precision", self.precision, PRECISIONS)
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        self.device = resolve_device(self.device)

    @classmethod
    def from_kwargs(cls, **kwargs):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def to_dict(self):
        return {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in asdict(self).items()}


def autocast_dtype(device, precision):
    """The autocast dtype of a run, or None for plain fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
