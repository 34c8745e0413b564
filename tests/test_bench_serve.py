"""benchmarks/bench_serve.py's checkpoint builder: the script ran into an ImportError after the default
model's path moved (fastlm.model.model_path); the benchmark itself is too slow for CI."""
import json

from benchmarks.bench_serve import medium_checkpoint
from fastlm.model.tokenizer import load_tokenizer


def test_medium_checkpoint_has_weights_and_the_default_tokenizer(tmp_path):
    folder = medium_checkpoint(str(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["hidden_size"] == 512 and config["num_hidden_layers"] == 8
    tokenizer = load_tokenizer(folder, model_vocab_size=config["vocab_size"])
    assert tokenizer.decode(tokenizer.encode("hello world")).strip() == "hello world"
