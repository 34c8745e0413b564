"""`fastlm generate` options reach the API (--stop, --seed, --min-p, --repetition-penalty), the dtype
aliases, `fastlm bench`'s weight bytes against the checkpoint's tensors counted independently, bench's
argument errors and --device cuda without CUDA: one stderr line, exit code 2."""
import re

import pytest
import torch
from safetensors.torch import load_file

import fastlm
from tests.runtime.test_errors import run_cli
from tests.runtime.test_generate import clean_substring

PROMPT = "Once upon a time"


@pytest.fixture
def llama(llms, checkpoints, reference_kernels):
    """The Llama checkpoint: its greedy text is readable (the GPT-2 one writes broken UTF-8)."""
    return llms["llama_gqa"], str(checkpoints["llama_gqa"][0])


def cli_text(capsys, llm, folder, *options):
    """What `fastlm generate` prints for PROMPT, on the device of the LLM it is compared with (seeded
    sampling draws different numbers on a GPU)."""
    code, out, err = run_cli(capsys, "generate", PROMPT, "--model", folder, "--dtype", "float32", "--device",
                             str(llm.device), "--max-new-tokens", "24", *options)
    assert (code, err) == (0, ""), err
    assert out.endswith("\n")
    return out[:-1]


@pytest.mark.parametrize("stream", [[], ["--no-stream"]], ids=["stream", "no-stream"])
def test_stop_strings(llama, capsys, stream):
    llm, folder = llama
    full = llm.generate(PROMPT, max_new_tokens=24, temperature=0)
    first, second = clean_substring(full, 6, 2), clean_substring(full, 2, 1)
    assert full.index(second) < full.index(first)
    assert cli_text(capsys, llm, folder, "--temperature", "0", "--stop", first, *stream) == full[:full.index(first)]
    # Repeatable: the earliest of the stop strings ends the text.
    assert cli_text(capsys, llm, folder, "--temperature", "0", "--stop", first, "--stop", second, *stream) == \
        full[:full.index(second)]


def test_seed(llama, capsys):
    llm, folder = llama
    options = dict(max_new_tokens=24, temperature=1.5)
    assert llm.generate(PROMPT, seed=3, **options) != llm.generate(PROMPT, seed=4, **options)
    for seed in ("3", "4"):
        assert cli_text(capsys, llm, folder, "--temperature", "1.5", "--seed", seed) == \
            llm.generate(PROMPT, seed=int(seed), **options)


@pytest.mark.parametrize("flag, option, value, base", [
    ("--min-p", "min_p", 0.3, dict(temperature=3.0, seed=5)),
    ("--repetition-penalty", "repetition_penalty", 1.8, dict(temperature=0)),
    ("--repetition-penalty", "repetition_penalty", 0.6, dict(temperature=2.0, seed=5)),
    ("--top-k", "top_k", 3, dict(temperature=3.0, seed=5)),
    ("--top-p", "top_p", 0.5, dict(temperature=3.0, seed=5)),
])
def test_sampling_options_reach_the_api(llama, capsys, flag, option, value, base):
    llm, folder = llama
    expected = llm.generate(PROMPT, max_new_tokens=24, **base, **{option: value})
    assert expected != llm.generate(PROMPT, max_new_tokens=24, **base)  # the option changes this text
    args = [x for k, v in base.items() for x in (f"--{k}", str(v))]  # temperature and seed
    assert cli_text(capsys, llm, folder, *args, flag, str(value)) == expected


@pytest.mark.parametrize("args, message", [
    (["--min-p", "1.5"], r"min_p must be in [0, 1]"),
    (["--min-p", "-0.1"], r"min_p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    (["--stop", ""], "stop must be"),
    (["--seed", "-1"], "seed must be in [0, 18446744073709551615]"),
    (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["--compile", "--tensor-parallel-size", "2"], "--compile is not available with --tensor-parallel-size > 1"),
])
def test_generate_option_errors(checkpoints, capsys, args, message):
    code, out, err = run_cli(capsys, "generate", PROMPT, "--model", str(checkpoints["gpt2"][0]), *args)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("fastlm generate: error: ") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_device_cuda_without_cuda(checkpoints, capsys, command):
    args = [PROMPT] if command == "generate" else []
    code, out, err = run_cli(capsys, command, *args, "--model", str(checkpoints["gpt2"][0]), "--device", "cuda")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err == f"fastlm {command}: error: device 'cuda' requested but CUDA is not available\n"


def read_bytes_per_step(folder, element_size):
    """What one decode step reads, counted from the checkpoint file: every tensor but the input embedding
    and learned positions (it gathers B rows of those), plus the embedding once more when it is also the
    LM head (a tied checkpoint stores no lm_head.weight)."""
    tensors = load_file(folder / "model.safetensors")
    embedding = next(t for name, t in tensors.items() if name.endswith(("wte.weight", "embed_tokens.weight")))
    read = [t for name, t in tensors.items() if not name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight"))]
    tied = not any(name.endswith("lm_head.weight") for name in tensors)
    return (sum(t.numel() for t in read) + tied * embedding.numel()) * element_size


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])  # tied with learned positions; untied rope
@pytest.mark.parametrize("alias, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                                          ("bfloat16", torch.bfloat16)])
def test_bench_weight_bytes_and_dtype_aliases(checkpoints, reference_kernels, capsys, name, alias, dtype):
    folder = checkpoints[name][0]
    code, out, err = run_cli(capsys, "bench", "--model", str(folder), "--dtype", alias, "--device", "cpu",
                             "--batch-size", "1", "2", "--prompt-len", "5", "--new-tokens", "3", "--repeats", "1")
    assert (code, err) == (0, ""), err
    header, _, *rows = out.strip().splitlines()
    assert f", {dtype}, cpu)" in header
    weight_gb = float(re.search(r"weights (\S+) GB per step", header).group(1))
    expected = read_bytes_per_step(folder, dtype.itemsize) / 1e9
    assert weight_gb == pytest.approx(expected, rel=5e-4)  # printed with 4 significant digits
    for row in rows:
        batch, _, decode_tok_s, weights_gbs = (float(x) for x in row.split())
        assert weights_gbs == pytest.approx(decode_tok_s / batch * expected, rel=1e-3, abs=6e-3)  # rounding
    assert [int(row.split()[0]) for row in rows] == [1, 2]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "2", "0"], "batch_size must be >= 1, got 0"),
    (["--prompt-len", "0"], "prompt_len must be >= 1, got 0"),
    (["--new-tokens", "-3"], "new_tokens must be >= 1, got -3"),
    (["--repeats", "0"], "repeats must be >= 1, got 0"),
    (["--prompt-len", "90", "--new-tokens", "7"], "prompt_len + new_tokens (97) exceeds the model's context (96)"),
    (["--dtype", "fp16", "--device", "gpu"], "device must be"),
])
def test_bench_argument_errors(checkpoints, capsys, args, message):
    code, out, err = run_cli(capsys, "bench", "--model", str(checkpoints["gpt2"][0]), *args)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("fastlm bench: error: ") and message in err


def test_bench_rejects_an_unknown_dtype_before_loading(checkpoints, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's choices: usage + one error line, exit code 2
        fastlm.cli.main(["bench", "--model", str(checkpoints["gpt2"][0]), "--dtype", "int8"])
    assert exc.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_compile_flag_reaches_the_engine(llama, capsys, monkeypatch):
    """--compile: the same greedy text; bench reports the decode-step choice per bucket (forced eager here:
    the compiled path itself is tested in test_compiled_step.py)."""
    monkeypatch.setenv("FASTLM_CPU_KERNELS", "eager")
    llm, folder = llama
    if llm.device.type != "cpu":
        pytest.skip("--compile is for CPU runs; the test LLMs are on a GPU (FASTLM_TEST_DEVICE=cuda)")
    full = llm.generate(PROMPT, max_new_tokens=24, temperature=0)
    assert cli_text(capsys, llm, folder, "--temperature", "0", "--compile") == full
    code, out, err = run_cli(capsys, "bench", "--model", folder, "--device", "cpu", "--compile", "--batch-size", "1",
                             "--prompt-len", "5", "--new-tokens", "3", "--repeats", "1")
    assert (code, err) == (0, ""), err
    assert re.search(r"CPU decode step float32\|llama-rmsnorm-swiglu\|L2d64h4kv2f96v\d+\|unquantized\|rows=1\|t\d+: eager", out)
