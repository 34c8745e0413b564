"""start_ranks: bring up every rank of a tensor-parallel LLM; rank 0 gets its shard and the group back.

On rank 0 it returns a RankZero (its model, the TensorParallelGroup to the other ranks, the agreed KV
pool size). On the other ranks of a torchrun launch it serves rank 0's steps and then ends the process
without returning (worker.exit_code: 0 once rank 0 closed, 1 with one line on stderr when a rank
failed; no atexit handlers run), so that the same script runs on every rank and only rank 0 goes past
`LLM(...)`.
"""
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import List

import torch
import torch.distributed as dist

import fastlm
from fastlm.model.collectives import RankFailed
from fastlm.runtime.engine.kv_pool import bytes_per_token
from fastlm.runtime.parallel.group import TensorParallelGroup, open_groups
from fastlm.runtime.parallel.ranks import (ParallelOptions, backend_options, check_options, check_world,
                                           default_threads, init_from_env, launch_mode, load_shard, rank_device)
from fastlm.runtime.parallel.worker import ENV_OPTIONS, ENV_PARENT, JOINED_KEY, exit_code, exit_now, run_rank

FASTLM_ROOT = str(Path(fastlm.__file__).resolve().parents[1])  # spawned ranks import this same fastlm


@dataclass
class RankZero:
    model: torch.nn.Module  # rank 0's shard (fastlm.model.parallel): its forward returns the gathered logits
    group: TensorParallelGroup
    kv_cache_memory: int  # bytes of rank 0's pool: exactly the blocks every rank agreed on
    threads: int  # CPU threads of each rank


def start_ranks(o: ParallelOptions) -> RankZero:
    check_options(o)
    if any(not group.closed for group in open_groups()):
        raise ValueError("a tensor-parallel LLM is already open in this process; close() it first")
    mode = launch_mode()
    workers: List[subprocess.Popen] = []
    if mode == "spawn":
        o.threads = o.threads or default_threads(o.world_size)
        rank, local_rank = 0, 0
    else:
        rank, local_rank = check_world(o, mode)
        o.threads = o.threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", o.world_size)))
    device = rank_device(o.device, local_rank)
    if device.type == "cpu":
        torch.set_num_threads(o.threads)
    if mode == "spawn":
        workers = _spawn_ranks(o, device)
    elif mode == "torchrun":
        init_from_env(o, device)
    owns = mode != "existing"
    if rank != 0:
        exit_now(exit_code(rank, lambda: run_rank(o, rank, device, owns_process_group=owns)))
    try:
        model, num_blocks = load_shard(o, rank, device)
    except BaseException:
        _abandon(workers, owns_process_group=owns)
        raise
    group = TensorParallelGroup(o.world_size, device, o.timeout_s, workers, owns)
    return RankZero(model, group, num_blocks * o.block_size * bytes_per_token(model), o.threads)


def _spawn_ranks(o: ParallelOptions, device: torch.device) -> List[subprocess.Popen]:
    """Start ranks 1..N-1 as subprocesses and form the process group with them (rank 0 = this process)."""
    timeout = timedelta(seconds=o.timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, o.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(o.world_size),
               **{ENV_OPTIONS: o.to_json(), ENV_PARENT: str(os.getpid()), "OMP_NUM_THREADS": str(o.threads),
                  "PYTHONPATH": os.pathsep.join(filter(None, [FASTLM_ROOT, os.environ.get("PYTHONPATH")]))})
    workers = [subprocess.Popen([sys.executable, "-m", "fastlm.runtime.parallel"],
                                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.DEVNULL)
               for r in range(1, o.world_size)]
    try:
        _wait_for_ranks(store, workers, o.timeout_s)
        dist.init_process_group(store=store, rank=0, world_size=o.world_size, timeout=timeout,
                                **backend_options(device))
    except BaseException:
        _abandon(workers, owns_process_group=False)
        raise
    return workers


def _wait_for_ranks(store, workers, timeout_s: float) -> None:
    """Until every spawned rank reached the store; RankFailed at once if one exits first (its error is
    on stderr), or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while store.add(JOINED_KEY, 0) < len(workers):
        for rank, proc in enumerate(workers, start=1):
            if proc.poll() is not None:
                raise RankFailed(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.returncode} "
                                 "while starting")
        if time.monotonic() > deadline:
            raise RankFailed(f"the tensor-parallel ranks did not start within {timeout_s:g} s")
        time.sleep(0.05)


def _abandon(workers: List[subprocess.Popen], owns_process_group: bool) -> None:
    """After a failed start: end the spawned ranks and leave the process group."""
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
