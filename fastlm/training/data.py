"""Text files -> token blocks, and byte-level BPE tokenizers trained on them.

Packing: the whole file is tokenized once into one stream; block i is tokens[i*T : i*T + T + 1] (T =
block_size), inputs are its first T tokens and targets its last T. Consecutive blocks share one token, so
every token after the first is a target exactly once and the tail shorter than a block is dropped.
Training and evaluation use the same packing.
"""
import json
from pathlib import Path

import torch

from fastlm.model.validation import SEED_LIMIT, check_int, check_positive_int

SPECIAL_TOKEN = "<|endoftext|>"  # bos = eos = document separator of tokenizers we train (GPT-2 style)


def read_text(path, name="data"):
    """The file's text; FileNotFoundError / ValueError with the file name when missing or empty."""
    if not isinstance(path, (str, Path)):
        raise ValueError(f"{name} must be a path to a text file, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{name} must be a text file, got a directory: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"{name} file {path} is empty")
    return text


def tokenize_file(path, tokenizer, name="data"):
    """All tokens of a text file as one int64 tensor."""
    ids = tokenizer.encode(read_text(path, name))
    return torch.tensor(ids, dtype=torch.long, device="cpu")  # batches move to the device one by one


def pack_blocks(tokens, block_size, name="data"):
    """(n_blocks, block_size + 1) view of the token stream; ValueError when it holds no full block."""
    check_positive_int("block_size", block_size)
    n_blocks = (tokens.numel() - 1) // block_size
    if n_blocks < 1:
        raise ValueError(
            f"{name} is too short: {tokens.numel()} tokens, one block needs block_size + 1 = {block_size + 1}; "
            f"use more text or a smaller block_size")
    # Overlapping windows with stride block_size: (n_blocks, block_size + 1), no copy.
    return tokens[: n_blocks * block_size + 1].unfold(0, block_size + 1, block_size)


def load_blocks(path, tokenizer, block_size, name="data"):
    return pack_blocks(tokenize_file(path, tokenizer, name), block_size, name)


class BlockSampler:
    """Batches of blocks in a shuffled order that depends only on (seed, epoch): micro-batch number m of
    a run is the same batch whether the run was interrupted and resumed or not."""

    def __init__(self, blocks, batch_size, seed):
        if blocks.size(0) < batch_size:
            raise ValueError(f"batch_size ({batch_size}) is larger than the number of training blocks "
                             f"({blocks.size(0)}); use a smaller batch_size or block_size, or more data")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.batches_per_epoch = blocks.size(0) // batch_size  # the remainder is dropped each epoch
        self._epoch, self._order = None, None

    def batch(self, m):
        """Micro-batch number m (0-based, counting across epochs): (batch_size, block_size + 1)."""
        epoch, index = divmod(m, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + epoch) % SEED_LIMIT)
            self._epoch, self._order = epoch, torch.randperm(self.blocks.size(0), generator=gen, device="cpu")
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.blocks[rows]


def train_bpe_tokenizer(text_files, vocab_size, out_dir, model_max_length=None):
    """Train a byte-level BPE tokenizer (GPT-2 style, one <|endoftext|> special token) on text files and
    save it in `out_dir` as tokenizer.json + tokenizer_config.json, loadable by fastlm and transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_int("vocab_size", vocab_size, 257, 1_000_000)  # 256 bytes + 1 special token at least
    files = [str(Path(f)) for f in text_files]
    for f in files:
        read_text(f)  # clear errors before the Rust trainer sees the file
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train(files, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKEN,
                        "eos_token": SPECIAL_TOKEN, "unk_token": None, "pad_token": None,
                        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        tokenizer_config["model_max_length"] = model_max_length
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return out_dir
