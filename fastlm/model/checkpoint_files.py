"""Read access to the weight files of a HF checkpoint folder, one tensor at a time.

Formats, in order of preference: model.safetensors, model.safetensors.index.json (sharded),
pytorch_model.bin, pytorch_model.bin.index.json. Of a safetensors file only the header is read until a
tensor is requested; then its bytes are read straight into a fresh tensor (no mmap: the loaded model
owns its memory, never aliases the file, and file pages are not charged to the process while loading).
.bin files go through torch.load(weights_only=True, mmap=True) and each tensor is copied out.
Every failure names the file."""
import json
import math
import struct
from pathlib import Path

import torch

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
        return tuple(handle[name].shape) if isinstance(handle, dict) else handle.shape(name)

    def dtype(self, name) -> torch.dtype:
        handle = self._handle(self.file_of(name))
        return handle[name].dtype if isinstance(handle, dict) else handle.entries[name][0]

    def copy_into(self, name, out: torch.Tensor, transpose=False):
        """Copy tensor `name` (transposed if asked) into out, converting dtype/device as out requires."""
        handle = self._handle(self.file_of(name))
        if isinstance(handle, dict):
            out.copy_(handle[name].t() if transpose else handle[name])
        else:
            handle.copy_into(name, out, transpose)

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
        return SafetensorsFile(path)
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class SafetensorsFile:
    """Header of a .safetensors file (validated against the file size), and tensor reads by offset.
    Format: u64 little-endian header size N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"{path} is not a valid safetensors file: header size {n} for a {size}-byte file")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not a valid safetensors file: header is not JSON ({e})") from None
        self.data_start, self.entries, self._scratch = 8 + n, {}, None
        for name, entry in header.items():
            if name != "__metadata__":
                self.entries[name] = self._check_entry(name, entry, size - self.data_start)

    def _check_entry(self, name, entry, data_size):
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.path}: tensor {name!r} has an unsupported or malformed header entry {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not (0 <= begin <= end <= data_size and end - begin == nbytes):
            raise ValueError(f"{self.path}: tensor {name!r} ({entry['dtype']} {list(shape)}) has data offsets "
                             f"[{begin}, {end}) outside the file's {data_size} data bytes or of the wrong size "
                             f"(file truncated or corrupt)")
        return dtype, shape, begin, nbytes

    def keys(self):
        return list(self.entries)

    def shape(self, name):
        return self.entries[name][1]

    def copy_into(self, name, out: torch.Tensor, transpose=False):
        """Read the bytes straight into out when layouts agree, else through one reused scratch buffer
        (no per-tensor temporaries for the allocator to fragment)."""
        dtype, shape, begin, nbytes = self.entries[name]
        direct = not transpose and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        if direct:
            self._read(name, out.reshape(-1).view(torch.uint8), begin, nbytes)
            return
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        src = self._scratch[:nbytes]
        self._read(name, src, begin, nbytes)
        src = src.view(dtype).reshape(shape)
        out.copy_(src.t() if transpose else src)

    def _read(self, name, buffer, begin, nbytes):
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(buffer.numpy())) if nbytes else 0
        if got != nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
