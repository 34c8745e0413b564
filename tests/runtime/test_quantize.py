"""Quantized models end to end: LLM(quantize=...), `fastlm quantize` and its checkpoint format, the CLI,
and the errors. The kernels themselves are tested in tests/kernels/test_quant.py."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlm
from fastlm.cli import main
from fastlm.kernels.quant import QuantEmbedding, QuantLinear, dequantize_int4, dequantize_int8
from fastlm.model import Transformer
from fastlm.model.quantize import QuantConfig, quantize_model, quantized_linear_names
from tests.runtime.conftest import NAMES
from tests.runtime.test_errors import run_cli

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42]])
PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]


def _logits(llm_or_model, ids=IDS):
    model = getattr(llm_or_model, "model", llm_or_model)
    with torch.no_grad():
        return model(ids)


def _dequantized(q, in_features):
    return dequantize_int8(q.weight, q.weight_scale) if q.bits == 8 else \
        dequantize_int4(q.weight, q.weight_scale, q.weight_zero, in_features)


def _dequantized_float_model(float_model, quantized_model, qcfg):
    """The float model with each quantized layer's (and embedding's) weight replaced by its dequantized copy."""
    emulated = copy.deepcopy(float_model)
    for name in quantized_linear_names(emulated, qcfg):
        q = quantized_model.get_submodule(name)
        linear = emulated.get_submodule(name)
        linear.weight = torch.nn.Parameter(_dequantized(q, q.in_features), requires_grad=False)
    if qcfg.quantize_head:
        table = _dequantized(quantized_model.tok_emb, quantized_model.tok_emb.embedding_dim)
        emulated.tok_emb.weight = torch.nn.Parameter(table, requires_grad=False)
    return emulated


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quantize", ["int8", "int4-g32", "int4"])
def test_quantized_model_computes_the_dequantized_model(name, quantize, checkpoints, llms, reference_kernels):
    """The quantized layers are wired in correctly: logits equal those of the float model carrying the
    dequantized weights, to fp32 rounding."""
    folder = checkpoints[name][0]
    llm = fastlm.LLM(str(folder), dtype="float32", quantize=quantize)
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * llm.model.config.n_layer and not isinstance(llm.model.lm_head, QuantLinear)
    emulated = _dequantized_float_model(llms[name].model, llm.model, llm.model.quant_config)
    expected = _logits(emulated)
    assert (_logits(llm) - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quantize", ["int8", "int4-g32"])
def test_quantize_head_quantizes_the_embedding_and_the_head(name, quantize, checkpoints, llms, tmp_path,
                                                            reference_kernels):
    """quantize_head: the token embedding and the LM head are quantized too; a tied head reads the
    embedding's own integers (one copy in memory and on disk). Logits equal the float model carrying the
    dequantized embedding, head and layers, to fp32 rounding, also after a save and reload."""
    folder = checkpoints[name][0]
    llm = fastlm.LLM(str(folder), dtype="float32", quantize=quantize, quantize_head=True)
    model = llm.model
    assert isinstance(model.tok_emb, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    tied = model.config.tie_embeddings
    assert tied == (name == "gpt2") and (model.lm_head.weight is model.tok_emb.weight) == tied
    expected = _logits(_dequantized_float_model(llms[name].model, model, model.quant_config))
    assert (_logits(llm) - expected).abs().max() <= 1e-4 * expected.abs().max()
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("lm_head.") for k in stored) == (not tied)
    table = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
    assert stored[table].dtype == (torch.int8 if quantize == "int8" else torch.uint8)
    again = Transformer.from_pretrained(tmp_path)
    assert (again.lm_head.weight is again.tok_emb.weight) == tied
    assert torch.equal(_logits(again), _logits(model))


def test_quantized_table_is_counted_once_in_weight_bytes(checkpoints, reference_kernels):
    from fastlm.runtime.bench import weight_bytes_per_step

    model = Transformer.from_pretrained(checkpoints["gpt2"][0], quantize=QuantConfig(8, None, True))
    head = model.lm_head.weight.numel() + 4 * model.lm_head.weight_scale.numel()
    without_head = weight_bytes_per_step(Transformer.from_pretrained(checkpoints["gpt2"][0], quantize="int8"))
    untied_float_head = model.lm_head.weight.numel() * 4  # the fp32 head the unquantized-head model reads
    assert weight_bytes_per_step(model) == without_head - untied_float_head + head


def test_quantize_head_needs_quantize(checkpoints):
    with pytest.raises(ValueError, match="quantize_head=True needs quantize"):
        fastlm.LLM(str(checkpoints["gpt2"][0]), quantize_head=True)


def test_format_version_1_with_a_separate_head_copy_is_refused(checkpoints, tmp_path):
    Transformer.from_pretrained(checkpoints["gpt2"][0], quantize="int8").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Transformer.from_pretrained(tmp_path).quant_config.name == "int8"  # v1 without the head: as v2
    config["quantization_config"]["quantize_head"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 1 with quantize_head .* `fastlm quantize`"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_int8_stays_close_to_the_float_model(name, llms, checkpoints, reference_kernels):
    """int8 keeps each weight within max|row| / 254 of the original. On these checkpoints (weights 10x HF's
    init, so errors are amplified through the layers) that gives 3.1-3.6% of the largest logit; 5% fails a
    scale off by 2x. Greedy decoding agrees on the first 8 tokens of every prompt."""
    base = llms[name]
    llm = fastlm.LLM(str(checkpoints[name][0]), dtype="float32", quantize="int8")
    expected = _logits(base)
    assert (_logits(llm) - expected).abs().max() <= 0.05 * expected.abs().max()
    ours = llm.generate_tokens(PROMPTS, max_new_tokens=8, temperature=0)
    assert ours == base.generate_tokens(PROMPTS, max_new_tokens=8, temperature=0)


@pytest.mark.parametrize("name, bits, extra", [("llama_gqa", 4, ["--group-size", "32"]), ("gpt2", 8, []),
                                               ("gpt2", 4, ["--quantize-head"])])
def test_quantize_command_output_loads_as_on_the_fly(name, bits, extra, checkpoints, tmp_path, capsys,
                                                     reference_kernels):
    folder, out = checkpoints[name][0], tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", "--model", str(folder), "--out", str(out), "--bits", str(bits), *extra)
    assert code == 0 and "wrote" in stdout and err == ""
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == bits and qcfg["quant_method"] == "fastlm"
    assert (out / "tokenizer.json").is_file()
    assert qcfg["group_size"] == (None if bits == 8 else 32 if "--group-size" in extra else 128)
    on_the_fly = Transformer.from_pretrained(folder, dtype="bfloat16",
                                             quantize=QuantConfig(bits, None if bits == 8 else int(qcfg["group_size"]),
                                                                  "--quantize-head" in extra))
    loaded = Transformer.from_pretrained(out, dtype="bfloat16")
    assert isinstance(loaded.lm_head, QuantLinear) == ("--quantize-head" in extra)
    assert loaded.quant_config == on_the_fly.quant_config
    for (n1, t1), (n2, t2) in zip(loaded.state_dict().items(), on_the_fly.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    assert torch.equal(_logits(loaded), _logits(on_the_fly))


def test_saved_quantized_model_reloads_bit_identically(checkpoints, tmp_path, reference_kernels):
    model = Transformer.from_pretrained(checkpoints["llama_gqa"][0], quantize="int4-g64")
    model.save_pretrained(tmp_path / "a")
    again = Transformer.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert first["model.layers.0.self_attn.q_proj.weight_zero"].dtype == torch.float32
    assert torch.equal(_logits(model), _logits(again))


def test_generate_and_bench_commands_run_quantized(checkpoints, reference_kernels, capsys):
    folder = str(checkpoints["llama_gqa"][0])
    code, out, _ = run_cli(capsys, "generate", "Once upon", "--model", folder, "--quantize", "int4",
                           "--max-new-tokens", "6", "--temperature", "0")
    assert code == 0 and out.strip()
    code, out, _ = run_cli(capsys, "bench", "--model", folder, "--quantize", "int8", "--batch-size", "1",
                           "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1")
    assert code == 0 and "decode tok/s" in out
    code, out, _ = run_cli(capsys, "generate", "Once upon", "--model", folder, "--quantize", "int8",
                           "--quantize-head", "--max-new-tokens", "6", "--temperature", "0")
    assert code == 0 and out.strip()


def test_serve_loads_the_model_quantized(checkpoints, reference_kernels):
    """`fastlm serve --quantize int4 --quantize-head` builds its engine on the quantized model."""
    import argparse

    from fastlm.serve.commands import add_parsers, build_state

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(checkpoints["llama_gqa"][0]), "--quantize", "int4",
                              "--quantize-head", "--threads", "1"])
    threads = torch.get_num_threads()
    state = build_state(args)
    try:
        model = state.engine.model
        assert model.quant_config.name == "int4-g128" and isinstance(model.tok_emb, QuantEmbedding)
        assert torch.get_num_threads() == 1
    finally:
        state.shutdown()
        torch.set_num_threads(threads)


def test_bf16_quantized_generation_runs_through_the_engine(checkpoints, reference_kernels):
    llm = fastlm.LLM(str(checkpoints["gpt2"][0]), dtype="bfloat16", quantize="int8")
    assert llm.model.dtype == torch.bfloat16 and llm.model.layers[0].attn.wqkv.weight_scale.dtype == torch.float32
    out = llm.generate_tokens(PROMPTS, max_new_tokens=6, temperature=0)
    assert [len(ids) for ids in out] == [6, 6]


# ----------------------------------------------------------------------------------------------- errors

def test_layer_that_cannot_be_quantized_is_named(checkpoints):
    model = Transformer.from_pretrained(checkpoints["llama_gqa"][0])
    with torch.no_grad():
        model.layers[1].mlp.w_down.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cannot quantize layer layers\.1\.mlp\.w_down \(64 x 96\) to int8: .*non-finite"):
        quantize_model(model, QuantConfig(8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int3"), "quantize must be one of int8, int4"),
    (dict(quantize="int4-g48"), "quantize must be one of"),
])
def test_llm_quantize_argument_errors(checkpoints, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastlm.LLM(str(checkpoints["gpt2"][0]), **kwargs)


def test_quantized_checkpoint_errors(checkpoints, tmp_path, reference_kernels):
    Transformer.from_pretrained(checkpoints["gpt2"][0], quantize="int8").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"already quantized \(int8.*asked for int4-g128"):
        fastlm.LLM(str(tmp_path), quantize="int4")
    assert isinstance(fastlm.LLM(str(tmp_path), quantize="int8").model.layers[0].attn.wo, QuantLinear)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.attn.c_proj.weight"] = tensors["transformer.h.0.attn.c_proj.weight"].float()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_proj.weight' .* has dtype torch.float32, expected "
                                         r"torch.int8"):
        Transformer.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--bits", "8", "--group-size", "64"], "--group-size applies to --bits 4 only"),
    (["--bits", "4", "--group-size", "48"], "group_size must be one of"),
    (["--bits", "8", "--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
])
def test_quantize_command_errors(checkpoints, tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "quantize", "--model", str(checkpoints["gpt2"][0]), "--out", str(tmp_path / "q"), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_quantize_command_refuses_a_non_empty_out(checkpoints, tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    code, _, err = run_cli(capsys, "quantize", "--model", str(checkpoints["gpt2"][0]), "--out", str(tmp_path),
                           "--bits", "8")
    assert code == 2 and "is not an empty folder" in err and (tmp_path / "x").read_text() == "keep me"
