"""The ranks other than 0 of a tensor-parallel engine: receive each step from rank 0 and run it.

    python -m fastlm.runtime.parallel     # a rank spawned by rank 0: main(), its settings in the environment

A rank holds its shard of the model and its own KV pool (its KV heads, as many blocks as rank 0's); it
has no scheduler, sampler or tokenizer: rank 0's block tables say where each token's K/V go, and the
forward's all-reduces and the logits' gather pair with rank 0's. A spawned rank also ends when its
parent (rank 0) is gone, without waiting for the timeout.
"""
import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from fastlm.model.collectives import RankFailed, collective_errors
from fastlm.runtime.parallel.messages import COPY, PING, STEP, STOP, Channel, decode_copies, decode_step
from fastlm.runtime.parallel.ranks import (ParallelOptions, ShardLoadFailed, backend_options, load_shard,
                                           rank_device)

ENV_OPTIONS = "FASTLM_TP_OPTIONS"  # a spawned rank's ParallelOptions, JSON
ENV_PARENT = "FASTLM_TP_PARENT_PID"  # rank 0's pid
JOINED_KEY = "fastlm_tp_joined"  # counter in rank 0's TCP store: spawned ranks that reached it


def run_rank(o: ParallelOptions, rank: int, device: torch.device, owns_process_group: bool = True) -> None:
    """Load this rank's shard, then run rank 0's steps until it stops (the process group is up)."""
    from fastlm.runtime.engine.kv_pool import KVPool, bytes_per_token

    model, num_blocks = load_shard(o, rank, device)
    pool = KVPool(model, o.block_size, num_blocks * o.block_size * bytes_per_token(model))
    serve_steps(model, pool, Channel(device))
    with collective_errors("the other ranks to stop"):
        dist.barrier()  # every rank is done with gloo before any tears it down
    if owns_process_group:
        dist.destroy_process_group()


@torch.inference_mode()
def serve_steps(model, pool, channel: Channel) -> None:
    while True:
        with collective_errors("rank 0's next step"):
            kind, sizes, payload = channel.receive()
        if kind == STOP:
            return
        if kind == COPY:
            pool.copy_blocks(decode_copies(sizes, payload))
        elif kind == STEP:
            input_ids, meta = decode_step(sizes, payload, pool.k, pool.v)
            with collective_errors("a step's all-reduce"):
                model(input_ids, metadata=meta)
        elif kind != PING:
            raise RankFailed(f"unknown message kind {kind} from rank 0")


def main() -> int:
    """A spawned rank: join rank 0's store and process group, then run_rank; -> the exit code."""
    o = ParallelOptions.from_json(os.environ[ENV_OPTIONS])
    rank = int(os.environ["RANK"])
    _exit_with_parent(rank, int(os.environ[ENV_PARENT]))

    def join_and_run():
        if o.threads is not None:
            torch.set_num_threads(o.threads)
        device = rank_device(o.device, rank)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), o.world_size,
                              is_master=False, timeout=timedelta(seconds=o.timeout_s))
        store.add(JOINED_KEY, 1)
        dist.init_process_group(store=store, rank=rank, world_size=o.world_size,
                                timeout=timedelta(seconds=o.timeout_s), **backend_options(device))
        run_rank(o, rank, device)
    return exit_code(rank, join_and_run)


def exit_code(rank: int, run) -> int:
    """run() as a rank's exit code: 0 when rank 0 closed; 1 with one line on stderr when a rank failed
    (quietly when rank 0 reports it: a shard that did not load); 130 on Ctrl-C (rank 0 reports it)."""
    try:
        run()
    except KeyboardInterrupt:
        return 130
    except ShardLoadFailed:
        return 1
    except (RankFailed, ValueError, FileNotFoundError, OSError) as exc:
        print(f"fastlm: tensor-parallel rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def exit_now(code: int) -> None:
    """End this rank's process like multiprocessing's children, without finalizing the interpreter: a gloo
    thread may still be releasing the last collective's tensors then, and a thread that takes the GIL
    during finalization aborts the process (SIGABRT, "terminate called without an active exception";
    1 exit in 4 on a loaded CPU)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent(rank: int, parent: int) -> None:
    """A thread that ends this process once rank 0's process is gone (it was killed, say)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"fastlm: tensor-parallel rank {rank}: error: rank 0 (pid {parent}) exited", file=sys.stderr,
              flush=True)
        os._exit(1)
    threading.Thread(target=watch, name="fastlm-tp-parent", daemon=True).start()
