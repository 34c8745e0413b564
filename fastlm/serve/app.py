"""The FastAPI app: routes, the API key check, and every error in OpenAI's JSON shape.

Handlers run on the event loop and never touch torch: generation happens on the EngineLoop's thread
(state.py); tokenizing and chat-template rendering are plain Python / Rust calls.
"""
import json
import secrets
from contextlib import asynccontextmanager
from typing import Optional, Type

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from fastlm.serve.chat import create_chat_completion
from fastlm.serve.completions import create_completion
from fastlm.serve.errors import APIError, bad_request, from_value_error
from fastlm.serve.metrics import CONTENT_TYPE
from fastlm.serve.protocol import ChatCompletionRequest, CompletionRequest
from fastlm.serve.state import ServerState


def build_app(state: ServerState, api_key: Optional[str] = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.shutdown()

    app = FastAPI(title="fastlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    authorized = [Depends(_key_checker(api_key))]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "fastlm", "max_model_len": state.context}]}

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request):
        return await create_completion(state, request, await _parse(request, CompletionRequest))

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request):
        return await create_chat_completion(state, request, await _parse(request, ChatCompletionRequest))

    return app


def _key_checker(api_key: Optional[str]):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")
    return check


async def _parse(request: Request, model: Type[BaseModel]) -> BaseModel:
    try:
        data = json.loads((await request.body() or b"null").decode("utf-8"))
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate (JSON "\ud800") cannot be tokenized
    except (json.JSONDecodeError, UnicodeError) as e:
        raise bad_request(f"the request body is not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors) -> APIError:
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return bad_request(f"{where}: {first.get('msg', 'invalid value')}", field)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(ValueError)
    async def value_error(request, exc: ValueError):
        return from_value_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, exc: RequestValidationError):
        return _validation_error(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                       "type": "server_error", "param": None, "code": None}}, status_code=500)
