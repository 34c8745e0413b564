"""load_tokenizer on tokenizers trained locally: round trips (byte-level, non-ASCII), bos/eos/pad
conventions, the GPT-2 vocab.json + merges.txt fallback, save(), and agreement with transformers."""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from fastlm.model import load_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Once upon a time, a small model generated text.",
          "héllo wörld, ça va? naïve café", "日本語のテキスト 😀 🦊 Ωμέγα"]
TEXTS = ["The quick fox.", "  leading spaces and\nnew lines\t", "héllo wörld 日本語 😀🦊", "zzz qqq unseen ÆØÅ ∑∫"]


def train_bpe(special_tokens):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


def write_json(path, data):
    path.write_text(json.dumps(data))


@pytest.fixture
def gpt2_style(tmp_path):
    tmp_path = tmp_path / "gpt2_style"
    tmp_path.mkdir()
    tok = train_bpe(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                    "add_bos_token": False})
    return tmp_path


@pytest.fixture
def llama_style(tmp_path):
    tmp_path = tmp_path / "llama_style"
    tmp_path.mkdir()
    tok = train_bpe(["<s>", "</s>", "<pad>", "<|eot|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "special_tokens_map.json", {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                                      "pad_token": "<pad>"})
    write_json(tmp_path / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 3]})
    return tmp_path


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_byte_level(gpt2_style, llama_style, text):
    for folder in (gpt2_style, llama_style):
        tok = load_tokenizer(folder)
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text


def test_gpt2_conventions(gpt2_style):
    tok = load_tokenizer(gpt2_style)
    eot = tok.backend.token_to_id("<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id, tok.add_bos) == (eot, [eot], None, False)
    ids = tok.encode("The fox")
    assert eot not in ids
    assert tok.decode(ids + [eot]) == "The fox"  # specials skipped
    assert tok.decode(ids + [eot], skip_special_tokens=False) == "The fox<|endoftext|>"
    assert tok.vocab_size == 300


def test_llama_conventions(llama_style):
    tok = load_tokenizer(llama_style)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id, tok.add_bos) == (0, [1, 3], 2, True)
    ids = tok.encode("Once upon a time")
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.encode("Once upon a time", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids + [1]) == "Once upon a time"


def test_add_bos_token_setting_overrides_post_processor(llama_style, gpt2_style):
    write_json(llama_style / "tokenizer_config.json", {"add_bos_token": False})
    assert load_tokenizer(llama_style).encode("a time")[0] != 0
    write_json(gpt2_style / "tokenizer_config.json", {"bos_token": "<|endoftext|>", "add_bos_token": True})
    tok = load_tokenizer(gpt2_style)
    assert tok.encode("a time")[0] == tok.bos_token_id


def test_gpt2_vocab_merges_fallback_matches_transformers(gpt2_style, tmp_path):
    from transformers import GPT2Tokenizer

    folder = tmp_path / "vocab_merges"
    folder.mkdir()
    trained = HFTokenizer.from_file(str(gpt2_style / "tokenizer.json"))
    trained.model.save(str(folder))  # vocab.json + merges.txt
    tok = load_tokenizer(folder)
    reference = GPT2Tokenizer.from_pretrained(folder)  # reads vocab.json + merges.txt
    eot = tok.backend.token_to_id("<|endoftext|>")
    assert tok.bos_token_id == eot == reference.eos_token_id and tok.eos_token_ids == [eot] and not tok.add_bos
    for text in TEXTS:
        assert tok.encode(text) == reference(text)["input_ids"] == load_tokenizer(gpt2_style).encode(text)
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("style", ["gpt2_style", "llama_style"])
def test_save_round_trip_and_transformers_agrees(style, request, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(request.getfixturevalue(style))
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert (again.bos_token_id, again.eos_token_ids, again.pad_token_id, again.add_bos) == (
        tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id, tok.add_bos)
    hf = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text) == hf(text)["input_ids"]
    assert hf.eos_token_id == tok.eos_token_id and hf.bos_token_id == tok.bos_token_id


def test_errors(gpt2_style, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    write_json(gpt2_style / "tokenizer_config.json", {"eos_token": "<nope>"})
    with pytest.raises(ValueError, match="'<nope>' named in .*tokenizer_config.json"):
        load_tokenizer(gpt2_style)
    write_json(gpt2_style / "tokenizer_config.json", {})
    write_json(gpt2_style / "generation_config.json", {"eos_token_id": 100000})
    with pytest.raises(ValueError, match="eos_token_id 100000"):
        load_tokenizer(gpt2_style)
    (gpt2_style / "generation_config.json").unlink()
    tok = load_tokenizer(gpt2_style)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(["not", "text"])
