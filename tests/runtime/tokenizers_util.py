"""Tiny tokenizers trained in-process (no downloads), shared by the runtime tests:
- byte-level BPE (GPT-2 style): multi-byte characters split across tokens;
- Metaspace BPE over characters (SentencePiece / Llama style): decoding drops the leading space."""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BYTE_LEVEL_EOS = "<|endoftext|>"
METASPACE_EOS = "</s>"
CORPUS = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The quick brown fox jumps over the lazy dog; the end.",
    "héllo wörld, ça va? 日本語のテキスト 😀 🦊 naïve café",
]


def train_byte_level_bpe(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BYTE_LEVEL_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def train_metaspace_bpe(vocab_size: int = 200) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", METASPACE_EOS], show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok
