"""EngineLoop: the engine's step loop on one background thread, shared by any number of callers.

Torch runs on that thread only; callers (threads, generators, an asyncio event loop) submit requests
and receive each request's SequenceOutputs as they come:

    loop = EngineLoop(engine)
    for out in loop.stream(prompt_ids, params):          # plain iterator, any thread
        ...
    async for out in loop.astream(prompt_ids, params):   # asyncio: never blocks the event loop
        ...

Requests are validated on the caller's thread (ValueError at once); adding and aborting happen on the
loop thread between steps. An asyncio consumer's queue is filled with loop.call_soon_threadsafe.
Leaving a stream early (break, close(), garbage collection, a cancelled task) aborts its request.
If a step raises, every active request receives the exception and the loop keeps serving new ones.
"""
import asyncio
import atexit
import itertools
import queue
import threading
import weakref
from typing import Callable, Dict, List, Optional

from fastlm.runtime.engine.engine import Engine, SequenceOutput
from fastlm.runtime.sampling import SamplingParams

_END = object()  # delivered once after a request's last output
_LIVE_LOOPS = weakref.WeakSet()
_LOOP_THREADS = set()  # every loop thread ever started, joined at exit (a thread drops its loop before it ends)


@atexit.register
def _stop_all_loops() -> None:
    """Stop and join every loop thread before the interpreter finalizes: a daemon thread still inside a
    torch op, or still tearing itself down, when finalization starts is killed by a forced unwind through
    C++ frames, which aborts the process ("terminate called without an active exception"). Threads are
    joined even when their loop is already gone (an LLM collected before exit stops its loop without
    waiting): that race made `fastlm generate` abort at exit in most runs."""
    for loop in list(_LIVE_LOOPS):
        loop.shutdown(wait=False)
    for thread in list(_LOOP_THREADS):
        if thread is not threading.current_thread():
            thread.join()


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Condition()
        self._commands: List[tuple] = []
        self._sinks: Dict[int, Callable] = {}  # request id -> deliver(item), touched on the loop thread only
        self._remaining: Dict[int, int] = {}  # request id -> sequences not finished yet
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # ---- callers' side ------------------------------------------------------------------------
    def submit(self, prompt_ids, params: SamplingParams, deliver: Callable) -> int:
        """Queue a request whose outputs (then _END, or an exception) go to deliver(item), called on
        the loop thread. Returns the request id."""
        prompt = self.engine.check_request(prompt_ids, params)
        rid = next(self._ids)
        self._send(("add", rid, prompt, params, deliver))
        return rid

    def abort(self, request_id: int) -> None:
        self._send(("abort", request_id))

    def stream(self, prompt_ids, params: SamplingParams) -> "RequestStream":
        return RequestStream(self, prompt_ids, params)

    def astream(self, prompt_ids, params: SamplingParams) -> "AsyncRequestStream":
        """Call from a coroutine: outputs arrive through the running event loop."""
        return AsyncRequestStream(self, prompt_ids, params, asyncio.get_running_loop())

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the loop thread after its current step (requests still queued are dropped)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _send(self, command: tuple) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine loop was shut down")
            self._commands.append(command)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fastlm-engine", daemon=True)
                self._thread.start()
                _LIVE_LOOPS.add(self)
                _LOOP_THREADS.difference_update([t for t in _LOOP_THREADS if not t.is_alive()])
                _LOOP_THREADS.add(self._thread)
            self._lock.notify()

    # ---- the loop thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._commands and not self.engine.has_unfinished() and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            if self.engine.has_unfinished():
                self._step()

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, rid, prompt, params, deliver = command
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except Exception as exc:  # noqa: BLE001 - the caller receives it
                deliver(exc)
                return
            self._sinks[rid], self._remaining[rid] = deliver, params.n
        elif command[0] == "abort":
            rid = command[1]
            self.engine.abort(rid)
            self._close(rid, _END)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - every active request receives it
            for rid in list(self._sinks):
                self.engine.abort(rid)
                self._close(rid, exc)
            return
        for out in outputs:
            if out.request_id not in self._sinks:
                continue
            self._deliver(out.request_id, out)
            if out.finished and out.request_id in self._remaining:
                self._remaining[out.request_id] -= 1
                if self._remaining[out.request_id] == 0:
                    self._close(out.request_id, _END)

    def _deliver(self, rid: int, item) -> None:
        try:
            self._sinks[rid](item)
        except Exception:  # noqa: BLE001 - its consumer is gone (e.g. a closed event loop): drop the request
            self.engine.abort(rid)
            self._sinks.pop(rid, None)
            self._remaining.pop(rid, None)

    def _close(self, rid: int, last) -> None:
        if rid in self._sinks:
            self._deliver(rid, last)
        self._sinks.pop(rid, None)
        self._remaining.pop(rid, None)


class _Stream:
    """One request's outputs arriving in a queue; close() aborts the request if it still runs."""

    def __init__(self, loop: EngineLoop, prompt_ids, params: SamplingParams, queue_, put):
        self._loop, self._queue, self._done = loop, queue_, True  # nothing to abort if submit raises
        self.request_id = loop.submit(prompt_ids, params, put)
        self._done = False

    def _take(self, item):
        """An output, or None at the end (a delivered exception is raised)."""
        if item is _END or isinstance(item, BaseException):
            self._done = True
            if item is not _END:
                raise item
            return None
        return item

    def close(self) -> None:
        """Abort the request if it is still running (idempotent)."""
        if not self._done:
            self._done = True
            self._loop.abort(self.request_id)


class RequestStream(_Stream):
    """Iterator over one request's SequenceOutputs (all n samples interleaved), for any thread."""

    def __init__(self, loop: EngineLoop, prompt_ids, params: SamplingParams):
        q = queue.Queue()
        super().__init__(loop, prompt_ids, params, q, q.put)

    def __iter__(self):
        return self

    def __next__(self) -> SequenceOutput:
        out = None if self._done else self._take(self._queue.get())
        if out is None:
            raise StopIteration
        return out

    def __del__(self):
        try:
            self.close()
        except RuntimeError:  # the loop was shut down
            pass


class AsyncRequestStream(_Stream):
    """Async iterator over one request's SequenceOutputs; items cross threads via call_soon_threadsafe."""

    def __init__(self, loop: EngineLoop, prompt_ids, params: SamplingParams, event_loop):
        q = asyncio.Queue()
        super().__init__(loop, prompt_ids, params, q,
                         lambda item: event_loop.call_soon_threadsafe(q.put_nowait, item))

    def __aiter__(self):
        return self

    async def __anext__(self) -> SequenceOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        out = self._take(item)
        if out is None:
            raise StopAsyncIteration
        return out

    async def aclose(self) -> None:
        self.close()
