"""Diverging training (issue 11, item 7): the first non-finite loss stops the run with a clear error,
the last good checkpoint stays, no non-finite final model is written, log.jsonl stays JSON, and
evaluating a broken model is an error rather than `perplexity nan`."""
import json

import pytest
import torch

import fastlm
from fastlm.cli import main
from tests.training.runs import TINY_RUN


def strict_json_lines(path):
    def refuse(constant):
        raise ValueError(f"{constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture
def base(corpus, tokenizer_dir):
    return dict(TINY_RUN, data=corpus[0], tokenizer=tokenizer_dir, device="cpu", log_every=1)


def test_non_finite_loss_stops_the_run(base, tmp_path, reference_kernels, monkeypatch):
    out = tmp_path / "out"
    from fastlm.training import trainer

    real = trainer.Trainer._train_step

    def poisoned_after_step_4(self, step, loss_sum):
        if step == 4:
            with torch.no_grad():
                self.model.tok_emb.weight.mul_(float("inf"))
        return real(self, step, loss_sum)

    monkeypatch.setattr(trainer.Trainer, "_train_step", poisoned_after_step_4)
    with pytest.raises(ValueError, match=r"training diverged: the training loss is not finite at step 5 .*"
                                         r"last good checkpoint is .*checkpoint-0000004"):
        fastlm.train(out=out, **dict(base, steps=20, save_every=2))
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-0000002", "checkpoint-0000004"]
    assert [r["step"] for r in strict_json_lines(out / "log.jsonl")] == [1, 2, 3, 4]


def test_infinite_learning_rate_on_the_command_line(base, corpus, tokenizer_dir, tmp_path, capsys,
                                                    reference_kernels):
    out = tmp_path / "out"
    code = main(["train", "--data", str(corpus[0]), "--tokenizer", str(tokenizer_dir), "--config", "tiny",
                 "--out", str(out), "--steps", "5", "--lr", "inf", "--block-size", "32", "--device", "cpu",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastlm train: error: training diverged") and err.count("\n") == 1
    assert "no checkpoint was saved" in err and not (out / "model.safetensors").exists()


def test_evaluating_non_finite_weights_is_an_error(base, corpus, tmp_path, reference_kernels, capsys):
    from fastlm.model import Transformer, load_tokenizer

    out = tmp_path / "out"
    fastlm.train(out=out, **dict(base, steps=1))
    model = Transformer.from_pretrained(out, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    load_tokenizer(out).save(broken)
    with pytest.raises(ValueError, match="loss is not finite"):
        fastlm.evaluate(broken, corpus[1], block_size=32)
    assert main(["eval", "--model", str(broken), "--data", str(corpus[1]), "--block-size", "32"]) == 2
    captured = capsys.readouterr()
    assert "perplexity" not in captured.out and "loss is not finite" in captured.err
