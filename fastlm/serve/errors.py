"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the matching status.

Handlers raise APIError; app.py turns it (and pydantic's validation errors, invalid JSON, ValueErrors
of the runtime) into these responses, so a user error is never a 500.
"""
from typing import Optional

from fastapi.responses import JSONResponse

# engine / SamplingParams argument names -> the request field a client sent
FIELD_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "prompt_ids": "prompt"}
# request fields a runtime message may start with (it then names the param)
PARAMS = {"prompt", "messages", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
          "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos",
          "logprobs"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def from_value_error(exc: ValueError) -> APIError:
    """A runtime ValueError ('top_p must be in (0, 1], got 2') as a 400 naming the request's field."""
    message = str(exc)
    first = message.split(" ", 1)[0].split("[", 1)[0].strip("'\"")
    if first in FIELD_NAMES:
        message = FIELD_NAMES[first] + message[len(first):]
        first = FIELD_NAMES[first]
    return bad_request(message, first if first in PARAMS else None)
