"""Resuming from a checkpoint continues at the saved step and repeats what the uninterrupted run did:
same learning rates, same losses, same final weights."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import fastlm
from tests.training.runs import TINY_RUN

RUN = dict(TINY_RUN, steps=8, save_every=4, log_every=1, grad_accum=2, device="cpu")


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tokenizer_dir, tmp_path_factory, cpu_reference):
    out = tmp_path_factory.mktemp("full")
    result = fastlm.train(data=corpus[0], tokenizer=tokenizer_dir, out=out, **RUN)
    return result, out


def test_checkpoints_hold_what_resuming_needs(uninterrupted):
    _, out = uninterrupted
    ckpt = out / "checkpoint-0000004"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["total_steps"] == 8 and state["tokens"] == 4 * 2 * 8 * 32


def test_resume_from_a_checkpoint_folder_repeats_the_uninterrupted_run(uninterrupted, corpus, tmp_path,
                                                                      reference_kernels):
    full, full_out = uninterrupted
    out = tmp_path / "resumed"
    # Options that fix the schedule and data order come from the checkpoint: those left at their
    # defaults are taken from it (here: warmup, left out), others must match (see test_output_folder.py).
    run = {k: v for k, v in RUN.items() if k != "warmup"}
    resumed = fastlm.train(data=corpus[0], out=out, resume=full_out / "checkpoint-0000004", **run)
    assert resumed.steps == 8 and resumed.tokens == full.tokens and resumed.initial_eval_loss is None
    expected = [r for r in _log(full_out) if r["step"] > 4]
    got = _log(out)
    assert [r["step"] for r in got] == [5, 6, 7, 8]
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in expected], rel=1e-12)
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in expected], rel=1e-4)
    ours, theirs = load_file(out / "model.safetensors"), load_file(full_out / "model.safetensors")
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5)


def test_resume_true_picks_the_latest_checkpoint_in_out(uninterrupted, corpus, tmp_path, reference_kernels):
    full, full_out = uninterrupted
    out = tmp_path / "again"
    out.mkdir()
    shutil.copytree(full_out / "checkpoint-0000004", out / "checkpoint-0000004")
    (out / "checkpoint-0000002").mkdir()  # an older, incomplete folder is ignored
    resumed = fastlm.train(data=corpus[0], out=out, resume=True, **RUN)
    assert resumed.steps == 8
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-4)


def test_resume_without_a_checkpoint_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        fastlm.train(data=corpus[0], out=tmp_path, resume=True, **RUN)
    (tmp_path / "not_a_ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        fastlm.train(data=corpus[0], out=tmp_path, resume=tmp_path / "not_a_ckpt", **RUN)
