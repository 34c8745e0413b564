"""`fastlm serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn), registered by fastlm/cli.py.

Flags are checked and the socket is bound before the model loads (a taken port fails at once); the address
is printed once the model is loaded, and a client may connect as soon as it reads the line (with
--port 0 the line names the port chosen).
SIGTERM: stop accepting, let running requests finish within --shutdown-timeout seconds, exit 0.
--tensor-parallel-size N: the model is split across N ranks (spawned, or torchrun's: then only rank 0
listens); if one dies or stops answering, the server stops and exits 1 with the reason.
"""
import asyncio
import os
import signal
import socket

from fastlm.runtime.commands import _add_model_args, check_model_args, load_llm

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DEFAULT_MODEL_NAME = "fastlm-default"


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
                                          "/v1/models, /health, /metrics.")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("FASTLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $FASTLM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="jinja2 chat template file "
                   "(default: the checkpoint's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step (default 512)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--kv-cache-memory", default=None, help="KV pool size, e.g. 512M or 4G (default: from "
                   "--gpu-memory-utilization on a GPU, max-num-seqs full contexts on a CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of free GPU memory for the KV pool")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--max-waiting-requests", type=int, default=256, help="requests queued beyond --max-num-seqs "
                   "before new ones get 503 (default 256)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish "
                   "after SIGTERM (default 30)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)


def parse_bytes(text) -> int:
    """'512M' / '4G' / '1048576' -> bytes; ValueError naming --kv-cache-memory otherwise."""
    value = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS and not value[-1:].isdigit() else ""
    try:
        number = float(value[:len(value) - len(unit)])
    except ValueError:
        raise ValueError(f"kv_cache_memory must be a size like 512M or 4G, got {text!r}") from None
    if number <= 0:
        raise ValueError(f"kv_cache_memory must be > 0, got {text!r}")
    return int(number * _UNITS[unit])


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {args.port}")
    if args.max_waiting_requests < 0:
        raise ValueError(f"max_waiting_requests must be >= 0, got {args.max_waiting_requests}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"shutdown_timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("api_key must not be empty")
    if args.kv_cache_memory is not None:
        parse_bytes(args.kv_cache_memory)
    if args.chat_template is not None:
        from pathlib import Path

        if not Path(args.chat_template).is_file():
            raise ValueError(f"chat template file not found: {args.chat_template}")


def build_state(args):
    """Load the model (split across --tensor-parallel-size ranks), its chat template and the engine ->
    ServerState. Under torchrun, ranks other than 0 serve rank 0's steps here and never return."""
    from fastlm.runtime.chat_template import load_chat_template
    from fastlm.serve.state import ServerState

    kv_memory = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory is not None else None
    llm, _ = load_llm(args, block_size=args.block_size, kv_cache_memory=kv_memory,
                      gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      enable_prefix_caching=not args.no_prefix_caching)
    template = load_chat_template(llm.path, llm.tokenizer, args.chat_template)
    name = args.served_model_name or (args.model if args.model is not None else DEFAULT_MODEL_NAME)
    return ServerState(llm.engine, name, template, args.max_waiting_requests, owner=llm)


def run_serve(args) -> int:
    import uvicorn

    from fastlm.model.collectives import RankFailed
    from fastlm.runtime.parallel.ranks import torchrun_rank
    from fastlm.serve.app import build_app

    _check_args(args)
    check_model_args(args)
    # before loading: a taken port fails fast; torchrun's other ranks only compute (build_state)
    sock = None if args.tensor_parallel_size > 1 and torchrun_rank() > 0 else _listen(args.host, args.port)
    state = build_state(args)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(state, args.api_key), log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it is done: make SIGTERM's a no-op then, so a
    # graceful stop exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    parallel = state.owner.parallel
    if parallel is not None:  # a broken tensor-parallel group can serve nothing: stop, then fail
        parallel.group.on_failure = lambda message: setattr(server, "should_exit", True)
    print(f"fastlm serve: {state.model_name} ready on http://{_url_host(host)}:{port}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))
    if parallel is not None and parallel.group.failure is not None:
        raise RankFailed(parallel.group.failure)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
