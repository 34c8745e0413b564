"""Read access to the weight files of a HF checkpoint folder, one tensor at a time.

Formats, in order of preference: model.safetensors, model.safetensors.index.json (sharded),
pytorch_model.bin, pytorch_model.bin.index.json. safetensors files are memory-mapped and only their
headers are read until a tensor is requested; .bin files go through torch.load(weights_only=True,
mmap=True). Every failure names the file."""
import json
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_SAFETENSORS, SHARDED_SAFETENSORS = "model.safetensors", "model.safetensors.index.json"
SINGLE_BIN, SHARDED_BIN = "pytorch_model.bin", "pytorch_model.bin.index.json"


class CheckpointFiles:
    def __init__(self, folder: Path, name_to_file: dict):
        self.folder, self._name_to_file, self._open = folder, name_to_file, {}

    @property
    def names(self):
        return list(self._name_to_file)

    def file_of(self, name) -> Path:
        return self._name_to_file[name]

    def describe(self) -> str:
        files = sorted({p.name for p in self._name_to_file.values()})
        return f"{self.folder} ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"

    def _handle(self, path: Path):
        if path not in self._open:
            self._open[path] = _open_file(path)
        return self._open[path]

    def shape(self, name):
        handle = self._handle(self.file_of(name))
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def get(self, name, device):
        path = self.file_of(name)
        handle = self._handle(path)
        try:
            tensor = handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
        except Exception as e:  # safetensors reports truncated/corrupt data at read time
            raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from None
        return tensor.to(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._open.clear()  # drops the mmaps
        return False


def open_checkpoint(folder: Path) -> CheckpointFiles:
    """Find the weight files of a checkpoint folder and index which file holds each tensor."""
    for index_name, single_name in ((SHARDED_SAFETENSORS, SINGLE_SAFETENSORS), (SHARDED_BIN, SINGLE_BIN)):
        single, index = folder / single_name, folder / index_name
        if single.is_file():
            handle = _open_file(single)
            names = list(handle.keys())
            files = CheckpointFiles(folder, {n: single for n in names})
            files._open[single] = handle
            return files
        if index.is_file():
            return CheckpointFiles(folder, _read_index(index))
    raise FileNotFoundError(f"no weights in {folder}: expected {SINGLE_SAFETENSORS}, {SHARDED_SAFETENSORS}, "
                            f"{SINGLE_BIN} or {SHARDED_BIN}")


def _read_index(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid checkpoint index ({type(e).__name__}: {e})") from None
    out = {}
    for name, file in weight_map.items():
        path = index.parent / file
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {index} (for tensor {name!r}) not found")
        out[name] = path
    return out


def _open_file(path: Path):
    if path.suffix == ".safetensors":
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError: header unreadable, file truncated
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) .bin files cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return state
