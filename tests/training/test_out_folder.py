"""The output folder of a training run (issue 11, items 2, 3, 4, 9 and 10): checked before training,
never written outside, refused when it holds something else, the final save atomic, resume only of
the same run, one-line errors."""
import json
import os
import shutil
import stat

import pytest
import torch

import fastlm
from tests.training.cli_runs import SharedFolder, run_cli
from tests.training.runs import TINY_RUN

RUN = dict(TINY_RUN, steps=2, device="cpu")


@pytest.fixture
def base(corpus, tokenizer_dir):
    return dict(RUN, data=corpus[0], tokenizer=tokenizer_dir)


def test_out_dot_is_the_current_folder(base, tmp_path, monkeypatch, reference_kernels):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    fastlm.train(out=".", **base)
    assert fastlm.LLM(str(work)).generate("def", max_new_tokens=3, temperature=0) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # nothing written beside --out


def test_non_empty_out_is_refused_unless_overwrite(base, tmp_path, reference_kernels):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty \(notes.txt\).*overwrite"):
        fastlm.train(out=out, **base)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    fastlm.train(out=out, overwrite=True, **base)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(ValueError, match="not empty"):  # an earlier run's folder: also refused
        fastlm.train(out=out, **base)


def test_resume_of_another_run_says_what_differs(base, tmp_path, reference_kernels):
    out = tmp_path / "out"
    fastlm.train(out=out, **dict(base, steps=4, save_every=2))
    with pytest.raises(ValueError, match=r"other settings: steps 4 \(now 6\); lr 0.003 \(now 0.01\)"):
        fastlm.train(out=out, resume=True, **dict(base, steps=6, lr=1e-2))
    assert fastlm.train(out=out, resume=True, **dict(base, steps=4)).steps == 4


def test_trained_weights_get_the_umask_mode(base, tmp_path, reference_kernels):
    old = os.umask(0o022)
    try:
        fastlm.train(out=tmp_path / "out", **base)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_api_arguments_that_are_not_paths(base):
    with pytest.raises(ValueError, match="out must be a path, got None"):
        fastlm.train(out=None, **base)
    with pytest.raises(ValueError, match="data must be a path"):
        fastlm.train(out="x", **dict(base, data=3))


def test_cli_out_checked_before_training(corpus, tokenizer_dir):
    args = ["train", "--data", corpus[0], "--tokenizer", tokenizer_dir, "--config", "tiny", "--steps", "2",
            "--block-size", "32", "--device", "cpu", "--no-progress"]
    with SharedFolder() as root:
        shutil.copy(corpus[0], root / "data.txt")
        shutil.copytree(tokenizer_dir, root / "tokenizer")
        args[2], args[4] = root / "data.txt", root / "tokenizer"
        (root / "a_file").write_text("x")
        locked = root / "locked"
        (locked / "out").mkdir(parents=True)
        (locked / "readonly").mkdir()
        (locked / "readonly").chmod(0o555)
        locked.chmod(0o555)  # the parent of --out is not writable: nothing may need to be written there
        cases = [(root / "a_file", "exists and is not a folder"), (locked / "readonly", "is not writable"),
                 (locked / "new", "cannot create the output folder")]
        for out, message in cases:
            result = run_cli(*args, "--out", out, unprivileged=True)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert result.stderr.count("\n") == 1 and message in result.stderr
        result = run_cli(*args, "--out", locked / "out", unprivileged=True)
        assert result.returncode == 0, result.stderr
        assert (locked / "out" / "model.safetensors").is_file()
        assert sorted(p.name for p in locked.iterdir()) == ["out", "readonly"]


def test_damaged_optimizer_state_is_one_line(base, tmp_path, reference_kernels):
    out = tmp_path / "out"
    fastlm.train(out=out, **dict(base, steps=4, save_every=2))
    optimizer = out / "checkpoint-0000002" / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[:len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="resume: cannot load the optimizer state .*optimizer.pt"):
        fastlm.train(out=out, resume=True, **dict(base, steps=4))

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"state": Payload()}, optimizer)
    with pytest.raises(ValueError, match="resume: cannot load the optimizer state"):
        fastlm.train(out=out, resume=True, **dict(base, steps=4))


def _tiny_model(seed):
    from fastlm.training.configs import model_config
    from fastlm.model import Transformer

    torch.manual_seed(seed)
    return Transformer(model_config("tiny", 320))


def _folder_state(out):
    """(step in trainer_state.json, weights) of the model in `out`, which must load completely."""
    from fastlm.model import Transformer, load_tokenizer

    model = Transformer.from_pretrained(out, dtype=torch.float32, device="cpu")
    load_tokenizer(out, model_vocab_size=model.config.vocab_size)
    step = json.loads((out / "trainer_state.json").read_text())["step"]
    return step, model.tok_emb.weight.detach().clone()


def test_final_save_is_atomic_at_every_crash_point(tmp_path, tokenizer_dir, monkeypatch):
    """A crash (here: an exception from any file operation of the save) leaves the old or the new model."""
    from fastlm.model import load_tokenizer
    from fastlm.training import checkpoint as ckpt
    from fastlm.training import output

    tokenizer = load_tokenizer(tokenizer_dir)
    old, new = _tiny_model(1), _tiny_model(2)
    out = tmp_path / "out"
    out.mkdir()
    output.publish_model(out, lambda f: ckpt.write_model_files(f, old, tokenizer, {"step": 1}))
    calls = {"n": 0, "crash_at": None}

    class Crash(Exception):
        pass

    def crashing(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise Crash()
            return fn(*args, **kwargs)
        return wrapped

    for name in ("replace", "rename", "symlink", "unlink", "fsync"):
        monkeypatch.setattr(output.os, name, crashing(getattr(os, name)))
    monkeypatch.setattr(output.shutil, "rmtree", crashing(shutil.rmtree))
    crash_at, completed = 1, False
    while not completed:
        calls.update(n=0, crash_at=crash_at)
        try:
            output.publish_model(out, lambda f: ckpt.write_model_files(f, new, tokenizer, {"step": 2}))
            completed = True
        except Crash:
            pass
        step, weights = _folder_state(out)
        expected = {1: old, 2: new}[step].tok_emb.weight
        assert torch.equal(weights, expected), f"crash at operation {crash_at}: a mixed model"
        if not completed:  # restore the old model for the next crash point
            calls["crash_at"] = None
            output.publish_model(out, lambda f: ckpt.write_model_files(f, old, tokenizer, {"step": 1}))
        crash_at += 1
    assert crash_at > 5 and step == 2
