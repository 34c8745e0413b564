"""From the engine's SequenceOutputs to OpenAI response bodies: choices, logprobs, usage, SSE.

Logprobs are clamped to LOGPROB_FLOOR (JSON has no -inf or NaN). Token strings are each token decoded
alone (special tokens kept). Streams are server-sent events, `data: {json}` then `data: [DONE]`; an
engine failure mid-stream is sent as an OpenAI error event (the official client raises it).
"""
import asyncio
import json
import math
from typing import Callable, Dict, Iterable, List, Optional

from fastapi.responses import StreamingResponse

from fastlm.serve.errors import APIError

LOGPROB_FLOOR = -9999.0
DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


def finite(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) or logprob < LOGPROB_FLOOR else min(float(logprob), 0.0)


class TokenStrings:
    """Token id -> its text alone, memoized (the tokenizer is the server's, read-only)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


class Choice:
    """One choice's text, token count, logprob entries and finish reason, accumulated over outputs."""

    def __init__(self, index: int, prefix: str = ""):
        self.index, self.text, self.num_tokens = index, prefix, 0
        self.prefix_length = len(prefix)  # the echoed prompt
        self.logprobs: List = []
        self.finish_reason = None

    def add(self, out) -> None:
        self.text += out.text
        self.num_tokens += len(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.finish_reason = finish_reason(out) or self.finish_reason


def completion_logprobs(entries, token_strings: TokenStrings, offset: int) -> dict:
    """The completions API's logprobs object; offset: where the first token's text starts in the choice."""
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        tokens.append(token_strings(entry.token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [finite(e.logprob) for e in entries],
            "top_logprobs": [_top_dict(e.top, token_strings) for e in entries],
            "text_offset": offsets}


def _top_dict(top, token_strings: TokenStrings) -> dict:
    """{token string: logprob}, most likely first; tokens that decode alike (bytes of one character,
    shown as U+FFFD) keep the first, highest value."""
    result = {}
    for token_id, logprob in top:
        result.setdefault(token_strings(token_id), finite(logprob))
    return result


def chat_logprobs(entries, token_strings: TokenStrings) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    def item(token_id, logprob):
        text = token_strings(token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def collect(generation, choices: Dict[int, Choice], request) -> bool:
    """Accumulate every output into choices; False (request aborted) if the client disconnects first."""
    async def consume():
        async for index, out in generation.outputs():
            choices[index].add(out)

    task, watcher = asyncio.ensure_future(consume()), asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        generation.close()
    if task not in done:
        return False
    task.result()  # an engine failure propagates
    return True


async def _disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """A server-sent-events response that closes its generation however the response ends, also when
    the client leaves before the body starts (its generator then never runs, so its finally cannot)."""

    def __init__(self, events, generation):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def finish_reason(out) -> Optional[str]:
    """OpenAI's finish_reason of an output: None until it finished, then "length" or "stop"."""
    if not out.finished:
        return None
    return "length" if out.finish_reason == "length" else "stop"


async def event_stream(generation, head: dict, choices: Dict[int, Choice], include_usage: bool,
                       deltas: Callable[[int, object], Iterable[dict]], first: Iterable[dict] = ()):
    """SSE text of a streamed response: the `first` choice deltas, deltas(choice index, output) for each
    output, the usage chunk when asked, [DONE]. Each chunk carries one choice delta. Closing it early
    (client gone) aborts the generation."""
    def chunk(delta: dict) -> str:
        return sse({**head, "choices": [delta], **({"usage": None} if include_usage else {})})

    try:
        for delta in first:
            yield chunk(delta)
        async for index, out in generation.outputs():
            choices[index].num_tokens += len(out.token_ids)
            for delta in deltas(index, out):
                yield chunk(delta)
        if include_usage:
            total = sum(c.num_tokens for c in choices.values())
            yield sse({**head, "choices": [], "usage": usage(generation.prompt_tokens, total)})
    except APIError as exc:
        yield sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
    except Exception as exc:  # noqa: BLE001 - the response has started: report the failure in the stream
        yield sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                             "code": None}})
    finally:
        generation.close()
    yield DONE
