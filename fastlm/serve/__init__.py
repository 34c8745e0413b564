"""fastlm's OpenAI-compatible HTTP server (`fastlm serve`); the only package that knows HTTP.

    commands.py     the `fastlm serve` command: flags, model + engine loading, uvicorn on a bound socket
    app.py          the FastAPI app: routes, API key, errors in OpenAI's shape
    protocol.py     request bodies (unknown fields ignored) -> SamplingParams
    completions.py  POST /v1/completions
    chat.py         POST /v1/chat/completions (fastlm.runtime.chat_template renders the messages)
    outputs.py      choices, logprobs, usage, server-sent events
    state.py        the EngineLoop, admission (503 when full), one Generation per HTTP request
    metrics.py      /metrics (prometheus-client)
    errors.py       APIError and the mapping of runtime ValueErrors to 400s
"""
