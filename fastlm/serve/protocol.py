"""Request bodies of /v1/completions and /v1/chat/completions, and their SamplingParams.

Fields as OpenAI defines them plus vLLM's common extensions (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids). Unknown fields are ignored (the official client merges
`extra_body` into the body); null means the default. Type errors become 400s in app.py; value errors
are SamplingParams' ValueErrors, reported under the request's field names (errors.py).
"""
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict

from fastlm.runtime.sampling import SamplingParams
from fastlm.serve.errors import bad_request, from_value_error

MAX_LOGPROBS = 20  # OpenAI's limit for logprobs (completions) and top_logprobs (chat)
MAX_N = 128  # choices per request (n, and prompts x n for completions): bounds one request's memory


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[bool] = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    # extensions
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[int] = None
    stop_token_ids: Optional[List[int]] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        """The engine's parameters; APIError 400 naming the field for an invalid value."""
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        n = 1 if self.n is None else self.n
        if n > MAX_N:
            raise bad_request(f"n must be <= {MAX_N}, got {n}", "n")
        top_k = self.top_k or 0
        options = dict(
            max_new_tokens=max_tokens, temperature=_default(self.temperature, 1.0), top_p=_default(self.top_p, 1.0),
            top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
            min_p=_default(self.min_p, 0.0), repetition_penalty=_default(self.repetition_penalty, 1.0),
            stop=self.stop or (), seed=self.seed, presence_penalty=_default(self.presence_penalty, 0.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0), stop_token_ids=self.stop_token_ids or (),
            min_new_tokens=_default(self.min_tokens, 0), ignore_eos=bool(self.ignore_eos), n=n, logprobs=logprobs)
        try:
            return SamplingParams(**options)
        except ValueError as exc:
            raise from_value_error(exc) from None


class CompletionRequest(_Common):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = False

    def params(self) -> SamplingParams:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (no prompt logprobs)", "echo")
        return self.sampling_params(16 if self.max_tokens is None else self.max_tokens, self.logprobs)


class ChatCompletionRequest(_Common):
    messages: List[Any]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: Optional[bool] = True  # extension (as vLLM)

    def params(self, room: int) -> SamplingParams:
        """room: the tokens left in the context after the prompt (the default max_tokens)."""
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                  "top_logprobs")
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if limit is not None and limit < 1:
            raise bad_request(f"{field} must be >= 1, got {limit}", field)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max(room, 1) if limit is None else limit, logprobs)


def _default(value, default):
    return default if value is None else value


def prompt_list(prompt) -> List[Union[str, List[int]]]:
    """The prompts of a completion request: each a string or a list of ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
