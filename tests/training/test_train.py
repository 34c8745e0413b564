"""A short run from scratch learns; its checkpoint is a Hugging Face checkpoint (same logits and tokens in
transformers); fastlm.evaluate / `fastlm eval` reproduce the trainer's eval loss; fine-tuning a
transformers-made GPT-2 works."""
import json
import math

import pytest
import torch

import fastlm
from fastlm.cli import main
from tests.training.runs import TINY_RUN


@pytest.fixture(scope="module")
def scratch_run(corpus, tokenizer_dir, tmp_path_factory, cpu_reference):
    out = tmp_path_factory.mktemp("scratch")
    result = fastlm.train(data=corpus[0], eval=corpus[1], tokenizer=tokenizer_dir, out=out, steps=60,
                          eval_every=30, **TINY_RUN)
    return result, out


def test_short_run_lowers_eval_loss(scratch_run):
    result, out = scratch_run
    assert result.steps == 60 and result.tokens == 60 * 8 * 32
    # From ~ln(320) = 5.8 nats at init to well under half of that on this repetitive text.
    assert result.initial_eval_loss > 5.0
    assert result.eval_loss < result.initial_eval_loss - 2.5
    assert result.eval_perplexity == pytest.approx(math.exp(result.eval_loss))
    assert result.train_loss < 3.0 and result.tokens_per_second > 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 60 and [e["step"] for e in state["eval_history"]] == [30, 60]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name


def test_checkpoint_gives_same_logits_in_transformers(scratch_run, reference_kernels):
    from transformers import AutoModelForCausalLM

    from fastlm.model import Transformer

    _, out = scratch_run
    ours = Transformer.from_pretrained(out, dtype=torch.float32, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to("cpu").eval()
    ids = torch.randint(0, 320, (2, 29), device="cpu")
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_checkpoint_tokenizer_matches_transformers(scratch_run, corpus):
    from transformers import AutoTokenizer

    from fastlm.model import load_tokenizer

    _, out = scratch_run
    text = corpus[1].read_text(encoding="utf-8")[:500]
    ids = load_tokenizer(out).encode(text)
    assert AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False) == ids


def test_evaluate_and_cli_reproduce_the_trainers_eval_loss(scratch_run, corpus, capsys, reference_kernels):
    result, out = scratch_run
    r = fastlm.evaluate(out, corpus[1], block_size=32, batch_size=5, device="cpu")
    assert r["loss"] == pytest.approx(result.eval_loss, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["tokens"] == r["blocks"] * 32 > 0
    assert main(["eval", "--model", str(out), "--data", str(corpus[1]), "--block-size", "32",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"perplexity {r['perplexity']:.4f}" in printed and f"{r['tokens']:,} tokens" in printed


def test_cli_train_from_scratch_trains_its_own_tokenizer(corpus, tmp_path, capsys, reference_kernels):
    out = tmp_path / "cli"
    code = main(["train", "--data", str(corpus[0]), "--eval", str(corpus[1]), "--config", "tiny", "--vocab-size",
                 "300", "--out", str(out), "--steps", "4", "--block-size", "16", "--batch-size", "4",
                 "--grad-accum", "2", "--device", "cpu", "--eval-every", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "trained 4 steps, 512 tokens" in captured.out and "perplexity" in captured.out
    # The progress bar (stderr) shows loss, learning rate and tokens/s; periodic evals print a line.
    assert all(key in captured.err for key in ("loss=", "lr=", "tok_s=", "step 2: eval loss"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 320  # 300 rounded up to 64
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_fine_tune_a_transformers_gpt2(corpus, tokenizer_dir, tmp_path, reference_kernels):
    """The classic job: take a (here tiny, random) GPT-2 checkpoint and fine-tune it on a text file."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    cfg = GPT2Config(vocab_size=320, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(base)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(base)
    result = fastlm.train(data=corpus[0], eval=corpus[1], model=base, out=tmp_path / "ft", steps=40,
                          block_size=32, batch_size=8, lr=3e-3, warmup=4, progress=False)
    assert result.eval_loss < result.initial_eval_loss - 2.0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["model_type"] == "gpt2"
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "ft"), GPT2LMHeadModel)


def test_bf16_autocast_when_asked_on_cpu(corpus, tokenizer_dir, tmp_path, reference_kernels):
    runs = {}
    for precision in ("bf16", "fp32"):
        fastlm.train(data=corpus[0], tokenizer=tokenizer_dir, out=tmp_path / precision, steps=3, precision=precision,
                     device="cpu", log_every=1, **TINY_RUN)
        log = (tmp_path / precision / "log.jsonl").read_text().splitlines()
        runs[precision] = [json.loads(line)["train_loss"] for line in log]
    # bf16 matmuls move every step's loss (a no-op autocast would not: the fp32 run is deterministic), by
    # far less than bf16's 3 digits would if the loss itself were computed in bf16.
    for bf16, fp32 in zip(runs["bf16"], runs["fp32"]):
        assert 2e-6 < abs(bf16 - fp32) < 1e-3 * fp32, (runs["bf16"], runs["fp32"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "float32"  # fp32 master
