"""fastlm.LLM: the Python API, on the engine (fastlm.runtime.engine).

    llm = fastlm.LLM("path/to/checkpoint", dtype="bfloat16")
    llm.generate("Once upon a time", max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0)  # -> str
    llm.generate(["first prompt", "second"], max_new_tokens=50)                              # -> list[str]
    llm.generate("Once upon a time", n=5, temperature=1.0)                                   # -> 5 samples
    llm.generate("Hi", logprobs=3, return_details=True)            # -> Completion (text, ids, logprobs, ...)
    for piece in llm.stream("Once upon a time", max_new_tokens=50): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=50)  # the checkpoint's chat template -> str
    llm.generate_tokens([[464, 2068], [818]], max_new_tokens=20, temperature=0)            # -> list[list[int]]
    params = fastlm.SamplingParams(max_new_tokens=50, temperature=0); llm.generate("Hi", params)
    llm.stats()      # kv_blocks_total, kv_blocks_free, prefix_cache_hit_tokens, preemptions, running, waiting
    with fastlm.LLM(path, tensor_parallel_size=2) as llm: ...   # the model split across 2 processes (below)

Every call submits one request per prompt to the LLM's engine, whose step loop runs on one background
thread (EngineLoop): any number of threads and interleaved generators can share one LLM, each getting
exactly the output it would get alone (greedy; seeded sampling too, as each request has its own
generator). Sampling options are SamplingParams' fields, given as keywords or as one SamplingParams.

Tensor parallelism (tensor_parallel_size=N > 1, see fastlm.runtime.parallel): this process is rank 0
and holds 1/N of the weights and the engine; it starts ranks 1..N-1 as subprocesses on this machine
(CPU: gloo, threads_per_rank threads each, default physical cores / N, rank 0 included; CUDA: NCCL,
rank r on cuda:r). Under torchrun (WORLD_SIZE = N) every rank runs the script: on rank 0 LLM(...)
returns, on the others it serves rank 0's steps and then ends the process (exit 0 once rank 0
closes). close() (or leaving a `with` block, or the end of the program) stops the other ranks; a rank
that dies or stops answering for dist_timeout seconds makes every later call raise RankFailed, and
ends the other ranks within that timeout.

Context rule: a prompt must leave room to generate (prompt tokens < the model's context, else
ValueError); each prompt's max_new_tokens is clipped so that it plus the prompt fit the context
(generation then ends early, as at max_new_tokens, with finish_reason "length").
"""
import dataclasses
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch

from fastlm.model.devices import resolve_device
from fastlm.model.json_files import eos_id_list, read_json_object
from fastlm.model.loading import resolve_dtype
from fastlm.model.validation import check_int
from fastlm.model.model_path import resolve_model_path
from fastlm.runtime.cpu_linear import pack_linears, packing_available
from fastlm.runtime.cpu_threads import on_passing_thread
from fastlm.runtime.engine import Engine
from fastlm.runtime.engine.background import EngineLoop
from fastlm.runtime.parallel.ranks import DEFAULT_TIMEOUT_S
from fastlm.runtime.prompts import check_prompt_ids
from fastlm.runtime.results import Completion, shape
from fastlm.runtime.sampling import SamplingParams

ENGINE_OPTIONS = ("block_size", "kv_cache_memory", "gpu_memory_utilization", "max_num_seqs",
                  "max_num_batched_tokens", "enable_prefix_caching", "cuda_graphs", "compile")
SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def check_text_prompts(prompt) -> List[str]:
    """A str or a non-empty list of str, none empty; ValueError naming the argument otherwise."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(text).__name__} at {i}")
        if not text:
            raise ValueError("prompt must not be empty (empty prompt)")
    return list(prompts)


def sampling_params(params: Optional[SamplingParams], options: dict) -> SamplingParams:
    """The one SamplingParams of a call: `params`, or one built from keyword options (not both)."""
    if params is not None:
        if options:
            raise ValueError(f"pass sampling options either as a SamplingParams or as keywords, not both "
                             f"(got params and {sorted(options)})")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a fastlm.SamplingParams, got {type(params).__name__}")
        return params
    unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown sampling option(s) {unknown}; the options are {list(SAMPLING_OPTIONS)}")
    return SamplingParams(**options)


def _quant_config(quantize, quantize_head):
    from fastlm.model.quantize import parse_quantize

    if not isinstance(quantize_head, bool):
        raise ValueError(f"quantize_head must be True or False, got {quantize_head!r}")
    if quantize_head and quantize is None:
        raise ValueError("quantize_head=True needs quantize (\"int8\" or \"int4\")")
    return parse_quantize(quantize, quantize_head) if isinstance(quantize, str) else quantize


class LLM:
    """A checkpoint loaded for generation: `model` (fastlm.model.Transformer), `tokenizer`, `engine`
    (fastlm.Engine) and `engine_loop` (the background thread that steps it; submit through it from
    threads or asyncio, see fastlm.runtime.engine.background). Engine options (block_size,
    kv_cache_memory, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, enable_prefix_caching,
    cuda_graphs, compile) pass through as keywords; compile=True (CPU) runs small decode steps through
    torch.compile where timed faster (fastlm.runtime.compiled_step).
    quantize: None, "int8" or "int4" (also "int4-g32" / "-g64" / "-g128"): weight-only quantized linear
    layers (fastlm.model.quantize); quantize_head=True also quantizes the token embedding and the LM head.
    A checkpoint written by `fastlm quantize` loads quantized as it is.
    tensor_parallel_size: ranks the model is split across (see the module docstring); threads_per_rank
    and dist_timeout (seconds) apply to them. With N > 1, `model` is rank 0's shard, kv_cache_memory
    is per rank, and there are no CUDA graphs or quantization."""

    def __init__(self, model: Optional[Union[str, Path]] = None, dtype=None, device=None, quantize=None,
                 quantize_head: bool = False, *, tensor_parallel_size: int = 1, threads_per_rank: Optional[int] = None,
                 dist_timeout: float = DEFAULT_TIMEOUT_S, **engine_options):
        unknown = sorted(set(engine_options) - set(ENGINE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; the options are {list(ENGINE_OPTIONS)}")
        check_int("tensor_parallel_size", tensor_parallel_size, 1)
        path = resolve_model_path(model)
        quantize = _quant_config(quantize, quantize_head)
        self.path, self.parallel = path, None
        if tensor_parallel_size == 1:
            if threads_per_rank is not None:
                raise ValueError("threads_per_rank applies with tensor_parallel_size > 1 "
                                 "(in one process: torch.set_num_threads)")
            # loaded, and the engine built, on a thread that ends: see on_passing_thread (OpenMP pools)
            on_passing_thread(self._load_and_build, path, dtype, device, quantize, engine_options)
            return
        self.parallel = self._start_ranks(path, tensor_parallel_size, dtype, device, quantize, threads_per_rank,
                                          dist_timeout, engine_options)
        self.model = self.parallel.model
        # rank 0's pool holds the blocks every rank agreed on; its steps go to the other ranks
        engine_options = dict(engine_options, kv_cache_memory=self.parallel.kv_cache_memory,
                              tensor_parallel=self.parallel.group)
        try:
            self._build_engine(path, engine_options)
        except BaseException:
            if self.parallel is not None:
                self.parallel.group.close()
            raise

    def _load_and_build(self, path, dtype, device, quantize, engine_options) -> None:
        self.model = self._load(path, dtype, device, quantize)
        self._build_engine(path, engine_options)

    def _build_engine(self, path: Path, engine_options: dict) -> None:
        from fastlm.model import load_tokenizer

        vocab = self.model.config.vocab_size
        self.tokenizer = load_tokenizer(path, model_vocab_size=vocab) if _has_tokenizer(path) else None
        eos = tuple(self.tokenizer.eos_token_ids or ()) if self.tokenizer else _config_eos_ids(path)
        # a vocabulary padded beyond the tokenizer's: the padding ids are never sampled
        sample_vocab = self.tokenizer.vocab_size if self.tokenizer else None
        self.engine = Engine(self.model, eos, self.tokenizer, vocab_size=sample_vocab, **engine_options)
        self.engine_loop = EngineLoop(self.engine)

    @staticmethod
    def _load(path, dtype, device, quantize):
        from fastlm.model import Transformer

        model = Transformer.from_pretrained(path, dtype=dtype, device=resolve_device(device), quantize=quantize)
        if packing_available(model.dtype, model.device):
            pack_linears(model)  # CPU: weights prepacked for oneDNN (see cpu_linear.py)
        return model

    @staticmethod
    def _start_ranks(path, size, dtype, device, quantize, threads, timeout, engine_options):
        """Every rank up with its shard (on torchrun's other ranks, this never returns)."""
        from fastlm.runtime.engine.engine import check_engine_options
        from fastlm.runtime.parallel import ParallelOptions, start_ranks

        if quantize is not None:
            raise ValueError("quantize is not available with tensor_parallel_size > 1")
        if engine_options.get("compile"):
            raise ValueError("compile=True is not available with tensor_parallel_size > 1")
        sizes = {k: v for k, v in engine_options.items() if k not in ("enable_prefix_caching", "cuda_graphs", "compile")}
        check_engine_options(**sizes)
        dtype = None if dtype is None else str(resolve_dtype(dtype)).replace("torch.", "")
        pool = {k: v for k, v in sizes.items() if k != "max_num_batched_tokens"}
        return start_ranks(ParallelOptions(path=str(path.resolve()), world_size=size, dtype=dtype,
                                           device=str(resolve_device(device)), threads=threads, timeout_s=timeout,
                                           **pool))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def eos_token_ids(self) -> tuple:
        return self.engine.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.engine.eos_token_ids = tuple(ids)

    def stats(self) -> dict:
        """The engine's counters: kv_blocks_total, kv_blocks_free, block_size, prefix_cache_hit_tokens,
        preemptions, running and waiting sequences."""
        return self.engine.stats()

    def generate(self, prompt: Union[str, Sequence[str]], params: Optional[SamplingParams] = None, *,
                 return_details: bool = False, **options):
        """New text for one prompt (-> str) or a batch (-> list[str]); the prompt is not repeated.
        Options: SamplingParams' fields (max_new_tokens=64, temperature=1.0 (0 = greedy), top_k, top_p,
        min_p, repetition_penalty, presence_penalty, frequency_penalty, stop, stop_token_ids,
        min_new_tokens, ignore_eos, seed, n, logprobs) or one SamplingParams. Ends at eos, at a stop
        string (it and what follows are dropped), or after max_new_tokens. n > 1: a list of n samples
        per prompt. return_details=True: Completion objects (fastlm.runtime.results) instead of str."""
        params = sampling_params(params, options)
        texts = check_text_prompts(prompt)
        completions = self._complete(self._encode(texts), params)
        if not return_details:
            completions = [[c.text for c in samples] for samples in completions]
        return shape(completions, isinstance(prompt, str), params.n)

    def stream(self, prompt: str, params: Optional[SamplingParams] = None, **options) -> Iterator[str]:
        """Like generate for one prompt (n = 1), yielding the text as it is produced (pieces join to
        generate's). Leaving the loop early stops the request."""
        params = sampling_params(params, options)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string for stream(), got {type(prompt).__name__}")
        if params.n != 1:
            raise ValueError(f"stream() yields one sample: n must be 1, got {params.n} (use generate)")
        request = self.engine_loop.stream(self._encode(check_text_prompts(prompt))[0], params)
        return _text_pieces(request)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], params: Optional[SamplingParams] = None, *,
                        return_details: bool = False, **options):
        """New token ids per prompt (eos excluded), options as in generate. With stop strings, a row's
        ids end with the token that completed the stop string (text cannot be cut inside a token)."""
        params = sampling_params(params, options)
        prompts = check_prompt_ids(prompts, self.model.config.vocab_size)
        if params.stop:
            self._need_tokenizer()
        completions = self._complete(prompts, params)
        if not return_details:
            completions = [[c.token_ids for c in samples] for samples in completions]
        return shape(completions, False, params.n)

    def close(self) -> None:
        """Stop the engine's background thread (also done when the LLM is garbage collected) and the
        other tensor-parallel ranks (also done at exit)."""
        self.engine_loop.shutdown()
        if self.parallel is not None:
            self.parallel.group.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        loop = getattr(self, "engine_loop", None)
        if loop is not None:
            loop.shutdown(wait=False)  # the thread holds the engine (model, KV pool): let it end

    def _complete(self, prompts: List[List[int]], params: SamplingParams) -> List[List[Completion]]:
        """Submit every prompt at once (they run together), then collect each one's n Completions."""
        for p in prompts:  # all checked before any runs
            self.engine.check_request(p, params)
        requests = [self.engine_loop.stream(p, params) for p in prompts]
        results = []
        for request in requests:
            samples = [Completion("", [], logprobs=[] if params.logprobs is not None else None)
                       for _ in range(params.n)]
            for out in request:
                samples[out.index].add(out)
            results.append(samples)
        return results

    def chat(self, messages: Sequence[dict], params: Optional[SamplingParams] = None, *,
             chat_template: Optional[str] = None, return_details: bool = False, **options):
        """The assistant's reply to messages ([{"role": ..., "content": ...}, ...]) rendered by the
        checkpoint's chat template, or by chat_template (a jinja2 template string) when given; options
        as in generate (n > 1: a list of replies). The same rendering as `fastlm serve`'s chat endpoint."""
        from fastlm.runtime.chat_template import ChatTemplate, load_chat_template, special_token_strings

        params = sampling_params(params, options)
        self._need_tokenizer()
        if chat_template is not None:
            template = ChatTemplate(chat_template, special_token_strings(self.tokenizer))
        else:
            template = load_chat_template(self.path, self.tokenizer)
            if template is None:
                raise ValueError(f"checkpoint {self.path} has no chat template (tokenizer_config.json's chat_template "
                                 "or chat_template.jinja); pass chat_template='...'")
        prompt = check_prompt_ids([template.encode(self.tokenizer, messages)], self.model.config.vocab_size,
                                  name="messages")
        completions = self._complete(prompt, params)
        if not return_details:
            completions = [[c.text for c in samples] for samples in completions]
        return shape(completions, True, params.n)

    def _encode(self, texts: List[str]) -> List[List[int]]:
        self._need_tokenizer()
        encoded = [list(self.tokenizer.encode(t)) for t in texts]
        for ids in encoded:
            if not ids:
                raise ValueError("prompt must not be empty (empty prompt)")
        return encoded

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"checkpoint {self.path} has no tokenizer (tokenizer.json or vocab.json + merges.txt); "
                             "text and stop strings need one, generate_tokens() works without")


def _text_pieces(request) -> Iterator[str]:
    try:
        for out in request:
            if out.text:
                yield out.text
    finally:
        request.close()  # a consumer that stops early aborts the request


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def _config_eos_ids(path: Path) -> tuple:
    """eos ids from generation_config.json / config.json when there is no tokenizer."""
    for name in ("generation_config.json", "config.json"):
        eos = eos_id_list(read_json_object(path / name).get("eos_token_id"))
        if eos:
            return tuple(eos)
    return ()
