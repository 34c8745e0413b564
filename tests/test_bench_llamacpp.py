"""benchmarks/bench_llamacpp.py without llama.cpp: the install hint and exit code 2; the GGUF export
read back (names, shapes, dtypes, the Llama q/k permutation) where the gguf package is installed."""
import importlib.util

import pytest
import torch

from benchmarks import bench_llamacpp
from benchmarks.bench_generate import QUICK, save_random_checkpoint


def test_missing_llama_cpp_exits_2_with_the_install_hint(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert bench_llamacpp.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fastlm[llamacpp]'" in err and err.count("\n") == 1


def test_agreement_counts_leading_equal_tokens():
    assert bench_llamacpp.agreement([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert bench_llamacpp.agreement([1, 2], [1, 2]) == 2


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_export_reads_back(tmp_path, dtype):
    import gguf

    from benchmarks.gguf_export import _permute, write_gguf

    family, kwargs = QUICK["llama-small"]
    folder = save_random_checkpoint(family, dict(kwargs, num_hidden_layers=1), str(tmp_path / "ckpt"))
    hf_model = bench_llamacpp.load_hf(family, folder)
    reader = gguf.GGUFReader(write_gguf(hf_model, str(tmp_path / "m.gguf"), dtype))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9  # embedding, final norm, head; 9 per layer
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == ("F32" if dtype == torch.float32 else "BF16")
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    hf_q = hf_model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    raw = torch.from_numpy(q.data.copy()).reshape(-1)  # bf16 comes back as raw bytes
    data = (raw if dtype == torch.float32 else raw.view(torch.bfloat16)).float().reshape(hf_q.shape)
    assert torch.equal(data, _permute(hf_q, 4).to(dtype).float())
    assert not torch.equal(_permute(hf_q, 4), hf_q)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
def test_gguf_export_q8_0_reads_back_within_the_format_error(tmp_path):
    import gguf

    from benchmarks.gguf_export import _permute, write_gguf

    family, kwargs = QUICK["llama-small"]
    folder = save_random_checkpoint(family, dict(kwargs, num_hidden_layers=1), str(tmp_path / "ckpt"))
    hf_model = bench_llamacpp.load_hf(family, folder)
    tensors = {t.name: t for t in gguf.GGUFReader(write_gguf(hf_model, str(tmp_path / "m.gguf"), "q8_0")).tensors}
    assert {tensors[n].tensor_type.name for n in ("blk.0.attn_q.weight", "token_embd.weight", "output.weight")} == {"Q8_0"}
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    q = tensors["blk.0.attn_q.weight"]
    expected = _permute(hf_model.state_dict()["model.layers.0.self_attn.q_proj.weight"], 4).float()
    data = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type).copy()).reshape(expected.shape)
    step = expected.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127  # one scale per 32 values, in fp16:
    error = (data.reshape(-1, 32) - expected.reshape(-1, 32)).abs()  # half a step + 127 x the scale's rounding
    assert (error <= step * (0.5 + 127 * 2 ** -11) + 1e-6).all() and error.max() > 0
    with pytest.raises(ValueError, match="dtype must be"):
        write_gguf(hf_model, str(tmp_path / "x.gguf"), torch.float16)
    # the permutation only reorders rows within each head
