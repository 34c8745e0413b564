"""POST /v1/completions: prompts (a string, strings, ids, lists of ids) in, text choices out."""
import time
import uuid
from typing import List

from fastapi.responses import JSONResponse, Response

from fastlm.serve.errors import bad_request
from fastlm.serve.outputs import (Choice, EventStreamResponse, TokenStrings, collect, completion_logprobs,
                                  event_stream, finish_reason, usage)
from fastlm.serve.protocol import MAX_N, CompletionRequest, prompt_list


async def create_completion(state, request, body: CompletionRequest) -> Response:
    state.check_model(body.model)
    params = body.params()
    prompts = [_prompt_ids(state, prompt, i) for i, prompt in enumerate(prompt_list(body.prompt))]
    if len(prompts) * params.n > MAX_N:
        raise bad_request(f"a request may ask for at most {MAX_N} choices (prompts x n), got {len(prompts) * params.n}",
                          "prompt")
    echoes = [_echo_text(state, p) for p in prompt_list(body.prompt)] if body.echo else None
    token_strings = TokenStrings(state.need_tokenizer("logprobs", "logprobs")) if params.logprobs is not None else None
    generation = state.generation(prompts, params)  # from here on, the generation must be closed on every path
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    choices = {i: Choice(i, echoes[i // params.n] if echoes else "") for i in range(generation.num_choices)}
    if body.stream:
        events = _events(generation, head, choices, echoes, token_strings, body.include_usage)
        return EventStreamResponse(events, generation)
    if not await collect(generation, choices, request):
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse({**head, "choices": [_choice_json(c, token_strings) for c in choices.values()],
                         "usage": usage(generation.prompt_tokens, sum(c.num_tokens for c in choices.values()))})


def _prompt_ids(state, prompt, index: int) -> List[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        return list(state.need_tokenizer("a text prompt", "prompt").encode(prompt))
    if not prompt:
        raise bad_request(f"prompt[{index}] must not be empty", "prompt")
    return list(prompt)


def _echo_text(state, prompt) -> str:
    return prompt if isinstance(prompt, str) else state.need_tokenizer("echo", "echo").decode(list(prompt))


def _choice_json(choice: Choice, token_strings) -> dict:
    logprobs = completion_logprobs(choice.logprobs, token_strings, choice.prefix_length) if token_strings else None
    return {"index": choice.index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}


def _events(generation, head: dict, choices, echoes, token_strings, include_usage: bool):
    n = generation.params.n
    offsets = {i: choice.prefix_length for i, choice in choices.items()}  # text offset of each choice's next token

    def delta(index, text, logprobs=None, reason=None):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def deltas(index, out):
        logprobs = None
        if token_strings is not None:
            logprobs = completion_logprobs(out.logprobs, token_strings, offsets[index])
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        if out.text or out.finished or out.token_ids and logprobs:
            yield delta(index, out.text, logprobs, finish_reason(out))

    first = [delta(i, echoes[i // n]) for i in choices] if echoes else []
    return event_stream(generation, head, choices, include_usage, deltas, first)
