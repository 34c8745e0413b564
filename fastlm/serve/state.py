"""The server's side of the engine: one EngineLoop (torch on its thread only), admission, metrics.

A Generation is one HTTP request's work: one engine request per prompt (each with the request's n
samples), opened at once so that invalid prompts fail before any response starts, then read as one
merged async stream of (choice index, SequenceOutput); choice index = prompt index * n + sample
index, as OpenAI numbers them. close() aborts whatever still runs (a client that left) and frees
the request's admission slot.
"""
import asyncio
import time
from typing import List, Optional

from fastlm.runtime.engine.background import EngineLoop
from fastlm.runtime.sampling import SamplingParams
from fastlm.serve.errors import APIError, from_value_error
from fastlm.serve.metrics import ServerMetrics


class ServerState:
    """owner: the fastlm.LLM the engine belongs to, closed at shutdown (it stops tensor-parallel ranks)."""

    def __init__(self, engine, model_name: str, chat_template=None, max_waiting_requests: int = 256, owner=None):
        self.engine, self.tokenizer, self.owner = engine, engine.tokenizer, owner
        self.loop = EngineLoop(engine)
        self.model_name, self.chat_template = model_name, chat_template
        self.context = engine.model.config.max_seq_len
        self.max_in_flight = engine.scheduler.max_num_seqs + max_waiting_requests
        self.in_flight = 0
        self.metrics = ServerMetrics(engine.stats)
        self.created = int(time.time())

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def need_tokenizer(self, what: str, param: str):
        if self.tokenizer is None:
            raise APIError(400, f"this model has no tokenizer: {what} needs one", param=param)
        return self.tokenizer

    def generation(self, prompts: List[List[int]], params: SamplingParams) -> "Generation":
        if self.in_flight >= self.max_in_flight:
            self.metrics.rejected.inc()
            raise APIError(503, f"the server is at capacity ({self.in_flight} requests in flight); retry later",
                           "server_overloaded", code="server_overloaded", headers={"Retry-After": "1"})
        return Generation(self, prompts, params)

    def shutdown(self) -> None:
        self.loop.shutdown()
        if self.owner is not None:
            self.owner.close()


class Generation:
    def __init__(self, state: ServerState, prompts: List[List[int]], params: SamplingParams):
        self.state, self.params, self.prompts = state, params, prompts
        self.start = time.monotonic()
        self.streams, self._closed = [], False
        try:
            for ids in prompts:
                self.streams.append(state.loop.astream(ids, params))
        except ValueError as exc:  # the engine's check: ids outside the vocabulary, prompt past the context...
            for stream in self.streams:
                stream.close()
            raise from_value_error(exc) from None
        state.in_flight += 1
        state.metrics.in_flight.set(state.in_flight)
        state.metrics.prompt_tokens.inc(self.prompt_tokens)
        self._unfinished = len(prompts) * params.n
        self._last_token_time = {}

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    async def outputs(self):
        """(choice index, SequenceOutput) as they come, all prompts merged; ends when every choice finished."""
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(self._pump(i, stream, queue)) for i, stream in enumerate(self.streams)]
        try:
            for _ in pumps:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for pump in pumps:
                pump.cancel()
            self.close()

    async def _pump(self, prompt_index: int, stream, queue: asyncio.Queue) -> None:
        try:
            async for out in stream:
                self._observe(prompt_index * self.params.n + out.index, out)
                queue.put_nowait((prompt_index * self.params.n + out.index, out))
        except Exception as exc:  # noqa: BLE001 - the engine step failed: the consumer reports it
            queue.put_nowait(exc)
        queue.put_nowait(None)

    def _observe(self, choice: int, out) -> None:
        metrics, now = self.state.metrics, time.monotonic()
        if out.token_ids:
            last = self._last_token_time.get(choice)
            if last is None:
                metrics.ttft.observe(now - self.start)
            else:
                metrics.itl.observe((now - last) / len(out.token_ids))
            self._last_token_time[choice] = now
            metrics.generation_tokens.inc(len(out.token_ids))
        if out.finished:
            self._unfinished -= 1
            metrics.finished.labels(out.finish_reason).inc()

    def close(self) -> None:
        """Abort what still runs and release the admission slot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for stream in self.streams:
            stream.close()
        if self._unfinished:
            self.state.metrics.finished.labels("abort").inc(self._unfinished)
        self.state.in_flight -= 1
        self.state.metrics.in_flight.set(self.state.in_flight)
