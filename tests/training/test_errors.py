"""Bad inputs give clear ValueError / FileNotFoundError messages (and one line + exit code 2 on the CLI)."""
import pytest

import fastlm
from fastlm.cli import main
from tests.training.runs import TINY_RUN


@pytest.fixture
def base(corpus, tokenizer_dir, tmp_path):
    return dict(TINY_RUN, data=corpus[0], tokenizer=tokenizer_dir, out=tmp_path / "out", steps=1, device="cpu")


def test_missing_data_file(base, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.txt"):
        fastlm.train(**dict(base, data=tmp_path / "nope.txt"))


def test_missing_eval_file(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="eval file not found"):
        fastlm.train(**dict(base, eval=tmp_path / "nope.txt"))


def test_empty_data_file(base, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="data file .*empty"):
        fastlm.train(**dict(base, data=empty))


def test_data_shorter_than_one_block(base, tmp_path, reference_kernels):
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data is too short: \d+ tokens, one block needs block_size \+ 1 = 33"):
        fastlm.train(**dict(base, data=short))


def test_block_size_larger_than_the_context(base, reference_kernels):
    with pytest.raises(ValueError, match=r"block_size \(257\) is larger than the model's context \(256 tokens\)"):
        fastlm.train(**dict(base, block_size=257))


def test_unknown_config_lists_the_known_ones(base):
    with pytest.raises(ValueError, match="unknown config name 'huge'; known configs: default, gpt2, medium, small, tiny"):
        fastlm.train(**dict(base, config="huge"))


@pytest.mark.parametrize("option,value", [
    ("lr", -1e-3), ("lr", 0), ("steps", 0), ("batch_size", 0), ("block_size", -5), ("grad_accum", 0),
    ("warmup", -1), ("clip", -1.0), ("epochs", 0.0), ("min_lr_ratio", 1.5), ("weight_decay", -0.1),
    ("eval_every", -1), ("seed", -1), ("steps", 2.5), ("batch_size", True), ("lr", float("nan")),
    ("precision", "fp8"), ("vocab_size", 10),
])
def test_bad_numeric_options_name_the_option(base, option, value):
    with pytest.raises(ValueError, match=option):
        fastlm.train(**dict(base, **{option: value}))


def test_conflicting_and_unknown_options(base, tmp_path):
    with pytest.raises(ValueError, match="either model .* or config"):
        fastlm.train(**dict(base, model=tmp_path))
    with pytest.raises(ValueError, match="either steps or epochs"):
        fastlm.train(**dict(base, epochs=1.0))
    with pytest.raises(ValueError, match="unknown training option.*learning_rate"):
        fastlm.train(**dict(base, learning_rate=1e-3))


def test_missing_model_folder(base, tmp_path):
    with pytest.raises(ValueError, match="model path does not exist"):
        fastlm.train(**dict(base, config=None, model=tmp_path / "nowhere"))


def test_batch_size_larger_than_the_data(base, reference_kernels):
    with pytest.raises(ValueError, match=r"batch_size \(100000\) is larger than the number of training blocks"):
        fastlm.train(**dict(base, batch_size=100000))


def test_evaluate_errors(corpus, tmp_path, reference_kernels):
    with pytest.raises(ValueError, match="model path does not exist"):
        fastlm.evaluate(tmp_path / "nowhere", corpus[1])
    with pytest.raises(ValueError, match="data must be"):
        fastlm.evaluate(tmp_path, None)


def test_cli_reports_one_line_and_exit_code_2(corpus, tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope.txt"), "--config", "tiny", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastlm train: error: data file not found") and err.count("\n") == 1
    assert main(["train", "--data", str(corpus[0]), "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "known configs: default, gpt2" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--data", str(corpus[1])]) == 2
    assert "model path does not exist" in capsys.readouterr().err
