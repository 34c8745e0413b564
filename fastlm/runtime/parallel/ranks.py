"""The ranks of a tensor-parallel LLM: options, the process group, and each rank's shard of the model.

Three ways the ranks come to exist (launch_mode):
- "spawn": LLM(path, tensor_parallel_size=N) in a plain process. It becomes rank 0 and starts ranks
  1..N-1 on this machine as `python -m fastlm.runtime.parallel.worker` subprocesses (not
  multiprocessing: no `if __name__ == "__main__"` guard needed in the caller's script), meeting them
  at a TCP store on a free loopback port.
- "torchrun": WORLD_SIZE = N set by torchrun; every rank runs the caller's script and joins with env://.
- "existing": the caller already initialized the default process group; it is used as it is.
Then every rank loads only its slices of the checkpoint (fastlm.model.parallel_loading) and the ranks
agree on the KV pool: the fewest blocks any rank can hold, so that rank 0's block tables are valid on all.
"""
import json
import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from fastlm.model.collectives import RankFailed, collective_errors
from fastlm.model.config import ModelConfig
from fastlm.model.loading import resolve_dtype
from fastlm.model.parallel import check_splittable
from fastlm.model.quantize import read_quant_config
from fastlm.model.validation import check_int, check_number
from fastlm.runtime.cpu_threads import physical_cores

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class ParallelOptions:
    """What every rank needs to build its part (sent to spawned ranks as JSON)."""
    path: str  # the checkpoint folder
    world_size: int  # tensor_parallel_size
    dtype: Optional[str] = None  # "float32" / "float16" / "bfloat16"; None: the checkpoint's
    device: str = "cpu"  # "cpu" or "cuda" (rank r on its own GPU: cuda:r, under torchrun cuda:LOCAL_RANK)
    threads: Optional[int] = None  # CPU threads per rank; None: physical cores / ranks on this machine
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long a rank waits for the others before failing
    block_size: int = 16  # the engine's KV pool, sized alike on every rank (see agree_on_pool)
    kv_cache_memory: Optional[int] = None  # bytes per rank
    max_num_seqs: int = 64
    gpu_memory_utilization: float = 0.9

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ParallelOptions":
        return cls(**json.loads(text))


def check_options(o: ParallelOptions) -> None:
    """ValueError naming the argument for anything that would fail on a rank, before any rank starts."""
    check_int("tensor_parallel_size", o.world_size, 2)
    check_number("dist_timeout", o.timeout_s, 0, min_open=True)
    check_int("threads_per_rank", o.threads, 1, optional=True)
    resolve_dtype(o.dtype)
    if o.device not in ("cpu", "cuda"):
        raise ValueError(f"with tensor_parallel_size > 1, device must be 'cpu' or 'cuda' (rank r uses cuda:r, "
                         f"under torchrun cuda:LOCAL_RANK), got {o.device!r}")
    if o.device == "cuda" and launch_mode() == "spawn" and o.world_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size ({o.world_size}) must be at most the number of GPUs "
                         f"({torch.cuda.device_count()})")
    check_splittable(ModelConfig.from_hf(o.path), o.world_size)
    if read_quant_config(o.path) is not None:
        raise ValueError(f"tensor parallelism loads float checkpoints; {o.path} is quantized "
                         "(load its float original, or use one process)")


def launch_mode() -> str:
    """'existing' (a default process group is up), 'torchrun' (WORLD_SIZE > 1) or 'spawn'."""
    if dist.is_available() and dist.is_initialized():
        return "existing"
    return "torchrun" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "spawn"


def torchrun_rank() -> int:
    """This process's rank under torchrun (WORLD_SIZE > 1), else 0."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def check_world(o: ParallelOptions, mode: str) -> Tuple[int, int]:
    """(rank, local rank) of this process under torchrun or an existing group; ValueError when the
    launcher started another number of ranks than tensor_parallel_size."""
    world = dist.get_world_size() if mode == "existing" else int(os.environ["WORLD_SIZE"])
    if world != o.world_size:
        raise ValueError(f"tensor_parallel_size ({o.world_size}) must equal the number of ranks started "
                         f"(WORLD_SIZE={world})")
    rank = dist.get_rank() if mode == "existing" else int(os.environ.get("RANK", "0"))
    return rank, int(os.environ.get("LOCAL_RANK", str(rank)))


def backend_options(device: torch.device) -> dict:
    """init_process_group's backend (NCCL on GPUs, gloo on CPU) and device binding."""
    if device.type == "cuda":
        return {"backend": "nccl", "device_id": device}
    return {"backend": "gloo"}


def rank_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def default_threads(ranks_on_this_machine: int) -> int:
    return max(1, physical_cores() // ranks_on_this_machine)


def init_from_env(o: ParallelOptions, device: torch.device) -> None:
    """Join torchrun's rendezvous (env://)."""
    dist.init_process_group(rank=int(os.environ["RANK"]), world_size=o.world_size,
                            timeout=timedelta(seconds=o.timeout_s), **backend_options(device))


class ShardLoadFailed(RankFailed):
    """Some rank could not load its shard; every rank raises this with that rank's error."""


def load_shard(o: ParallelOptions, rank: int, device: torch.device):
    """This rank's model (oneDNN-packed linears on CPU) and the pool size every rank agreed on, in
    blocks. When a rank fails to load, rank 0 raises its own error or ShardLoadFailed with the first
    failing rank's, and the other ranks raise ShardLoadFailed."""
    from fastlm.model.parallel_loading import load_tensor_parallel
    from fastlm.runtime.cpu_linear import pack_linears, packing_available
    from fastlm.runtime.engine.kv_pool import pool_blocks

    model, error, blocks = None, None, 0
    try:
        model = load_tensor_parallel(o.path, rank=rank, world_size=o.world_size, dtype=o.dtype, device=device)
        if packing_available(model.dtype, model.device):
            pack_linears(model)
        blocks = pool_blocks(model, o.block_size, o.kv_cache_memory, o.max_num_seqs, o.gpu_memory_utilization)
    except Exception as exc:  # noqa: BLE001 - every rank learns about it below, then raises
        error = exc
    reports = [None] * o.world_size
    with collective_errors("the other ranks to load their shards"):
        dist.all_gather_object(reports, (None if error is None else (type(error).__name__, str(error)), blocks))
    if error is not None and rank == 0:
        raise error
    failed = [(r, report[0]) for r, report in enumerate(reports) if report[0] is not None]
    if failed:  # rank 0 reports it; the others stop with it
        r, (kind, message) = failed[0]
        raise ShardLoadFailed(f"tensor-parallel rank {r} could not load its shard: {kind}: {message}")
    return model, min(report[1] for report in reports)

