"""The model, tokenizer and optimizer a training run starts from.

Precedence: resume (the checkpoint's weights and tokenizer) > config (a preset from scratch, with the
given tokenizer or a BPE trained on the data) > model (a checkpoint to fine-tune; default: the embedded
model). Master weights are fp32 whatever the checkpoint's dtype; bf16 enters only through autocast.
"""
import torch

from fastlm.model.json_files import eos_id_entry
from fastlm.model.model_path import resolve_model_path
from fastlm.training.configs import model_config
from fastlm.training.data import train_bpe_tokenizer
from fastlm.training.output import private_folder


def build_model_and_tokenizer(opts, out_dir, resume_from=None, device=None):
    """(model in train mode on device (default opts.device), tokenizer); resume_from: the checkpoint
    folder resumed."""
    from fastlm.model import Transformer, load_tokenizer

    device = opts.device if device is None else device
    if resume_from is not None:
        model = Transformer.from_pretrained(resume_from, dtype=torch.float32, device=device)
        tokenizer = load_tokenizer(resume_from, model_vocab_size=model.config.vocab_size)
    elif opts.config is not None:
        tokenizer = _scratch_tokenizer(opts, out_dir)
        config = model_config(opts.config, tokenizer.vocab_size, tokenizer.bos_token_id,
                              eos_id_entry(tokenizer.eos_token_ids))
        torch.manual_seed(opts.seed)
        model = Transformer(config).to(device=device, dtype=torch.float32)
    else:
        folder = resolve_model_path(opts.model)
        model = Transformer.from_pretrained(folder, dtype=torch.float32, device=device)
        tokenizer = load_tokenizer(opts.tokenizer if opts.tokenizer is not None else folder,
                                   model_vocab_size=model.config.vocab_size)
    model.train()
    return model, tokenizer


def _scratch_tokenizer(opts, out_dir):
    from fastlm.model import load_tokenizer

    if opts.tokenizer is not None:
        return load_tokenizer(opts.tokenizer)
    # A byte-level BPE on the training text, kept in the run's private folder (it ships with the model).
    return load_tokenizer(train_bpe_tokenizer([opts.data], opts.vocab_size, private_folder(out_dir, "tokenizer")))


def make_optimizer(model, weight_decay, device):
    """AdamW(betas 0.9/0.95); weight decay only on the matrices of linear layers (not on norms, biases
    and embeddings, whose decay hurts more than it regularizes)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) parameters appear once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embedding_params else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
