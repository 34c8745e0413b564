"""Rank 0's side of a tensor-parallel engine: the other ranks, the order of collectives, failures.

Every collective must be issued in the same order on every rank. Rank 0 issues them from two threads
(the engine's, stepping; a heartbeat, pinging), so one lock covers each whole message *and* the forward
that follows it: a ping can never fall between a step's inputs and its all-reduces.

Liveness: the other ranks wait for rank 0's next message at most `timeout_s` (the process group's
timeout), so an idle rank 0 pings every timeout_s / 4; a rank 0 that died or hangs ends them within the
timeout. A rank that dies fails rank 0's next collective (at once for a killed process on this machine,
within the timeout otherwise); the group is then broken: that step and every later one raise RankFailed,
naming the rank that exited and its exit code when rank 0 started it.
"""
import atexit
import contextlib
import subprocess
import threading
import time
import weakref
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.model.collectives import RankFailed, collective_errors, first_line
from fastlm.runtime.parallel.messages import COPY, PING, STEP, STOP, Channel, encode_copies, encode_step

JOIN_TIMEOUT_S = 10.0  # how long close() waits for a started rank to exit before killing it
SETTLE_S = 0.2  # see close()
_OPEN_GROUPS = weakref.WeakSet()


@atexit.register
def _close_open_groups() -> None:
    """Stop the other ranks at exit when the LLM was not closed (they would otherwise wait for the timeout)."""
    for group in list(_OPEN_GROUPS):
        group.close()


def open_groups():
    """The groups of this process not closed yet (one at a time: they share the default process group)."""
    return list(_OPEN_GROUPS)


class TensorParallelGroup:
    """workers: the processes of ranks 1..N-1 when rank 0 started them (none under torchrun);
    owns_process_group: destroy the default process group on close (rank 0 created it)."""

    def __init__(self, world_size: int, device: torch.device, timeout_s: float,
                 workers: Sequence[subprocess.Popen] = (), owns_process_group: bool = True):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.workers, self.owns_process_group = list(workers), owns_process_group
        self.channel = Channel(device)
        self.failure: Optional[str] = None  # why the group broke (then every step raises RankFailed)
        self.on_failure: Optional[Callable[[str], None]] = None  # called once with it, from any thread
        self.closed = False
        self._lock = threading.RLock()
        self._last_message = time.monotonic()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._ping_while_idle, name="fastlm-tp-heartbeat", daemon=True)
        self._heartbeat.start()
        _OPEN_GROUPS.add(self)

    # ---- what the engine's runner calls --------------------------------------------------------
    @contextlib.contextmanager
    def collective(self, what: str):
        """Hold the lock for one message and the forward after it; a failure inside breaks the group
        (the ranks' collectives are out of step from then on)."""
        with self._lock:
            if self.closed:
                raise RankFailed("the tensor-parallel ranks were shut down (LLM.close())")
            if self.failure is not None:
                raise RankFailed(self.failure)
            try:
                with collective_errors(what):
                    yield
            except RankFailed as exc:
                self._fail(self._explain(str(exc)))
                raise RankFailed(self.failure) from exc
            except BaseException as exc:
                self._fail(f"rank 0 failed during {what} ({type(exc).__name__}: {first_line(exc)})")
                raise
            finally:
                self._last_message = time.monotonic()

    def send_step(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> None:
        """Inside collective(): the other ranks run this step's forward with rank 0."""
        self.channel.send(STEP, *encode_step(input_ids, meta))

    def send_copies(self, pairs: Sequence[Tuple[int, int]]) -> None:
        """Inside collective(): every rank copies these KV blocks (src, dst) in its own pool."""
        self.channel.send(COPY, *encode_copies(pairs))

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Tell the other ranks to stop, wait for them, leave the process group (idempotent)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._stop.set()
            if self.failure is None:
                try:
                    with collective_errors("the other ranks to stop"):
                        self.channel.send(STOP)
                        dist.barrier()  # every rank is done with gloo before any tears it down
                except RankFailed:
                    pass  # they are gone already
            if self.owns_process_group and dist.is_initialized():
                dist.destroy_process_group()
            # gloo's threads release a finished collective's tensors after it returns; one doing it once
            # the interpreter finalizes (close() at exit) aborts the process: give them a moment
            time.sleep(SETTLE_S)
        if self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        self._end_workers()
        _OPEN_GROUPS.discard(self)

    def _end_workers(self) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for proc in self.workers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ---- failures ------------------------------------------------------------------------------
    def _ping_while_idle(self) -> None:
        interval = self.timeout_s / 4
        while not self._stop.wait(min(interval, 1.0)):
            with self._lock:
                if self.closed or self.failure is not None:
                    return
                dead = self._dead_workers()
                if dead:
                    self._fail(f"{dead}; the tensor-parallel group is broken")
                    return
                if time.monotonic() - self._last_message < interval:
                    continue
                try:
                    with self.collective("a heartbeat"):
                        self.channel.send(PING)
                except RankFailed:
                    return

    def _fail(self, message: str) -> None:
        """Record why the group broke (the first reason only) and tell on_failure."""
        if self.failure is None:
            self.failure = message
            if self.on_failure is not None:
                self.on_failure(message)

    def _dead_workers(self) -> str:
        """'rank 1 (pid 123) exited with code -9' for each started rank that ended, '' when none did."""
        return "; ".join(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.returncode}"
                         for rank, proc in enumerate(self.workers, start=1) if proc.poll() is not None)

    def _explain(self, message: str) -> str:
        if not self.workers:
            return message
        deadline = time.monotonic() + 1.0  # a rank that broke the connection by dying is being reaped
        while not self._dead_workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = self._dead_workers()
        return f"{dead}; {message}" if dead else message
