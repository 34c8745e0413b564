"""CPU threads for torch: by default one per physical core available to this process.

Hyper-threads share a core's load/store units, and a decode step is bound by reading weights, so a
second thread per core only adds synchronization. torch's own default varies with the build and the
OpenMP runtime (and counts logical CPUs in some containers), so the command line sets it explicitly.
"""
import os
import threading
from pathlib import Path

import torch

from fastlm.model.validation import check_int


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (Linux: /proc/cpuinfo's (physical id,
    core id) pairs of the allowed CPUs); the count of allowed CPUs where that is unknown."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return len(allowed)
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" in fields and int(fields["processor"]) in allowed:
            if "core id" not in fields:
                return len(allowed)  # not reported (ARM, some VMs): count logical CPUs
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return max(1, len(cores) or len(allowed))


def set_threads(threads=None) -> int:
    """torch's intra-op threads: `threads` (an int >= 1) or, for None, physical_cores(); returns it."""
    if threads is None:
        threads = physical_cores()
    check_int("threads", threads, 1)
    torch.set_num_threads(threads)
    return threads


def on_passing_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) computed on a new thread that ends with it (its exception re-raised here).

    Why: libgomp (PyTorch's OpenMP on Linux) keeps a pool of worker threads for every thread that ran a
    parallel region. An LLM's engine runs on its own thread; if the thread that loaded the model keeps
    its pool too, libgomp manages more threads than there are CPUs and stops letting idle workers spin,
    so each of a decode step's ~150 parallel regions wakes them from sleep: measured 10.2 instead of
    7.0 ms per token (GPT-2-124M bf16, 2 cores). A thread that ends frees its pool. (Torch work on other
    threads while an LLM generates costs the same way.)"""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = exc
    thread = threading.Thread(target=run, name="fastlm-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
