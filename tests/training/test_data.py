"""Packing, batch order, LR schedule and the BPE tokenizer trainer (no model involved)."""
import math

import pytest
import torch

from fastlm.training.data import BlockSampler, pack_blocks, read_text, train_bpe_tokenizer
from fastlm.training.schedule import lr_at


@pytest.mark.parametrize("n_tokens,block_size", [(9, 4), (10, 4), (12, 4), (2, 1), (130, 128), (1000, 7)])
def test_pack_blocks_shift_by_one_and_every_target_once(n_tokens, block_size):
    tokens = torch.arange(n_tokens)
    blocks = pack_blocks(tokens, block_size)
    n_blocks = (n_tokens - 1) // block_size
    assert blocks.shape == (n_blocks, block_size + 1)
    for i in range(n_blocks):  # block i = tokens[i*T : i*T + T + 1]
        assert torch.equal(blocks[i], tokens[i * block_size: i * block_size + block_size + 1])
    targets = blocks[:, 1:].reshape(-1)
    assert torch.equal(targets, torch.arange(1, n_blocks * block_size + 1))  # each target exactly once


@pytest.mark.parametrize("n_tokens,block_size", [(0, 4), (1, 4), (4, 4), (128, 128)])
def test_pack_blocks_too_short_names_the_sizes(n_tokens, block_size):
    with pytest.raises(ValueError, match=f"too short: {n_tokens} tokens.*{block_size + 1}"):
        pack_blocks(torch.arange(n_tokens), block_size)


def test_sampler_covers_each_epoch_once_and_is_reproducible():
    blocks = pack_blocks(torch.arange(10 * 4 + 1), 4)  # 10 blocks
    sampler = BlockSampler(blocks, batch_size=3, seed=7)
    assert sampler.batches_per_epoch == 3
    epoch0 = torch.cat([sampler.batch(m) for m in range(3)])
    firsts = epoch0[:, 0].tolist()
    assert len(set(firsts)) == 9 and set(firsts) <= set(range(0, 40, 4))
    epoch1 = torch.cat([sampler.batch(m) for m in range(3, 6)])
    assert not torch.equal(epoch0, epoch1)  # reshuffled per epoch
    again = BlockSampler(blocks, batch_size=3, seed=7)
    assert torch.equal(again.batch(4), sampler.batch(4))  # a fresh sampler (a resumed run) sees the same batch
    assert not torch.equal(BlockSampler(blocks, 3, seed=8).batch(0), sampler.batch(0))


def test_lr_schedule_warmup_then_cosine_to_floor():
    kw = dict(peak_lr=1e-3, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then non-increasing
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(1e-4)  # floor = min_lr_ratio * peak
    assert lr_at(0, peak_lr=1e-3, total_steps=5, warmup_steps=0) == pytest.approx(1e-3)


def test_bpe_tokenizer_round_trips_and_matches_transformers(corpus, tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = read_text(corpus[1])
    ours = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = ours.encode(text).ids
    assert ours.get_vocab_size() == 320
    assert len(ids) < 0.6 * len(text.encode("utf-8"))  # merges learned: well under one token per byte
    assert ours.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.eos_token == "<|endoftext|>" and hf.convert_tokens_to_ids("<|endoftext|>") == 0


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="directory"):
        read_text(tmp_path)


def test_bpe_vocab_size_is_checked(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer([corpus[0]], vocab_size=100, out_dir=tmp_path)
