"""Perplexity of a model on a text file, over the same block packing as training."""
import contextlib
import math

import torch
import torch.nn.functional as F

from fastlm.training.data import load_blocks
from fastlm.model.devices import resolve_device
from fastlm.model.model_path import resolve_model_path
from fastlm.model.validation import check_choice, check_int
from fastlm.training.options import PRECISIONS, autocast_dtype

def check_block_size(block_size, config):
    check_int("block_size", block_size, 1)
    if block_size > config.max_seq_len:
        raise ValueError(f"block_size ({block_size}) is larger than the model's context "
                         f"({config.max_seq_len} tokens); use --block-size {config.max_seq_len} or less")


def autocast_context(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(model, batch, reduction="mean"):
    """Next-token cross-entropy of a (B, T + 1) batch of blocks, computed in fp32."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)  # (B, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def eval_loss(model, blocks, batch_size, device, amp_dtype=None):
    """(mean loss per token, tokens evaluated) of `model` over all `blocks`; restores the train/eval mode."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, blocks.size(0), batch_size):
        batch = blocks[start:start + batch_size].to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            total += lm_loss(model, batch, reduction="sum").double()
    model.train(was_training)
    n_tokens = blocks.size(0) * (blocks.size(1) - 1)
    return total.item() / n_tokens, n_tokens


def evaluate(model=None, data=None, *, block_size=128, batch_size=8, device=None, precision="auto"):
    """Perplexity of a checkpoint folder (default: the embedded model) on a text file.

    Returns {"loss": mean nats per token, "perplexity": exp(loss), "tokens": targets scored,
    "blocks": sequences of block_size + 1 tokens}. The tokenizer is the checkpoint's own.
    """
    from fastlm.model import Transformer, load_tokenizer

    if data is None:
        raise ValueError("data must be the path of a text file to evaluate on")
    check_int("batch_size", batch_size, 1)
    check_choice("precision", precision, PRECISIONS)
    device = resolve_device(device)
    folder = resolve_model_path(model)
    net = Transformer.from_pretrained(folder, dtype=torch.float32, device=device)
    check_block_size(block_size, net.config)
    blocks = load_blocks(data, load_tokenizer(folder, model_vocab_size=net.config.vocab_size), block_size, name="data")
    loss, n_tokens = eval_loss(net, blocks, batch_size, device, autocast_dtype(device, precision))
    if not math.isfinite(loss):
        raise ValueError(f"the loss is not finite ({loss}) on {data}: the model's weights or activations "
                         f"in {folder} are not finite")
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n_tokens, "blocks": blocks.size(0)}
