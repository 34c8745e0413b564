"""POST /v1/chat/completions: messages rendered by the chat template, assistant messages out."""
import time
import uuid

from fastapi.responses import JSONResponse, Response

from fastlm.serve.errors import APIError, bad_request
from fastlm.serve.outputs import (Choice, EventStreamResponse, TokenStrings, chat_logprobs, collect, event_stream,
                                  finish_reason, usage)
from fastlm.serve.protocol import ChatCompletionRequest


async def create_chat_completion(state, request, body: ChatCompletionRequest) -> Response:
    state.check_model(body.model)
    prompt = _render(state, body)
    params = body.params(room=state.context - len(prompt))
    token_strings = TokenStrings(state.tokenizer) if params.logprobs is not None else None
    generation = state.generation([prompt], params)  # from here on, the generation must be closed on every path
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    choices = {i: Choice(i) for i in range(generation.num_choices)}
    if body.stream:
        return EventStreamResponse(_events(generation, head, choices, token_strings, body.include_usage), generation)
    if not await collect(generation, choices, request):
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse({**head, "object": "chat.completion",
                         "choices": [_choice_json(c, token_strings) for c in choices.values()],
                         "usage": usage(generation.prompt_tokens, sum(c.num_tokens for c in choices.values()))})


def _render(state, body: ChatCompletionRequest):
    tokenizer = state.need_tokenizer("chat", "messages")
    if state.chat_template is None:
        raise APIError(400, "this model has no chat template (no chat_template in its tokenizer_config.json "
                            "and no chat_template.jinja); start the server with --chat-template FILE, or use "
                            "/v1/completions", param="messages", code="no_chat_template")
    try:
        return state.chat_template.encode(tokenizer, body.messages, bool(body.add_generation_prompt))
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None


def _choice_json(choice: Choice, token_strings) -> dict:
    return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
            "logprobs": chat_logprobs(choice.logprobs, token_strings) if token_strings else None,
            "finish_reason": choice.finish_reason}


def _events(generation, head: dict, choices, token_strings, include_usage: bool):
    def delta(index, message, logprobs=None, reason=None):
        return {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": reason}

    def deltas(index, out):
        logprobs = chat_logprobs(out.logprobs, token_strings) if token_strings is not None else None
        if out.text or out.finished or out.token_ids and logprobs:
            yield delta(index, {"content": out.text} if out.text else {}, logprobs, finish_reason(out))

    first = [delta(i, {"role": "assistant", "content": ""}) for i in choices]  # the role comes first
    return event_stream(generation, {**head, "object": "chat.completion.chunk"}, choices, include_usage, deltas, first)
