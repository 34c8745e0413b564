"""Serving under load: `fastlm serve` against transformers served the simple way, in one run.

The peer is transformers' `generate` behind the same HTTP stack (FastAPI + uvicorn, OpenAI-style SSE),
one request at a time (an asyncio lock around generate, run in a thread) - what a plain "wrap the model
in an endpoint" server does. Both servers are real processes on loopback ports and load the same
checkpoint (default: a random ~30M-parameter Llama with the embedded model's tokenizer; on the 5M
embedded model Python overhead, the load generator's included, dominates both servers). The load generator (the official openai client,
streaming) sends requests with Poisson arrivals at each rate, mixed prompt lengths and mixed
max_tokens (eos ignored, greedy), and measures per request the time to first token (TTFT) and the
gaps between streamed tokens (inter-token latency, ITL). Per server and rate: achieved requests/s and
output tokens/s, TTFT and ITL p50/p99. Summary: the most requests/s each server sustains with p99 TTFT
under --ttft-slo seconds, and their ratio.

    python benchmarks/bench_serve.py --quick        # a few minutes on a 2-core CPU
    python benchmarks/bench_serve.py [--model PATH] [--rates 0.5 1 2 4 8] [--requests 32]
Writes benchmarks/out/bench_serve.csv and .png (p99 TTFT against achieved requests/s).
"""
import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DEFAULT_OUT, plot, write_csv  # noqa: E402

WORDS = ("the fox ran over a quiet hill while old trees kept their leaves and the river carried light "
         "def read_config path return open file json load value key list dict for in if else").split()


# ---- the peer: transformers' generate, one request at a time --------------------------------------------
def hf_app(model_path: str):
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    app, lock = FastAPI(), asyncio.Lock()

    class QueueStreamer(BaseStreamer):  # generate's tokens -> the event loop, skipping the prompt
        def __init__(self, loop, queue):
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value):
            if self.prompt_seen:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, value.flatten().tolist())
            self.prompt_seen = True

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def generate(ids, max_tokens, streamer):
        with torch.no_grad():
            model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           streamer=streamer, pad_token_id=tokenizer.eos_token_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids = tokenizer.encode(body["prompt"]) if isinstance(body["prompt"], str) else body["prompt"]

        async def events():
            async with lock:
                queue, loop = asyncio.Queue(), asyncio.get_running_loop()
                job = loop.run_in_executor(None, generate, ids, body["max_tokens"], QueueStreamer(loop, queue))
                while (tokens := await queue.get()) is not None:
                    chunk = {"id": "hf", "object": "text_completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "text": tokenizer.decode(tokens), "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                await job
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def run_hf_server(model_path: str) -> None:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    server = uvicorn.Server(uvicorn.Config(hf_app(model_path), log_level="warning", access_log=False))
    print(f"hf server ready on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


# ---- processes and load -------------------------------------------------------------------------------
def start(cmd) -> tuple:
    """Start a server process -> (process, base URL) once it prints its 'ready on URL' line."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "TRITON_INTERPRET": "0"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if " ready on " in line:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, line.rsplit(" ", 1)[-1].strip()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


def workload(n: int, rate: float, seed: int, max_prompt_words: int):
    """n requests: (arrival offset in s, prompt text, max_tokens), Poisson arrivals at `rate` per second."""
    rng, t, requests = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        words = rng.randint(4, max_prompt_words)
        requests.append((t, " ".join(rng.choice(WORDS) for _ in range(words)), rng.randint(16, 64)))
    return requests


async def one_request(client, model: str, start_time: float, offset: float, prompt: str, max_tokens: int):
    import openai

    await asyncio.sleep(max(0.0, start_time + offset - time.perf_counter()))
    sent, stamps = time.perf_counter(), []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    if not stamps:
        raise openai.APIError("no tokens streamed", None, body=None)
    return sent, stamps


async def run_rate(url: str, model: str, requests) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    start_time = time.perf_counter() + 0.05
    results = await asyncio.gather(*(one_request(client, model, start_time, *r) for r in requests))
    await client.close()
    ttft = sorted(stamps[0] - sent for sent, stamps in results)
    itl = sorted(b - a for _, stamps in results for a, b in zip(stamps, stamps[1:]))
    elapsed = max(stamps[-1] for _, stamps in results) - start_time
    return {"requests_per_s": len(results) / elapsed, "output_tok_per_s": sum(r[2] for r in requests) / elapsed,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50),
            "itl_p99_s": pct(itl, 99)}


def pct(sorted_values, p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))]


def best_rate(rows, server: str, slo: float) -> float:
    ok = [r["requests_per_s"] for r in rows if r["server"] == server and r["ttft_p99_s"] <= slo]
    return max(ok, default=0.0)


def medium_checkpoint(folder: str) -> str:
    """A random ~30M-parameter Llama (hidden 512, 8 layers) with the embedded model's tokenizer: big enough
    that a CPU forward pass costs more than the Python around it, so batching shows."""
    import shutil

    import torch
    import transformers as tf

    from fastlm.model.model_path import DEFAULT_MODEL_DIR

    config = tf.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random ~30M Llama with the "
                        "embedded model's tokenizer; 'default' for the embedded 5M model)")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="request rates (per second)")
    parser.add_argument("--requests", type=int, default=None, help="requests per rate (default 32; --quick 16)")
    parser.add_argument("--ttft-slo", type=float, default=1.0, help="p99 TTFT bound of the summary (seconds)")
    parser.add_argument("--max-prompt-words", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="fewer rates and requests")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--hf-server", action="store_true", help=argparse.SUPPRESS)  # internal: run the peer
    args = parser.parse_args()
    if args.hf_server:
        return run_hf_server(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, medium_checkpoint(tmp) if args.model is None else args.model)


def run(args, model_path: str) -> None:
    from fastlm.runtime.llm import resolve_model_path

    model_path = str(resolve_model_path(None if model_path == "default" else model_path))
    rates = args.rates or ([0.5, 1, 2, 4, 8] if args.quick else [0.25, 0.5, 1, 2, 4, 8, 16])
    n = args.requests or (16 if args.quick else 32)
    servers = {"fastlm": [sys.executable, "-m", "fastlm", "serve", "--port", "0", "--model", model_path,
                          "--served-model-name", "m"],
               "transformers": [sys.executable, os.path.abspath(__file__), "--hf-server", "--model", model_path]}
    rows = []
    for name, cmd in servers.items():
        process, url = start(cmd)
        try:
            asyncio.run(run_rate(url, "m", workload(4, 4.0, 99, 16)))  # warm-up
            for rate in rates:
                row = {"server": name, "rate": rate, "requests": n,
                       **asyncio.run(run_rate(url, "m", workload(n, rate, 0, args.max_prompt_words)))}
                rows.append(row)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
        finally:
            process.terminate()
            process.wait(60)
    csv_path = write_csv(rows, os.path.join(args.out, "bench_serve.csv"))
    png = plot(rows, os.path.join(args.out, "bench_serve.png"), x="requests_per_s", y="ttft_p99_s", series="server",
               title="p99 time to first token against achieved requests/s", hline=args.ttft_slo,
               hline_label=f"SLO {args.ttft_slo} s", logx=False)
    ours, theirs = best_rate(rows, "fastlm", args.ttft_slo), best_rate(rows, "transformers", args.ttft_slo)
    ratio = f"{ours / theirs:.2f}x" if theirs else "n/a (transformers never met the SLO)"
    print(f"requests/s with p99 TTFT <= {args.ttft_slo} s: fastlm {ours:.2f}, transformers {theirs:.2f} ({ratio})")
    top = {r["server"]: r for r in rows if r["rate"] == max(rates)}
    print(f"at {max(rates)} requests/s offered: fastlm {top['fastlm']['requests_per_s']:.2f} req/s (p99 TTFT "
          f"{top['fastlm']['ttft_p99_s']:.2f} s), transformers {top['transformers']['requests_per_s']:.2f} req/s "
          f"(p99 TTFT {top['transformers']['ttft_p99_s']:.2f} s): "
          f"{top['fastlm']['requests_per_s'] / top['transformers']['requests_per_s']:.2f}x")
    print(f"wrote {csv_path} and {png}")


if __name__ == "__main__":
    main()
