"""Data-parallel training on torch.distributed: one process per device, started by torchrun.

`torchrun --nproc-per-node N -m fastlm train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `Distributed.from_env` joins the process group (gloo on CPU, NCCL on CUDA, with a timeout
so that a dead rank ends the others with an error instead of a hang). Without those variables it is a
single process and every method below is a no-op.

Rules the trainer follows with it:
- the global batch (--batch-size) is split into N equal row blocks, rank r taking block r, and DDP
  averages the gradients: the update is that of one process on the whole batch;
- only rank 0 touches --out (creates it, trains the tokenizer, writes logs and checkpoints, publishes
  the model); `on_main` runs such work on rank 0 and hands its result or its error to every rank;
- decisions that end the loop (a signal, a non-finite loss) are reduced over the ranks, so all ranks
  stop at the same step.
"""
import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fastlm.model.collectives import RankFailed, collective_errors  # noqa: F401 - RankFailed: re-exported

DEFAULT_TIMEOUT_S = 300.0
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process (who prints the run's summary)."""
    return int(os.environ.get("RANK", "0")) == 0


class Distributed:
    def __init__(self, rank=0, world_size=1, device=torch.device("cpu")):
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> "Distributed":
        """Join torchrun's process group when launched by it (WORLD_SIZE > 1), else a single process."""
        if not launched_by_torchrun():
            return cls(device=device)
        missing = [v for v in ENV_VARS if v not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: start distributed runs with torchrun")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            index = int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs)
        return cls(rank, world, device)

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # --- work done by rank 0 only ------------------------------------------------------------------
    def on_main(self, fn, *args):
        """fn(*args) on rank 0; every rank returns its result (picklable) or raises its error (as
        ValueError with the same message when fn raised one, else RankFailed). Also a barrier."""
        if not self.enabled:
            return fn(*args)
        outcome = [None]
        if self.is_main:
            try:
                outcome[0] = ("ok", fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the other ranks, then raised here too
                outcome[0] = ("error", exc)
                self._broadcast(outcome)
                raise
        self._broadcast(outcome)
        status, value = outcome[0]
        if status == "error":
            if isinstance(value, (ValueError, FileNotFoundError)):
                raise type(value)(str(value)) from None
            raise RankFailed(f"rank 0 failed: {type(value).__name__}: {value}") from None
        return value

    def main_first(self, fn, *args):
        """fn(*args) on rank 0, then (if it succeeded) on the other ranks: rank 0 creates shared files
        (a tokenizer trained on the data) that the others then read."""
        result = self.on_main(fn, *args)
        return result if self.is_main else fn(*args)

    def _broadcast(self, objects):
        with collective_errors("rank 0's result"):
            dist.broadcast_object_list(objects, src=0)

    # --- collectives over small values ---------------------------------------------------------------
    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (equal blocks: batch_size is a multiple of world_size)."""
        if not self.enabled:
            return batch
        rows = batch.size(0) // self.world_size
        return batch[self.rank * rows:(self.rank + 1) * rows]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self._reduce(value.clone(), dist.ReduceOp.SUM) / self.world_size if self.enabled else value

    def max(self, value: torch.Tensor) -> torch.Tensor:
        return self._reduce(value.clone(), dist.ReduceOp.MAX) if self.enabled else value

    def max_int(self, value: int) -> int:
        if not self.enabled:
            return value
        return int(self._reduce(torch.tensor(value, dtype=torch.long, device=self.device), dist.ReduceOp.MAX))

    def _reduce(self, tensor, op):
        with collective_errors("a reduction"):
            dist.all_reduce(tensor, op=op)
        return tensor

    # --- the model -----------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, fsdp: bool) -> torch.nn.Module:
        """The module to train: DDP (or FSDP2 with fsdp=True) over the ranks; the model itself alone."""
        if fsdp:
            from fastlm.training.fsdp import shard_model

            return shard_model(model)
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def guard(self, what):
        """collective_errors(what) in a distributed run (a step's gradient exchange); nothing alone."""
        return collective_errors(what) if self.enabled else contextlib.nullcontext()

    @staticmethod
    def no_sync(train_model, last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if last_micro_batch or not hasattr(train_model, "no_sync"):
            return contextlib.nullcontext()
        return train_model.no_sync()
