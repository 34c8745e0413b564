"""Every user error: the API raises ValueError naming the argument; the command line prints the same
words on one stderr line and exits with code 2 (no traceback)."""
import pytest

import fastlm
import fastlm.model.model_path as model_path
from fastlm.cli import main
from tests.runtime.checkpoints import CONTEXT

TOO_LONG = "a b " * CONTEXT  # more tokens than the context

API_CASES = [
    (dict(prompt=""), "empty prompt"),
    (dict(prompt=["fine", ""]), "empty prompt"),
    (dict(prompt=TOO_LONG), f"the model's context is {CONTEXT} tokens"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(stop=[""]), "stop must be"),
]


@pytest.mark.parametrize("kwargs, message", API_CASES)
def test_generate_raises_value_error(llms, reference_kernels, kwargs, message):
    kwargs = {"prompt": "Once upon a time", "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        llms["gpt2"].generate(**kwargs)


@pytest.mark.parametrize("prompts, message", [
    ([], "non-empty list"),
    ([[1, 2], []], "empty prompt"),
    ([[1, 10**6]], "not a token id"),
    ([[1, -1]], "not a token id"),
    ([[1, CONTEXT] * CONTEXT], "context"),
])
def test_generate_tokens_raises_value_error(llms, reference_kernels, prompts, message):
    with pytest.raises(ValueError, match=message):
        llms["gpt2"].generate_tokens(prompts, max_new_tokens=2)


def test_stream_checks_its_arguments(llms):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        next(llms["gpt2"].stream("hi", temperature=-1))


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match="model path does not exist"):
        fastlm.LLM(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        fastlm.LLM(str(tmp_path))


def test_no_default_model_says_to_pass_a_path(tmp_path, monkeypatch):
    monkeypatch.setattr(model_path, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(ValueError, match="pass a checkpoint path"):
        fastlm.LLM()


def test_bad_device_and_dtype(checkpoints):
    folder = str(checkpoints["gpt2"][0])
    with pytest.raises(ValueError, match="device must be"):
        fastlm.LLM(folder, device="tpu")
    with pytest.raises(ValueError, match="dtype must be"):
        fastlm.LLM(folder, dtype="int8")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


CLI_CASES = [
    ([""], "empty prompt"),
    (["hi", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["hi", "--top-p", "0"], r"top_p must be in (0, 1]"),
    (["hi", "--top-p", "2"], r"top_p must be in (0, 1]"),
    (["hi", "--top-k", "-1"], "top_k must be >= 0"),
    ([TOO_LONG], f"the model's context is {CONTEXT} tokens"),
]


@pytest.mark.parametrize("args, message", CLI_CASES)
def test_cli_errors_exit_2_with_one_line(checkpoints, reference_kernels, capsys, args, message):
    code, out, err = run_cli(capsys, "generate", *args, "--model", str(checkpoints["gpt2"][0]))
    assert code == 2 and out == ""
    assert err.startswith("fastlm generate: error: ") and err.count("\n") == 1
    assert message in err


def test_cli_unknown_model_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tmp_path / "nope"))
    assert code == 2 and "model path does not exist" in err and err.count("\n") == 1


def test_cli_generate_streams_the_api_text(llms, checkpoints, reference_kernels, capsys):
    folder = str(checkpoints["gpt2"][0])
    expected = llms["gpt2"].generate("Once upon", max_new_tokens=12, temperature=0)
    for extra in ([], ["--no-stream"]):
        code, out, err = run_cli(capsys, "generate", "Once upon", "--model", folder, "--max-new-tokens", "12",
                                 "--temperature", "0", "--dtype", "float32", "--device", str(llms["gpt2"].device), *extra)
        assert (code, out, err) == (0, expected + "\n", "")


def test_cli_bench_prints_a_table(checkpoints, reference_kernels, capsys):
    code, out, _ = run_cli(capsys, "bench", "--model", str(checkpoints["llama_gqa"][0]), "--batch-size", "1", "3",
                           "--prompt-len", "9", "--new-tokens", "4", "--repeats", "1", "--compare-hf")
    lines = out.strip().splitlines()
    assert code == 0 and "decode x HF" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["1", "3"]
    assert all(float(x) >= 0 for line in lines[2:] for x in line.split()[1:])


def test_cli_bench_errors(checkpoints, capsys):
    code, _, err = run_cli(capsys, "bench", "--model", str(checkpoints["gpt2"][0]), "--prompt-len", "90",
                           "--new-tokens", "50")
    assert code == 2 and "exceeds the model's context" in err


def test_checkpoint_without_tokenizer_generates_tokens_only(checkpoints, llms, reference_kernels, tmp_path):
    import shutil

    source = checkpoints["gpt2"][0]
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(source / name, tmp_path / name)
    bare = fastlm.LLM(str(tmp_path), dtype="float32")
    assert bare.tokenizer is None and bare.eos_token_ids == llms["gpt2"].eos_token_ids
    expected = llms["gpt2"].generate_tokens([[5, 6, 7]], max_new_tokens=6, temperature=0)
    assert bare.generate_tokens([[5, 6, 7]], max_new_tokens=6, temperature=0) == expected
    with pytest.raises(ValueError, match="has no tokenizer"):
        bare.generate("hello")
