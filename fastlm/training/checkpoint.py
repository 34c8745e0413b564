"""Checkpoints in Hugging Face format plus what resuming needs.

A checkpoint folder holds config.json + model.safetensors (model.save_pretrained), tokenizer.json +
tokenizer_config.json (tokenizer.save), generation_config.json, trainer_state.json (step, schedule, data
order, eval history) and, in checkpoint-N folders, optimizer.pt (AdamW moments). It is written under a
temporary name and renamed, so an interrupted save never leaves a half-written checkpoint behind (the
final model in --out is published by fastlm.training.output).
"""
import json
import shutil
from pathlib import Path

import torch

from fastlm.model.json_files import eos_id_entry

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_PREFIX = "checkpoint-"


def save_model_folder(folder, model, tokenizer, state, optimizer=None):
    """Write a complete checkpoint into `folder` (a checkpoint-N folder inside --out): written under
    a temporary name beside it and renamed, so an interrupted save leaves no half-written checkpoint."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model_files(tmp, model, tokenizer, state, optimizer)
    if folder.is_dir():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def write_model_files(folder, model, tokenizer, state, optimizer=None):
    """The files of a checkpoint (see the module docstring) into an existing folder."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    _write_generation_config(folder, model.config, tokenizer)
    if optimizer is not None:  # an optimizer or its state_dict()
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _write_generation_config(folder, config, tokenizer):
    path = Path(folder) / "generation_config.json"
    if path.exists():  # save_pretrained may have written one
        return
    eos = eos_id_entry(tokenizer.eos_token_ids)
    data = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": config.eos_token_id if eos is None else eos}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def checkpoint_folder(out_dir, step):
    return Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(out_dir):
    """Complete checkpoint-N folders of a run, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_resume_checkpoint(out_dir, resume):
    """The folder to resume from: the latest checkpoint-N in out_dir (resume=True) or the given folder."""
    if resume is True:
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"resume: no checkpoint-N folder with {STATE_FILE} in {out_dir}")
        return found[-1]
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"resume: checkpoint folder not found: {folder}")
    for name in (STATE_FILE, OPTIMIZER_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"resume: {folder} is not a training checkpoint (no {name})")
    return folder


def read_state(folder):
    path = Path(folder) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def load_optimizer_state(folder, optimizer, device, loader=None):
    """The AdamW state of a checkpoint; ValueError (one line) when optimizer.pt is damaged or foreign.
    weights_only: a malicious file cannot run code. loader: an object whose load(state) puts it into
    the optimizer (FSDP shards it), default optimizer.load_state_dict."""
    path = Path(folder) / OPTIMIZER_FILE
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        (loader.load if loader is not None else optimizer.load_state_dict)(state)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refused by weights_only, wrong shapes...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"resume: cannot load the optimizer state {path}: {reason}") from None


def prune_checkpoints(out_dir, keep):
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# Options that define a run: a resumed run must not be given other values (the schedule and data order
# are taken from the checkpoint; options left at their defaults are not compared).
RUN_OPTIONS = ("data", "model", "config", "tokenizer", "vocab_size", "steps", "epochs", "warmup", "lr",
               "min_lr_ratio", "batch_size", "grad_accum", "block_size", "seed", "weight_decay", "clip")
PATH_OPTIONS = ("data", "model", "tokenizer")


def check_same_run(folder, state, opts):
    """ValueError listing the options that differ from the run saved in `folder`'s trainer_state.json."""
    from dataclasses import fields

    saved = state.get("options")
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {Path(folder) / STATE_FILE} has no run options; it is not a fastlm training run")
    defaults = {f.name: f.default for f in fields(opts)}
    differ = []
    for name in RUN_OPTIONS:
        now, then = getattr(opts, name), saved.get(name)
        if now == defaults[name] or _same_value(name, now, then):
            continue
        differ.append(f"{name} {then!r} (now {now!r})" if name not in PATH_OPTIONS else f"{name} {then} (now {now})")
    if differ:
        raise ValueError(f"resume: {folder} belongs to a run with other settings: {'; '.join(differ)}; "
                         "give the run's settings (or leave them out) or train into a new --out")


def _same_value(name, now, then):
    if name in PATH_OPTIONS:
        return then is not None and Path(now).absolute() == Path(then).absolute()
    return now == then
