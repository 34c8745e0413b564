"""Fixtures for the training tests: a small, learnable synthetic corpus (Python-like lines drawn from a
few templates), a byte-level BPE trained on it, and the kernels' CPU reference path for speed."""
import random

import pytest

from fastlm.kernels._utils import KERNELS_ENV
from fastlm.training.data import train_bpe_tokenizer
from tests.conftest import ON_CUDA

TEMPLATES = [
    "def add_{a}(x):\n    return x + {a}\n\n",
    "def scale_{a}(values):\n    return [v * {b} for v in values]\n\n",
    "class Point{a}:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n",
    "if count > {b}:\n    print('too many', count)\nelse:\n    total += {a}\n\n",
    "for i in range({b}):\n    items.append(i * {a})\n\n",
]


def synthetic_text(n_snippets, seed):
    rng = random.Random(seed)
    parts = [rng.choice(TEMPLATES).format(a=rng.randrange(10), b=rng.randrange(2, 9)) for _ in range(n_snippets)]
    return "".join(parts)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(train.txt, eval.txt): ~24 KB and ~4 KB of text from the same templates, different draws."""
    root = tmp_path_factory.mktemp("corpus")
    train, evals = root / "train.txt", root / "eval.txt"
    train.write_text(synthetic_text(400, seed=1), encoding="utf-8")
    evals.write_text(synthetic_text(60, seed=2), encoding="utf-8")
    return train, evals


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory):
    return train_bpe_tokenizer([corpus[0]], vocab_size=320, out_dir=tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def cpu_reference(request):
    """Module-wide version of the suite's `reference_kernels` fixture (module fixtures cannot use it)."""
    with pytest.MonkeyPatch.context() as mp:
        if not ON_CUDA:
            mp.setenv(KERNELS_ENV, "reference")
        yield

