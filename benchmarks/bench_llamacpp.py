"""CPU decode at batch 1: fastlm against llama.cpp (through llama-cpp-python) on the same random checkpoint.

For a GPT-2-124M-shaped and a Llama-150M-shaped checkpoint (as in bench_generate.py), fp32, bf16 and int8
(fastlm's weight-only int8 with the embedding and LM head quantized, bf16 activations, against llama.cpp's
Q8_0 file, which quantizes the activations too):
the checkpoint is saved with transformers, loaded by fastlm.LLM, and written as GGUF for llama.cpp
(benchmarks/gguf_export.py). Both decode greedily from the same random prompt, eos ignored, with the
same number of threads; rounds alternate fastlm / llama.cpp and the medians are reported:
- prefill: seconds to the first new token (the prompt's forward + one argmax);
- decode tok/s: (new_tokens - 1) / (time to the last token - time to the first);
- agreement: how many leading greedy tokens are identical (the faithfulness check: with the same
  weights both must pick the same argmax until rounding differences meet a near tie);
- weights GB/s of fastlm's decode and its fraction of the read bandwidth measured in this run.
llama.cpp runs in a subprocess driven over a pipe (one JSON line per request): if it crashes (a
segmentation fault was seen with Q8_0 on an AMX machine), the row says so and the benchmark goes on.

    pip install 'fastlm[llamacpp]'     # llama-cpp-python (builds llama.cpp with CMake) and gguf
    python benchmarks/bench_llamacpp.py [--threads 2] [--quick] [--no-compile]
Threads default to the physical cores; decode steps compile where timed faster (--no-compile: eager).
Writes benchmarks/out/bench_llamacpp.csv and .png. Exit code 2 when llama_cpp is not installed.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_generate import FULL, QUICK, save_random_checkpoint  # noqa: E402
from benchmarks.common import base_parser, plot, write_csv  # noqa: E402

INSTALL_HINT = ("bench_llamacpp.py needs llama-cpp-python and gguf: pip install 'fastlm[llamacpp]' "
                "(or pip install llama-cpp-python gguf; llama.cpp builds from source with CMake, ~10 minutes on 2 cores)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "q8_0"}  # name -> write_gguf's dtype
# fastlm.LLM's options per name: int8 is fastlm's weight-only int8 with the embedding / LM head quantized too,
# against llama.cpp's Q8_0 file (every matrix in Q8_0; llama.cpp also quantizes the activations to 8 bits)
LLM_OPTIONS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
               "int8": dict(dtype="bfloat16", quantize="int8", quantize_head=True)}


def peer_worker(gguf_path: str, threads: int, context: int) -> None:
    """Runs in the subprocess: loads the GGUF once, then answers each {"prompt", "new_tokens"} line on
    stdin with {"tokens", "first_s", "total_s"} (greedy argmax over llama.cpp's logits)."""
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                n_batch=context, verbose=False)
    print(json.dumps({"version": llama_cpp.__version__}), flush=True)
    n_vocab = llm.n_vocab()

    def last_logits():  # the last evaluated position's logits (llm.scores stays empty without logits_all)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    for line in sys.stdin:
        request = json.loads(line)
        llm.reset()
        tokens, start = [], time.perf_counter()
        llm.eval(request["prompt"])
        for i in range(request["new_tokens"]):
            token = int(np.argmax(last_logits()))
            tokens.append(token)
            if i == 0:
                first = time.perf_counter() - start
            if i + 1 < request["new_tokens"]:
                llm.eval([token])
        print(json.dumps({"tokens": tokens, "first_s": first, "total_s": time.perf_counter() - start}), flush=True)


class Peer:
    """The llama.cpp subprocess; `run` returns None (and keeps `error`) once it has died."""

    def __init__(self, gguf_path: str, threads: int, context: int):
        command = [sys.executable, os.path.abspath(__file__), "--peer-worker", gguf_path, str(threads), str(context)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.error = None
        self.version = (self._read() or {}).get("version", "?")

    def run(self, prompt, new_tokens):
        if self.error is None:
            self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
            self.proc.stdin.flush()
        return self._read()

    def _read(self):
        if self.error is not None:
            return None
        line = self.proc.stdout.readline()
        if line:
            return json.loads(line)
        code = self.proc.wait()
        tail = self.proc.stderr.read().strip().splitlines()[-1:] or [""]
        self.error = f"llama.cpp exited with code {code} {tail[0]}".strip()
        print(f"  peer failed: {self.error}", flush=True)
        return None

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def fastlm_run(llm, prompt, new_tokens):
    """The same figures for fastlm: one call for the first token, one for all of them."""
    start = time.perf_counter()
    llm.generate_tokens([prompt], max_new_tokens=1, temperature=0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokens = llm.generate_tokens([prompt], max_new_tokens=new_tokens, temperature=0)[0]
    return {"tokens": tokens, "first_s": first, "total_s": time.perf_counter() - start}


def decode_tok_s(run, new_tokens):
    return (new_tokens - 1) / max(run["total_s"] - run["first_s"], 1e-9)


def agreement(a, b) -> int:
    """Leading tokens that are identical."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def strip_eos(folder: str) -> None:
    """Random weights may pick eos early: drop it from the saved configs so that every run decodes in full."""
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            data.pop("eos_token_id", None)
            with open(path, "w") as f:
                json.dump(data, f)


def bench_config(name, hf_model, folder, dtype_name, args, read_gbs, tmp):
    """One (model, dtype) row: alternating rounds of fastlm and llama.cpp, medians."""
    from benchmarks.gguf_export import write_gguf
    from fastlm import LLM
    from fastlm.runtime.bench import weight_bytes_per_step
    from fastlm.runtime.cpu_threads import on_passing_thread

    # setup's torch work on threads that end (on_passing_thread): as in a user's process, the thread that
    # waits for fastlm's tokens holds no OpenMP pool of its own while the engine thread decodes
    gguf_path = on_passing_thread(write_gguf, hf_model, os.path.join(tmp, f"{name}-{dtype_name}.gguf"),
                                  DTYPES[dtype_name])
    llm = LLM(folder, device="cpu", compile=args.compile, **LLM_OPTIONS[dtype_name])
    torch.manual_seed(0)
    prompt = torch.randint(0, hf_model.config.vocab_size, (args.prompt_len,)).tolist()
    peer = Peer(gguf_path, args.threads, args.prompt_len + args.new_tokens + 8)
    ours, theirs = [], []
    try:
        fastlm_run(llm, prompt, args.new_tokens)  # warm-up (and the CPU kernel choice, once per machine)
        peer.run(prompt, args.new_tokens)
        for _ in range(args.rounds):
            ours.append(fastlm_run(llm, prompt, args.new_tokens))
            result = peer.run(prompt, args.new_tokens)
            if result is not None:
                theirs.append(result)
    finally:
        peer.close()
    ours_tok_s = statistics.median(decode_tok_s(r, args.new_tokens) for r in ours)
    theirs_tok_s = statistics.median(decode_tok_s(r, args.new_tokens) for r in theirs) if theirs else float("nan")
    weight_gb = weight_bytes_per_step(llm.model) / 1e9
    return {"model": name, "dtype": dtype_name, "threads": args.threads, "prompt": args.prompt_len,
            "new_tokens": args.new_tokens, "fastlm_tok_s": round(ours_tok_s, 2),
            "llamacpp_tok_s": round(theirs_tok_s, 2), "ratio": round(ours_tok_s / theirs_tok_s, 3),
            "fastlm_prefill_ms": round(1e3 * statistics.median(r["first_s"] for r in ours), 1),
            "llamacpp_prefill_ms": round(1e3 * statistics.median(r["first_s"] for r in theirs), 1) if theirs else "",
            "agree": f"{agreement(ours[0]['tokens'], theirs[0]['tokens'])}/{args.new_tokens}" if theirs else "",
            "fastlm_weights_gbs": round(ours_tok_s * weight_gb, 2),
            "roofline": round(ours_tok_s * weight_gb / read_gbs, 3), "read_gbs": round(read_gbs, 1),
            "llamacpp_version": peer.version, "peer_error": peer.error or "", "compile": args.compile,
            "decode_step": _step_choice(llm)}


def _step_choice(llm) -> str:
    """With --compile: "compiled" or "eager", as timed (or cached) for batch-1 steps; else "eager"."""
    steps = getattr(llm.engine.runner, "graphs", None)
    return "eager" if steps is None else steps.choices.get(1, "eager")


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0], threads_default=None)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--models", nargs="+", default=None, help="subset of the model names")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="fastlm decode steps through torch.compile where timed faster (LLM(compile=True), "
                             "the default: the issue's configuration); --no-compile: eager steps")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    from fastlm.runtime.bench import read_bandwidth_gbs
    from fastlm.runtime.cpu_threads import on_passing_thread, set_threads

    args.threads = set_threads(args.threads)
    args.prompt_len, args.new_tokens = (16, 16) if args.quick else (16, 64)
    configs = QUICK if args.quick else FULL
    read_gbs = on_passing_thread(read_bandwidth_gbs, "cpu")
    print(f"CPU {cpu_model()}, {args.threads} threads, torch {torch.__version__}; read bandwidth {read_gbs:.1f} GB/s; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.rounds} alternating rounds", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, kwargs) in configs.items():
            if args.models and name not in args.models:
                continue
            folder = on_passing_thread(save_random_checkpoint, family, kwargs, os.path.join(tmp, name))
            strip_eos(folder)
            hf_model = on_passing_thread(load_hf, family, folder)
            for dtype_name in args.dtypes:
                row = bench_config(name, hf_model, folder, dtype_name, args, read_gbs, tmp)
                print(json.dumps(row), flush=True)
                rows.append(row)
    csv_path = write_csv(rows, os.path.join(args.out, "bench_llamacpp.csv"))
    png_path = plot(rows, os.path.join(args.out, "bench_llamacpp.png"), x="threads", y="ratio",
                    series=lambda r: f"{r['model']} {r['dtype']}", title="batch-1 decode tokens/s, fastlm / llama.cpp",
                    ylabel="fastlm / llama.cpp", hline=1.0, hline_label="llama.cpp", logx=False)
    print(f"wrote {csv_path} and {png_path}")
    return 0


def load_hf(family, folder):
    import transformers as tf

    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM}[family]
    return cls.from_pretrained(folder, dtype=torch.float32)


def cpu_model() -> str:
    from fastlm.kernels.cpu_choice import machine_description

    return machine_description()["cpu"]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peer-worker":
        peer_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
