"""Checkpoints in Hugging Face format plus what resuming needs.

A checkpoint folder holds config.json + model.safetensors (model.save_pretrained), tokenizer.json +
tokenizer_config.json (tokenizer.save), generation_config.json, trainer_state.json (step, schedule, data
order, eval history) and, in checkpoint-N folders, optimizer.pt (AdamW moments). It is written under a
temporary name and renamed, so an interrupted save never leaves a half-written checkpoint behind.
"""
import json
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_PREFIX = "checkpoint-"


def save_model_folder(folder, model, tokenizer, state, optimizer=None):
    """Write a complete checkpoint into `folder` (replaced atomically if it exists)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save(tmp)
    _write_generation_config(tmp, model.config, tokenizer)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    if folder.is_dir():
        _replace_contents(tmp, folder)
    else:
        tmp.rename(folder)
    return folder


def _replace_contents(src, dst):
    """Move src's files into dst (the output folder may also hold checkpoints and logs: keep those)."""
    for item in src.iterdir():
        target = dst / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    src.rmdir()


def _write_generation_config(folder, config, tokenizer):
    path = Path(folder) / "generation_config.json"
    if path.exists():  # save_pretrained may have written one
        return
    eos = tokenizer.eos_token_ids[0] if len(tokenizer.eos_token_ids) == 1 else list(tokenizer.eos_token_ids)
    data = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos or config.eos_token_id}
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


def load_optimizer_state(folder, optimizer, device):
    state = torch.load(Path(folder) / OPTIMIZER_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state)


def prune_checkpoints(out_dir, keep):
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
