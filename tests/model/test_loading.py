"""Checkpoint formats, malformed checkpoints, dtypes, and save_pretrained back into transformers."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlm.model import ModelConfig, Transformer
from tests.model.hf_models import VOCAB, build_hf_model, hf_classes, rel_err

pytestmark = pytest.mark.usefixtures("reference_kernels")


def logits_match(folder, hf, dtype=None, tol=1e-4):
    model = Transformer.from_pretrained(folder, dtype=dtype)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) <= tol
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf = build_hf_model("llama_gqa_hd16")
    hf.save_pretrained(folder)
    return folder, hf


def copy_checkpoint(src, dst, edit=None):
    """Copy config.json + model.safetensors, optionally editing the tensor dict."""
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name", ["gpt2_untied_hd32", "llama_gqa_hd16"])
def test_sharded_safetensors(name, tmp_path):
    hf = build_hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    logits_match(tmp_path, hf)


@pytest.mark.parametrize("name, zipfile", [("gpt2_tied_hd16", True), ("qwen2_bias_tied", False)],
                         ids=["zip", "legacy-format"])
def test_pytorch_bin_checkpoint(name, zipfile, tmp_path):
    """pytorch_model.bin as older transformers wrote it (transformers 5 only writes safetensors); it
    holds the tied lm_head.weight too, which the loader must accept and ignore."""
    hf = build_hf_model(name)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    logits_match(tmp_path, hf)


def test_original_gpt2_names_and_mask_buffers(tmp_path):
    """Hub GPT-2 files lack the `transformer.` prefix and carry attn.bias mask buffers."""
    hf = build_hf_model("gpt2_tied_hd16")
    hf.save_pretrained(tmp_path / "src")

    def rename(t):
        for key in list(t):
            t[key.removeprefix("transformer.")] = t.pop(key)
        t["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    logits_match(copy_checkpoint(tmp_path / "src", tmp_path / "dst", rename), hf)


def test_old_llama_inv_freq_buffers_are_ignored(llama_dir, tmp_path):
    def add_buffers(t):
        for i in range(2):
            t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    logits_match(copy_checkpoint(llama_dir[0], tmp_path / "dst", add_buffers), llama_dir[1])


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}), "unexpected tensor.*extra.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}),
     r"model.layers.0.self_attn.k_proj.weight.*shape \(16, 64\), expected \(32, 64\)"),
    (lambda t: t.pop("lm_head.weight"), "missing tensor.*lm_head.weight"),
], ids=["missing", "unexpected", "wrong-shape", "untied-head-missing"])
def test_malformed_tensors_are_named(edit, match, llama_dir, tmp_path):
    folder = copy_checkpoint(llama_dir[0], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        Transformer.from_pretrained(folder)


def test_corrupt_and_truncated_safetensors(llama_dir, tmp_path):
    good = (llama_dir[0] / "model.safetensors").read_bytes()
    for name, data in (("garbage", b"\x07not a safetensors file" * 10), ("truncated", good[: len(good) // 2])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((llama_dir[0] / "config.json").read_text())
        (folder / "model.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match="model.safetensors"):
            Transformer.from_pretrained(folder)


def test_corrupt_bin(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir[0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        Transformer.from_pretrained(tmp_path)


def test_missing_files_and_unsupported_type(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(_without(copy_checkpoint(llama_dir[0], tmp_path / "a"), "config.json"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        Transformer.from_pretrained(_without(copy_checkpoint(llama_dir[0], tmp_path / "b"), "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    folder = copy_checkpoint(llama_dir[0], tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not supported; supported: gpt2, llama, mistral, qwen2"):
        Transformer.from_pretrained(folder)


def test_missing_shard(tmp_path):
    build_hf_model("llama_gqa_hd16").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        Transformer.from_pretrained(tmp_path)


def _without(folder, filename):
    (folder / filename).unlink()
    return folder


def test_dtypes(llama_dir, tmp_path):
    folder, hf = llama_dir
    assert Transformer.from_pretrained(folder).dtype == torch.float32  # checkpoint says float32
    assert Transformer.from_pretrained(folder, dtype="float16").lm_head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        Transformer.from_pretrained(folder, dtype="int8")
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf.to(torch.float32)
    model = Transformer.from_pretrained(tmp_path)  # default: the checkpoint's torch_dtype
    assert model.dtype == torch.bfloat16 and model.rotary.inv_freq.dtype == torch.float32
    assert not model.training


@pytest.mark.parametrize("name", ["gpt2_tied_hd16", "gpt2_untied_hd32", "llama3_tied_hd32", "llama_bias_linear",
                                  "mistral_gqa", "qwen2_bias_tied"])
def test_save_pretrained_round_trip_into_transformers(name, tmp_path):
    hf = build_hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    Transformer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    _, model_cls = hf_classes(hf.config.model_type)
    reloaded = model_cls.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, hf(ids).logits) <= 1e-6


@pytest.mark.parametrize("config", [
    ModelConfig(vocab_size=VOCAB, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32),
    ModelConfig(vocab_size=VOCAB, dim=32, n_layer=1, n_head=2, max_seq_len=32, model_type="gpt2", norm="layernorm",
                norm_eps=1e-5, pos_emb="learned", mlp="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                tie_embeddings=True),
], ids=["llama", "gpt2"])
def test_model_trained_from_scratch_saves_for_transformers(config, tmp_path):
    model = Transformer(config).eval()
    model.save_pretrained(tmp_path)
    _, model_cls = hf_classes(config.model_type)
    reloaded = model_cls.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids), reloaded(ids).logits) <= 1e-5
    assert Transformer.from_pretrained(tmp_path).config == dataclasses.replace(model.config, torch_dtype="float32")
