"""Training paths that delete or decide: which checkpoints pruning keeps, epochs -> steps, gradient
accumulation as a larger batch, --clip 0, which parameters get weight decay, the eval batch size."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import fastlm
import fastlm.training.trainer as trainer_module
from fastlm.model import ModelConfig, Transformer, load_tokenizer
from fastlm.training.checkpoint import STATE_FILE, checkpoint_folder, list_checkpoints, prune_checkpoints
from fastlm.training.configs import model_config
from fastlm.training.evaluation import eval_loss
from fastlm.training.model_setup import make_optimizer
from fastlm.training.options import TrainOptions
from fastlm.training.trainer import Trainer
from tests.training.runs import TINY_RUN

RUN = dict(TINY_RUN, device="cpu", log_every=1)


def train(corpus, tokenizer_dir, out, **options):
    return fastlm.train(data=corpus[0], tokenizer=tokenizer_dir, out=out, **{**RUN, **options})


def weights(out):
    return load_file(out / "model.safetensors")


def losses(out):
    return [r["train_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_loss" in r]


def steps_of(folders):
    return [int(f.name.split("-")[1]) for f in folders]


def test_pruning_keeps_the_newest_checkpoints_of_a_run(corpus, tokenizer_dir, tmp_path, reference_kernels):
    out = tmp_path / "run"
    train(corpus, tokenizer_dir, out, steps=9, save_every=2, keep_checkpoints=2)  # saves at 2, 4, 6, 8
    survivors = list_checkpoints(out)
    assert steps_of(survivors) == [6, 8]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [p.name for p in survivors]  # the rest is gone
    assert [json.loads((p / STATE_FILE).read_text())["step"] for p in survivors] == [6, 8]
    assert (out / "model.safetensors").is_file() and json.loads((out / STATE_FILE).read_text())["step"] == 9


@pytest.mark.parametrize("keep, survivors", [(1, [10_000_000]), (2, [100, 10_000_000]), (3, [50, 100, 10_000_000]),
                                             (9, [9, 50, 100, 10_000_000])])
def test_prune_orders_checkpoints_by_step_not_by_name(tmp_path, keep, survivors):
    folders = [checkpoint_folder(tmp_path, step) for step in (9, 10_000_000, 100)]  # one digit more than the padding
    folders.append(tmp_path / "checkpoint-50")  # unpadded: sorts after checkpoint-0000100 by name
    for folder in folders:
        folder.mkdir()
        (folder / STATE_FILE).write_text("{}")
    partial = tmp_path / "checkpoint-0000005"  # no state file: an interrupted save, not a checkpoint
    partial.mkdir()
    prune_checkpoints(tmp_path, keep)
    assert steps_of(list_checkpoints(tmp_path)) == survivors
    assert partial.is_dir()


def blocks_per_epoch(corpus, tokenizer_dir, block_size, batch_size):
    """Micro-batches per pass over the data, counted from the text: blocks of block_size + 1 tokens
    overlapping by one, the tail dropped; then whole batches only."""
    n_tokens = len(load_tokenizer(tokenizer_dir).encode(corpus[0].read_text(encoding="utf-8")))
    return ((n_tokens - 1) // block_size) // batch_size


@pytest.mark.parametrize("epochs, grad_accum", [(None, 1), (None, 4), (2.5, 3), (0.3, 2)])
def test_epochs_become_optimizer_steps(corpus, tokenizer_dir, tmp_path, epochs, grad_accum):
    per_epoch = blocks_per_epoch(corpus, tokenizer_dir, RUN["block_size"], RUN["batch_size"])
    expected = math.ceil((epochs or 1.0) * per_epoch / grad_accum)
    assert expected * grad_accum != (epochs or 1.0) * per_epoch or epochs is None  # rounding is tested
    options = {k: v for k, v in RUN.items() if k != "steps"}
    trainer = Trainer(TrainOptions(data=corpus[0], tokenizer=tokenizer_dir, out=tmp_path, epochs=epochs,
                                   **dict(options, grad_accum=grad_accum)))
    assert trainer.run_cfg["total_steps"] == expected


def test_a_run_by_epochs_does_those_steps(corpus, tokenizer_dir, tmp_path, reference_kernels):
    per_epoch = blocks_per_epoch(corpus, tokenizer_dir, RUN["block_size"], 48)
    result = train(corpus, tokenizer_dir, tmp_path, epochs=0.5, batch_size=48, grad_accum=2, warmup=1)
    assert result.steps == math.ceil(0.5 * per_epoch / 2) and result.tokens == result.steps * 2 * 48 * 32


def test_gradient_accumulation_equals_the_larger_batch(corpus, tokenizer_dir, tmp_path, reference_kernels):
    train(corpus, tokenizer_dir, tmp_path / "accum", steps=3, batch_size=8, grad_accum=2)
    train(corpus, tokenizer_dir, tmp_path / "big", steps=3, batch_size=16, grad_accum=1)
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)
    accum, big = weights(tmp_path / "accum"), weights(tmp_path / "big")
    # Adam divides by sqrt(v): where a gradient is near 0, the summation order moves that element's update
    # by a visible fraction of lr (3e-3); 1e-4 is 1/30 of one step, a different batch moves weights by ~lr.
    for name, tensor in big.items():
        torch.testing.assert_close(accum[name], tensor, rtol=0, atol=1e-4, msg=name)


def test_clip_0_does_not_clip(corpus, tokenizer_dir, tmp_path, reference_kernels):
    for clip in (0, 1e9, 1e-3):
        train(corpus, tokenizer_dir, tmp_path / str(clip), steps=3, clip=clip)
    unclipped, off, clipped = weights(tmp_path / "1000000000.0"), weights(tmp_path / "0"), weights(tmp_path / "0.001")
    for name, tensor in unclipped.items():
        torch.testing.assert_close(off[name], tensor, rtol=1e-6, atol=0, msg=name)
    assert any((clipped[name] - tensor).abs().max() > 1e-3 for name, tensor in unclipped.items())  # clipping bites


GPT2_LIKE = ModelConfig(vocab_size=97, dim=32, n_layer=2, n_head=2, max_seq_len=32, model_type="gpt2",
                        norm="layernorm", norm_eps=1e-5, pos_emb="learned", mlp="gelu_tanh", qkv_bias=True,
                        attn_out_bias=True, mlp_bias=True, tie_embeddings=False)
LINEAR_MATRIX = re.compile(r"layers\.\d+\.(attn\.(wqkv|wo)|mlp\.(w_up|w_down))\.weight")


@pytest.mark.parametrize("config, untied_head", [(model_config("tiny", 320), False), (GPT2_LIKE, True)],
                         ids=["llama-tied", "gpt2-untied"])
def test_weight_decay_only_on_linear_matrices(config, untied_head):
    model = Transformer(config)
    optimizer = make_optimizer(model, 0.25, torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.25 for p in g["params"]}
    spared = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    expected = {n for n in names.values() if LINEAR_MATRIX.fullmatch(n)}
    expected |= {"lm_head.weight"} if untied_head else set()
    assert len(expected) == 4 * config.n_layer + untied_head
    assert decayed == expected
    assert spared == set(names.values()) - expected  # norms, biases, embeddings (and the head tied to one)
    assert any("norm" in n for n in spared) and "tok_emb.weight" in spared
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)  # each parameter once


def test_eval_loss_does_not_depend_on_the_batch_size(corpus, tokenizer_dir, reference_kernels):
    from fastlm.training.data import load_blocks

    model = Transformer(model_config("tiny", 320)).eval()
    blocks = load_blocks(corpus[1], load_tokenizer(tokenizer_dir), 32, "eval")
    assert blocks.size(0) % 7 != 0
    whole = eval_loss(model, blocks, blocks.size(0), model.device)
    for batch_size in (3, 7, blocks.size(0) + 5):
        loss, tokens = eval_loss(model, blocks, batch_size, model.device)
        assert tokens == whole[1] == blocks.size(0) * 32
        assert loss == pytest.approx(whole[0], rel=1e-6)


@pytest.mark.parametrize("eval_batch_size, used", [(None, RUN["batch_size"]), (11, 11)])
def test_the_trainer_evaluates_with_the_eval_batch_size(corpus, tokenizer_dir, tmp_path, monkeypatch,
                                                        reference_kernels, eval_batch_size, used):
    seen = []

    def spy(model, blocks, batch_size, *args, **kwargs):
        seen.append(batch_size)
        return eval_loss(model, blocks, batch_size, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "eval_loss", spy)
    train(corpus, tokenizer_dir, tmp_path, steps=2, eval=corpus[1], eval_every=1, eval_batch_size=eval_batch_size)
    assert seen == [used] * 3  # before training, after step 1, final
