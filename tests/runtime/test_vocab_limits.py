"""The model's vocabulary against the tokenizer's (issue 11, items 5, 6 and 10's tiny temperature):
padded ids are never sampled, a tokenizer larger than the model fails at load, special ids the model
has but the tokenizer file lacks load."""
import json

import pytest
import torch

import fastlm
from tests.runtime.checkpoints import build_checkpoint

PADDING = 40
SAMPLING_MODES = [dict(temperature=0), dict(temperature=0, repetition_penalty=1.5), dict(temperature=1.0, seed=1),
                  dict(temperature=0.7, top_k=20, seed=2), dict(temperature=1.2, top_p=0.9, seed=3),
                  dict(temperature=1.0, min_p=0.05, seed=4), dict(temperature=1e-30, seed=5)]


def resized_checkpoint(folder, extra_rows):
    """The tiny Llama checkpoint with its vocabulary grown (padded) or shrunk by extra_rows; -> tokenizer size."""
    model = build_checkpoint("llama_gqa", folder)
    size = model.config.vocab_size
    model.resize_token_embeddings(size + extra_rows, mean_resizing=False)
    model.save_pretrained(folder)
    return size


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("padded")
    return folder, resized_checkpoint(folder, PADDING)


@pytest.fixture
def padded_llm(padded, reference_kernels, monkeypatch):
    """An LLM whose padded ids get the highest logits, as an untrained padding row may."""
    folder, tokenizer_size = padded
    llm = fastlm.LLM(str(folder), dtype="float32")
    forward = llm.model.forward

    def favour_padding(*args, **kwargs):
        logits = forward(*args, **kwargs)
        logits[..., tokenizer_size:] += 1e4
        return logits

    monkeypatch.setattr(llm.model, "forward", favour_padding)
    return llm, tokenizer_size


@pytest.mark.parametrize("options", SAMPLING_MODES)
def test_padded_ids_are_never_sampled(padded_llm, options):
    llm, tokenizer_size = padded_llm
    assert llm.model.config.vocab_size == tokenizer_size + PADDING
    text = llm.generate("Once upon a time", max_new_tokens=12, **options)
    assert "".join(llm.stream("Once upon a time", max_new_tokens=12, **options)) == text
    ids = llm.generate_tokens([[5, 6, 7]], max_new_tokens=12, **options)[0]
    assert ids and max(ids) < tokenizer_size


def test_tiny_temperature_behaves_like_greedy(llms, reference_kernels):
    llm = llms["gpt2"]
    greedy = llm.generate_tokens([[5, 6, 7], [40, 41]], max_new_tokens=16, temperature=0)
    for temperature in (1e-45, 1e-38, 1e-30, 5e-324):
        assert llm.generate_tokens([[5, 6, 7], [40, 41]], max_new_tokens=16, temperature=temperature,
                                   seed=0) == greedy, temperature


def test_tokenizer_larger_than_the_model_fails_at_load(tmp_path, reference_kernels):
    size = resized_checkpoint(tmp_path, -10)
    with pytest.raises(ValueError, match=f"tokenizer .* has {size} tokens but the model's vocabulary has only "
                                         f"{size - 10}"):
        fastlm.LLM(str(tmp_path))
    (tmp_path / "data.txt").write_text("Once upon a time there was a fox. " * 40, encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer .* tokens but the model's vocabulary has only"):
        fastlm.evaluate(tmp_path, tmp_path / "data.txt", block_size=16)


def test_special_ids_the_model_has_but_the_tokenizer_lacks_load(padded, tmp_path, reference_kernels):
    folder, tokenizer_size = padded
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    eos = [tokenizer_size + 3, tokenizer_size + PADDING - 1]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos[0]}))
    llm = fastlm.LLM(str(tmp_path), dtype="float32")
    assert set(eos) <= set(llm.eos_token_ids)
    assert llm.tokenizer.pad_token_id == eos[0]
    assert isinstance(llm.generate("Once upon a time", max_new_tokens=4, temperature=0), str)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer_size + PADDING}))
    with pytest.raises(ValueError, match=f"eos_token_id {tokenizer_size + PADDING} .* vocabulary"):
        fastlm.LLM(str(tmp_path))


def test_sampling_limit_unit():
    from fastlm.runtime.sampling import SamplingParams, next_tokens

    logits = torch.zeros(3, 10)
    logits[:, 8:] = 100.0
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_p=0.5)):
        assert next_tokens(logits, params, vocab_size=8).max().item() < 8
