"""The output folder (--out) of a training run: checked before training, owned by one run, and the
final model published atomically, with write access needed only inside the folder.

    out/config.json, model.safetensors, tokenizer.json, ...   symlinks: .fastlm/current/<file>
    out/.fastlm/current -> model-<n>                            one symlink, so one rename switches them all
    out/.fastlm/model-<n>/                                      the final model's files
    out/.fastlm/tokenizer/                                      a BPE trained from scratch for this run
    out/checkpoint-<step>/                                      resumable checkpoints (optimizer.pt inside)
    out/log.jsonl

A kill at any moment of the final save leaves `out` holding the old complete model or the new one: the
new files are written (and synced) in a folder of their own, then the `current` link is replaced in one
os.replace. Where symlinks are unavailable the files are moved in one by one instead (not atomic).
"""
import os
import shutil
from pathlib import Path

STORE = ".fastlm"  # private folder inside --out
CURRENT = "current"
VERSION_PREFIX = "model-"
RUN_MARKERS = (STORE, "log.jsonl")  # a folder holding any of these (or checkpoint-N) is a training run's


def prepare_out(out, *, resume, overwrite) -> Path:
    """Create and check --out before any training: a usable, writable folder that is empty, this run's
    (resume) or given up with overwrite. ValueError (one line) otherwise."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {out} is not writable")
    entries = sorted(p.name for p in out.iterdir())
    if entries and overwrite:
        for name in entries:
            _remove(out / name)
    elif entries and not (resume and is_run_folder(out)):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"the output folder {out} is not empty ({shown}) and holds no run to resume; "
                         f"choose an empty or new folder, or pass overwrite (--overwrite) to replace its contents")
    return out


def is_run_folder(out: Path) -> bool:
    return any((out / m).exists() for m in RUN_MARKERS) or any(out.glob("checkpoint-*"))


def private_folder(out, name) -> Path:
    """A folder inside out/.fastlm for this run's own files (e.g. the tokenizer trained from scratch)."""
    folder = Path(out) / STORE / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish_model(out, write_files) -> None:
    """Write a model with write_files(folder) and make it out's model in one atomic switch."""
    store = Path(out) / STORE
    store.mkdir(parents=True, exist_ok=True)
    version = store / f"{VERSION_PREFIX}{_next_number(store)}"
    staging = version.with_name(version.name + ".partial")
    _remove(staging)
    staging.mkdir()
    write_files(staging)
    _sync_folder(staging)
    os.replace(staging, version)
    try:
        _switch_link(store / CURRENT, version.name)
        for name in sorted(os.listdir(version)):
            _ensure_link(Path(out) / name, f"{STORE}/{CURRENT}/{name}")
    except (OSError, NotImplementedError) as exc:
        if not _no_symlinks(exc):
            raise
        for item in sorted(version.iterdir()):  # no symlinks here: move the files in (not atomic)
            os.replace(item, Path(out) / item.name)
    for old in store.glob(VERSION_PREFIX + "*"):
        if old.name != version.name:
            _remove(old)


def _next_number(store: Path) -> int:
    numbers = [int(p.name[len(VERSION_PREFIX):].split(".")[0]) for p in store.glob(VERSION_PREFIX + "*")
               if p.name[len(VERSION_PREFIX):].split(".")[0].isdigit()]
    return max(numbers, default=0) + 1


def _switch_link(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".new")
    _remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: readers see the old target or the new one


def _ensure_link(path: Path, target: str) -> None:
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.with_name(path.name + ".fastlm-link")
    _remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _no_symlinks(exc) -> bool:
    return isinstance(exc, NotImplementedError) or getattr(exc, "winerror", None) == 1314


def _sync_folder(folder: Path) -> None:
    """Flush the files to disk, so a power cut after the switch cannot leave the new model half-written."""
    for item in folder.iterdir():
        with open(item, "rb") as f:
            os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
