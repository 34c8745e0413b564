"""Per-machine choice among CPU implementations of one operation, timed once and cached on disk.

CPUs differ: oneDNN-prepacked fp32 linears read weights 2x faster than aten's F.linear on one AMD EPYC
and 15% slower on an Intel Xeon with AMX. So a caller offers its candidates (name -> zero-argument
callable running the operation on representative inputs) under a key naming what the choice depends
on (family, dtype, shape, size class); `choose` times them once, keeps the fastest, and remembers it
in memory and in a JSON file per machine, so later processes skip the timing.

- Machine: CPU model + ISA flags + torch version + CANDIDATES_VERSION + a digest of fastlm's C++ kernel
  sources (`machine_description`); the file is named by a hash of it, so another CPU, another torch or
  other candidates (a changed C++ kernel included) get their own file. Thread count belongs in the caller's key.
- File: $FASTLM_CACHE_DIR/cpu_kernels-<hash>.json, else ~/.cache/fastlm/ (XDG_CACHE_HOME honoured);
  written atomically (temporary file + os.replace); an unreadable or malformed file is ignored with a
  warning and rewritten on the next choice. A file that cannot be written only costs re-timing.
- FASTLM_CPU_KERNELS=<name> forces that candidate wherever a family offers it ("auto" or unset: time);
  a name no family knows is a ValueError listing the valid ones. FAMILIES lists each family's names.
- Timing: candidates interleaved round by round (load drift hits all alike), one warm-up round, the
  median of ROUNDS rounds; callers size their inputs so that a round costs a few milliseconds.

A leaf module like _utils.py: it imports nothing from fastlm, so any kernels module (the quantized
linears' CPU paths included) and the runtime can use it.
"""
import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch

ENV_FORCE = "FASTLM_CPU_KERNELS"
ENV_CACHE_DIR = "FASTLM_CACHE_DIR"
ROUNDS = 5
# family -> its candidate names (fastlm/runtime/cpu_linear.py, fastlm/kernels/_quant_cpu.py)
FAMILIES = {"linear": ("aten", "onednn", "gemv"), "int8_linear": ("packed", "dequant", "gemv"),
            "int4_linear": ("packed", "dequant", "gemv"),
            "decode_step": ("eager", "compiled")}  # fastlm/runtime/compiled_step.py
_FORMAT = 1  # version of the file's layout; another version is ignored like a malformed file


def forced_choice(family: str) -> Optional[str]:
    """The candidate FASTLM_CPU_KERNELS forces for family, or None (unset, "auto", or a name of
    another family). ValueError for a name no family offers."""
    value = os.environ.get(ENV_FORCE, "").strip().lower()
    if value in ("", "auto"):
        return None
    known = sorted({name for names in FAMILIES.values() for name in names})
    if value not in known:
        raise ValueError(f"{ENV_FORCE} must be auto or one of {', '.join(known)}, got {value!r}")
    return value if value in FAMILIES.get(family, ()) else None


# fastlm's own kernels: bumped when a candidate changes (a new one, or one that runs differently), so that
# choices timed against the old candidates are not taken (a later step choice compares steps made of them)
CANDIDATES_VERSION = 2  # 2: fastlm's C++ CPU kernels (GEMV candidate, decode attention)


def machine_description() -> dict:
    """What a timed choice depends on besides its own key: CPU model, ISA flags, torch version, and the
    version of fastlm's candidates (CANDIDATES_VERSION and the C++ kernels' sources)."""
    model, flags = _cpuinfo()
    return {"cpu": model or platform.processor() or platform.machine(), "flags": flags,
            "torch": torch.__version__, "candidates": CANDIDATES_VERSION, "native": native_sources_digest()}


NATIVE_SOURCES = Path(__file__).parent / "csrc"  # fastlm's C++ kernels (built by _cpu_ext.py)


@functools.lru_cache(maxsize=None)
def native_sources_digest() -> str:
    """A digest of the C++ kernels' sources: a choice timed against an older build of them is not taken
    (a faster GEMV can win where it lost before)."""
    digest = hashlib.sha256()
    for path in sorted([*NATIVE_SOURCES.glob("*.cpp"), *NATIVE_SOURCES.glob("*.h")]):  # headers: shared helpers
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _cpuinfo():
    """(model name, sorted ISA flags) from /proc/cpuinfo; ("", "") where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", ""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = fields.get("flags") or fields.get("Features") or ""  # x86 / ARM
    return fields.get("model name", ""), " ".join(sorted(flags.split()))


def machine_key(description: Optional[dict] = None) -> str:
    """A short hash naming the machine's cache file."""
    text = json.dumps(description or machine_description(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastlm"


class ChoiceCache:
    """Choices of one machine: in memory, mirrored in one JSON file {"format", "machine", "choices"}."""

    def __init__(self, path: Path, machine: dict):
        self.path, self.machine = Path(path), machine
        self._lock = threading.Lock()
        self._choices = self._read()

    def get(self, key: str) -> Optional[str]:
        return self._choices.get(key)

    def put(self, key: str, name: str) -> None:
        with self._lock:
            self._choices = {**self._read(quiet=True), **self._choices, key: name}  # keep other processes' keys
            self._write()

    def items(self) -> Dict[str, str]:
        return dict(self._choices)

    def _read(self, quiet: bool = False) -> Dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            choices = data["choices"]
            valid = data["format"] == _FORMAT and isinstance(choices, dict) and \
                all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items())
            if not valid:
                raise ValueError("unexpected layout")
            return dict(choices)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not quiet:
                warnings.warn(f"fastlm: ignoring the CPU kernel choice cache {self.path} ({exc}); "
                              "it will be rebuilt", RuntimeWarning, stacklevel=3)
            return {}

    def _write(self) -> None:
        data = {"format": _FORMAT, "machine": self.machine, "choices": self._choices}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home: the choice still holds for this process
            warnings.warn(f"fastlm: could not write the CPU kernel choice cache {self.path} ({exc})",
                          RuntimeWarning, stacklevel=3)


_caches: Dict[Path, ChoiceCache] = {}
_caches_lock = threading.Lock()


def default_cache() -> ChoiceCache:
    """This machine's cache in cache_dir() (one object per file and process)."""
    machine = machine_description()
    path = cache_dir() / f"cpu_kernels-{machine_key(machine)}.json"
    with _caches_lock:
        if path not in _caches:
            _caches[path] = ChoiceCache(path, machine)
        return _caches[path]


def choose(family: str, key: str, candidates: Mapping[str, Callable[[], object]],
           cache: Optional[ChoiceCache] = None, cold: bool = False) -> str:
    """The name of the candidate to use for key (a string naming family, dtype, shape, size class,
    threads): forced by FASTLM_CPU_KERNELS, else cached, else the fastest by time_candidates (cold: see
    there)."""
    if not candidates:
        raise ValueError("candidates must not be empty")
    cache = cache or default_cache()
    settled = settled_choice(family, key, candidates, cache)
    if settled is not None:
        return settled
    if len(candidates) == 1:
        return next(iter(candidates))
    times = time_candidates(candidates, cold=cold)
    best = min(times, key=times.get)
    cache.put(f"{family}|{key}", best)
    return best


def settled_choice(family: str, key: str, candidates, cache: Optional[ChoiceCache] = None) -> Optional[str]:
    """The candidate choose() takes without timing: the one FASTLM_CPU_KERNELS forces, else the cached
    one, if among candidates; None when it would time them."""
    forced = forced_choice(family)
    if forced is not None and forced in candidates:
        return forced
    known = (cache or default_cache()).get(f"{family}|{key}")
    return known if known in candidates else None


def time_candidates(candidates: Mapping[str, Callable[[], object]], rounds: int = ROUNDS,
                    cold: bool = False) -> Dict[str, float]:
    """Median seconds per candidate over `rounds` interleaved rounds, after one warm-up round.

    cold: the caches are flushed before each call (a read of twice the last-level cache), so that a
    candidate reading a weight is timed as a decode step runs it: streaming from memory. Timed on a
    weight left in cache, PyTorch's packed int4 kernel beat fastlm's int4 GEMV, which is 15-25% faster
    in the decode steps themselves (AMD EPYC, GPT-2-124M shapes)."""
    flush = _cache_flusher() if cold else (lambda: None)
    times = {name: [] for name in candidates}
    for round_index in range(rounds + 1):
        for name, fn in candidates.items():
            flush()
            start = time.perf_counter()
            fn()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _cache_flusher() -> Callable[[], object]:
    """A function reading a buffer twice the largest cache's size (at least 64 MiB)."""
    buffer = torch.ones(max(64 << 20, 2 * _largest_cache_bytes()) // 4, dtype=torch.float32)
    return buffer.sum


def _largest_cache_bytes() -> int:
    """The largest CPU cache in sysfs (Linux; 0 elsewhere), e.g. "32768K" -> 33554432."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return max(sizes)
