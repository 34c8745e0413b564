"""TrainOptions: every knob of `fastlm train` / `fastlm.train(...)`, validated in one place."""
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch

from fastlm.model.devices import resolve_device
from fastlm.model.validation import check_choice, check_int, check_number, check_seed

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainOptions:
    data: Union[str, Path]  # training text file
    out: Union[str, Path]  # output folder: final model, checkpoint-N/ folders, log.jsonl
    eval: Optional[Union[str, Path]] = None  # evaluation text file (periodic + final eval)
    model: Optional[Union[str, Path]] = None  # HF checkpoint folder to fine-tune (default: the embedded model)
    config: Optional[str] = None  # preset name to train from scratch (see fastlm.training.configs)
    tokenizer: Optional[Union[str, Path]] = None  # tokenizer folder; from scratch without it a BPE is trained
    vocab_size: int = 4096  # size of the BPE trained from scratch
    block_size: int = 128  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: Optional[int] = None  # optimizer steps; None -> `epochs` passes over the data
    epochs: Optional[float] = None  # passes over the data when steps is None (default 1)
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to min_lr_ratio * lr
    warmup: Optional[int] = None  # warmup steps; None -> min(100, steps // 10)
    weight_decay: float = 0.1  # AdamW decay on matrices (never on norms, biases, embeddings)
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 0  # evaluate every N steps (0: only at the end)
    eval_batch_size: Optional[int] = None  # None -> batch_size
    save_every: int = 0  # checkpoint every N steps (0: only the final save)
    keep_checkpoints: int = 2  # most recent checkpoint-N folders kept
    resume: Union[bool, str, Path] = False  # True: latest checkpoint in `out`; or a checkpoint folder
    seed: int = 0  # model init and data order
    device: Optional[str] = None  # None -> cuda when available, else cpu
    precision: str = "auto"  # auto: bf16 autocast on CUDA GPUs that support it, fp32 elsewhere
    progress: bool = True  # tqdm progress bar with loss, lr and tokens/s
    log_every: int = 10  # steps between progress/log updates (each one syncs the device)
    overwrite: bool = False  # replace the contents of a non-empty `out` that holds no run to resume

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
