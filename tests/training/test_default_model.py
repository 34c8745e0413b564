"""The embedded default model (fastlm/default_model/, trained by scripts/train_default_model.sh): it ships
complete and small, loads in fastlm and transformers with equal logits, has learned Python (low
perplexity on Python code, high on the same tokens shuffled), generates through fastlm.LLM() and is
what `fastlm train` fine-tunes when neither --model nor --config is given."""
import json
import math
import random

import pytest
import torch

import fastlm
from fastlm.training import DEFAULT_MODEL_DIR
from fastlm.training.evaluation import lm_loss

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Written for this test (not taken from the standard library the model was trained on).
PYTHON_SNIPPET = '''import os
import sys


class Config:
    """Settings read from the environment."""

    def __init__(self, name, default=None):
        self.name = name
        self.default = default

    def get(self):
        value = os.environ.get(self.name)
        if value is None:
            return self.default
        return value


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    for arg in argv:
        print(arg)
    return 0
'''


@pytest.fixture(scope="module")
def model_and_tokenizer(cpu_reference):
    from fastlm.model import Transformer, load_tokenizer

    return Transformer.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32, device="cpu"), \
        load_tokenizer(DEFAULT_MODEL_DIR)


def test_ships_complete_and_small():
    sizes = {name: (DEFAULT_MODEL_DIR / name).stat().st_size for name in FILES}
    assert sum(sizes.values()) <= 30 * 2**20
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["max_position_embeddings"] >= 256


def _loss(model, ids):
    with torch.no_grad():
        return lm_loss(model, torch.tensor([ids], device="cpu")).item()


def test_has_learned_python(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok.encode(PYTHON_SNIPPET)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    loss, shuffled_loss = _loss(model, ids), _loss(model, shuffled)
    assert math.exp(loss) < 12.0
    assert shuffled_loss > loss + 2.0


def test_same_logits_in_transformers(model_and_tokenizer):
    from transformers import AutoModelForCausalLM

    model, tok = model_and_tokenizer
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).to("cpu").eval()
    ids = torch.tensor([tok.encode(PYTHON_SNIPPET)[:100]], device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def _greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device="cpu"))[0, -1].argmax()))
    return ids


def test_llm_without_a_model_generates_with_it(model_and_tokenizer, reference_kernels):
    model, tok = model_and_tokenizer
    prompt = "import os\n"
    expected = _greedy(model, tok.encode(prompt), 12)[len(tok.encode(prompt)):]
    llm = fastlm.LLM(device="cpu")
    text = llm.generate(prompt, max_new_tokens=12, temperature=0)
    eos = set(tok.eos_token_ids)
    cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))  # generation stops at eos
    assert text == tok.decode(expected[:cut])
    assert cut == 0 or text.strip()


def test_train_without_model_or_config_fine_tunes_it(tmp_path, reference_kernels):
    data = tmp_path / "code.txt"
    data.write_text(PYTHON_SNIPPET * 4, encoding="utf-8")
    result = fastlm.train(data=data, out=tmp_path / "ft", steps=2, block_size=64, batch_size=2, progress=False,
                          device="cpu")
    assert result.steps == 2
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["vocab_size"] == \
        json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["vocab_size"]
