"""`fastlm generate` and `fastlm bench`, registered by fastlm/cli.py.

Arguments are checked (SamplingParams, the prompt) before the model loads, so a bad flag fails fast.
Errors are the API's ValueErrors; fastlm/cli.py prints them as one line and exits with code 2.
"""
import sys

from fastlm.model.validation import check_int, check_number
from fastlm.runtime.cpu_threads import set_threads
from fastlm.runtime.sampling import SamplingParams

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
QUANTIZE_CHOICES = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128")


def add_parsers(subparsers) -> None:
    _add_generate(subparsers)
    _add_bench(subparsers)


def _add_model_args(parser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="weight-only quantized linear layers (int4 = groups of 128 columns)")
    parser.add_argument("--quantize-head", action="store_true",
                        help="with --quantize: also quantize the token embedding and the LM head")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the physical cores available), per rank with "
                             "--tensor-parallel-size (default: the physical cores / the ranks)")
    parser.add_argument("--compile", action="store_true",
                        help="CPU: decode steps through torch.compile where timed faster (the first step of "
                             "each batch size compiles: seconds to minutes; the choice is cached per machine)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model across N processes (CPU: gloo; CUDA: one GPU each; "
                             "under torchrun: its N ranks)")
    parser.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="with --tensor-parallel-size: seconds a rank waits for the others before failing "
                             "(default 300)")


def check_model_args(args) -> None:
    """The model flags that can be checked before the model loads."""
    check_int("tensor_parallel_size", args.tensor_parallel_size, 1)
    check_int("threads", args.threads, 1, optional=True)
    check_number("dist_timeout", args.dist_timeout, 0, min_open=True, optional=True)
    if args.tensor_parallel_size > 1 and getattr(args, "quantize", None) is not None:
        raise ValueError("--quantize is not available with --tensor-parallel-size > 1")
    if args.tensor_parallel_size > 1 and args.compile:
        raise ValueError("--compile is not available with --tensor-parallel-size > 1")
    if getattr(args, "quantize_head", False) and getattr(args, "quantize", None) is None:
        raise ValueError("--quantize-head needs --quantize (int8 or int4)")


def load_llm(args, **engine_options):
    """(LLM of the model flags, CPU threads per rank): one process with --threads torch threads, or
    --tensor-parallel-size ranks with --threads each."""
    from fastlm.runtime.llm import LLM

    quantize = getattr(args, "quantize", None)
    if args.compile:
        engine_options = dict(engine_options, compile=True)
    if args.tensor_parallel_size == 1:
        threads = set_threads(args.threads)
        return LLM(args.model, dtype=args.dtype, device=args.device, quantize=quantize,
                   quantize_head=getattr(args, "quantize_head", False), **engine_options), threads
    timeout = {} if args.dist_timeout is None else {"dist_timeout": args.dist_timeout}
    llm = LLM(args.model, dtype=args.dtype, device=args.device, quantize=quantize,
              tensor_parallel_size=args.tensor_parallel_size, threads_per_rank=args.threads, **timeout,
              **engine_options)
    return llm, llm.parallel.threads


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    p.add_argument("prompt", help="the prompt text")
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from fastlm.runtime.llm import check_text_prompts

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                   stop=args.stop, seed=args.seed)
    SamplingParams(**options)  # fail before loading the model
    check_text_prompts(args.prompt)
    check_model_args(args)
    llm, _ = load_llm(args)
    with llm:  # closing stops the other tensor-parallel ranks
        if args.no_stream:
            print(llm.generate(args.prompt, **options))
            return 0
        for piece in llm.stream(args.prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="prefill and decode tokens/s (optionally against transformers)")
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' generate")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    for name in ("prompt_len", "new_tokens", "repeats"):
        check_int(name, getattr(args, name), 1)
    for batch in args.batch_size:
        check_int("batch_size", batch, 1)
    check_model_args(args)
    largest = max(args.batch_size)  # the engine prefills every prompt in one step, recomputing each repeat
    llm, threads = load_llm(args, max_num_seqs=largest, max_num_batched_tokens=largest * args.prompt_len,
                            enable_prefix_caching=False)
    with llm:  # closing stops the other tensor-parallel ranks
        _bench(args, llm, threads)
    return 0


def _bench(args, llm, threads) -> None:
    from fastlm.runtime import bench

    context = llm.model.config.max_seq_len
    if args.prompt_len + args.new_tokens > context:
        raise ValueError(f"prompt_len + new_tokens ({args.prompt_len + args.new_tokens}) exceeds the model's "
                         f"context ({context})")
    hf_model = _load_hf(llm) if args.compare_hf else None
    weight_gb = bench.whole_model_weight_bytes(llm.model) / 1e9
    print(f"model {llm.path} ({llm.model.config.model_type}, {llm.model.dtype}, {llm.device}); "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; weights {weight_gb:.4g} GB per step; "
          + _configuration(args.tensor_parallel_size, threads if llm.device.type == "cpu" else None))
    header = f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'weights GB/s':>13}"
    print(header + (f" {'HF prefill':>11} {'HF decode':>10} {'decode x HF':>11}" if hf_model else ""))
    for batch in args.batch_size:
        runs = {"fastlm": bench.engine_run(llm.engine, batch, args.prompt_len, args.new_tokens)}
        if hf_model is not None:  # in turns with fastlm's, repeat by repeat
            runs["hf"] = bench.hf_run(hf_model, batch, args.prompt_len, args.new_tokens)
        speeds = bench.alternate_speeds(runs, batch, args.prompt_len, args.new_tokens, args.repeats)
        ours = speeds["fastlm"]
        line = (f"{batch:>5} {ours['prefill_tok_s']:>14.1f} {ours['decode_tok_s']:>13.1f} "
                f"{ours['decode_tok_s'] / batch * weight_gb:>13.2f}")
        if hf_model is not None:
            theirs = speeds["hf"]
            line += (f" {theirs['prefill_tok_s']:>11.1f} {theirs['decode_tok_s']:>10.1f} "
                     f"{ours['decode_tok_s'] / theirs['decode_tok_s']:>11.2f}")
        print(line, flush=True)
    _print_kernel_choices(llm.model)
    _print_step_choices(llm.engine)


def _configuration(ranks: int, threads) -> str:
    """'1 rank x 2 CPU threads', '2 ranks (tensor-parallel) x 1 CPU threads'; no threads on a GPU."""
    text = "1 rank" if ranks == 1 else f"{ranks} ranks (tensor-parallel)"
    return text if threads is None else f"{text} x {threads} CPU threads"


def _print_kernel_choices(model) -> None:
    """The CPU linear kernels chosen per (dtype, shape, input rows, threads), see cpu_linear.py."""
    from fastlm.kernels import cpu_choice
    from fastlm.kernels.gemv import cpu_gemv_build_error
    from fastlm.runtime.cpu_linear import linear_choices

    from fastlm.kernels._quant_cpu import choices as quantized_choices
    from fastlm.kernels.quant import QuantLinear

    choices = dict(linear_choices(model))
    formats = {f"int{m.bits}" for m in model.modules() if isinstance(m, QuantLinear)}
    choices.update({f"{fmt}_linear|{str(dtype).removeprefix('torch.')}|{size}|{shape}": name
                    for (fmt, dtype, size, shape), name in quantized_choices().items() if fmt in formats})
    if not choices:
        return
    forced = cpu_choice.forced_choice("linear")
    source = f"forced by {cpu_choice.ENV_FORCE}" if forced else f"timed, cached in {cpu_choice.default_cache().path}"
    print(f"CPU linear kernels ({source}):")
    gemv_error = cpu_gemv_build_error()
    if gemv_error:
        print(f"  (fastlm's GEMV is not a candidate here: {gemv_error})")
    for key, name in sorted(choices.items()):
        print(f"  {key}: {name}")


def _print_step_choices(engine) -> None:
    """With --compile: eager or compiled decode step per batch bucket (compiled_step.py)."""
    from fastlm.runtime.compiled_step import CompiledDecodeSteps, step_key

    steps = getattr(engine.runner, "graphs", None)
    if not isinstance(steps, CompiledDecodeSteps):
        return
    if steps.compile_error:
        print(f"CPU decode steps: eager (torch.compile failed: {steps.compile_error})")
    for bucket, name in sorted(steps.choices.items()):
        print(f"CPU decode step {step_key(engine.model, bucket)}: {name}")


def _load_hf(llm):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError("--compare-hf needs transformers (pip install transformers)") from None
    return AutoModelForCausalLM.from_pretrained(llm.path, dtype=llm.model.dtype).to(llm.device).eval()
