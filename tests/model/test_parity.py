"""fastlm's logits equal transformers' for every supported family and configuration."""
import pytest
import torch

from fastlm.model import Transformer
from tests.compare import assert_close_by_rule
from tests.model.hf_models import CONFIGS, VOCAB, build_hf_model, hf_classes, rel_err
from tests.model.paged_steps import PagedRows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, HF model), built lazily once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            model = build_hf_model(name)
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get


def random_batch(B, T):
    return torch.randint(0, VOCAB, (B, T))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_match_transformers(name, checkpoints, reference_kernels):
    folder, hf = checkpoints(name)
    model = Transformer.from_pretrained(folder)
    ids = random_batch(3, 23)  # three different sequences
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    assert got.dtype == torch.float32 and got.shape == (3, 23, VOCAB)
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("name", ["gpt2_tied_hd16", "llama3_tied_hd32", "qwen2_bias_tied"])
def test_bf16_logits_within_comparison_rule(name, checkpoints, reference_kernels):
    folder, _ = checkpoints(name)
    model_type = CONFIGS[name][0]
    _, model_cls = hf_classes(model_type)
    hf64 = model_cls.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
    hf16 = model_cls.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
    model = Transformer.from_pretrained(folder, dtype="bfloat16")
    ids = random_batch(2, 17)
    with torch.no_grad():
        reference, yardstick, got = hf64(ids).logits, hf16(ids).logits, model(ids)
    assert got.dtype == torch.bfloat16
    assert_close_by_rule(got, reference, yardstick, atol=1e-2, name=f"{name} bf16 logits")


@pytest.mark.parametrize("name", ["gpt2_tied_hd16", "llama_gqa_hd16"])
def test_triton_kernels_under_interpreter(name, checkpoints):
    """End to end through the real Triton kernels (the default test env runs them in the interpreter):
    a whole-sequence forward (flash); then steps over a paged pool: a prefill, a second prefill over the
    first's cached blocks, a 3-token chunk (paged prefill) and a 1-token step (paged decode)."""
    folder, hf = checkpoints(name)
    model = Transformer.from_pretrained(folder)
    ids = random_batch(2, 22)
    with torch.no_grad():
        expected = hf(ids).logits
        full = model(ids)
        rows = PagedRows(model, 2, 22, block_size=16)
        steps = [rows.step({0: ids[0, a:b].tolist(), 1: ids[1, a:b].tolist()})
                 for a, b in ((0, 9), (9, 18), (18, 21), (21, 22))]
        stepped = torch.stack([torch.cat([s[r] for s in steps]) for r in (0, 1)])
    assert rel_err(full, expected) <= 1e-4
    assert rel_err(stepped, expected) <= 1e-4


def test_mistral_sliding_window_caps_context(tmp_path, reference_kernels):
    """Within its window a sliding-window model is plain causal attention; longer inputs are refused."""
    hf = build_hf_model("mistral_gqa", sliding_window=12)
    hf.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.max_seq_len == 12 and model.config.sliding_window == 12
    ids = random_batch(2, 12)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) <= 1e-4
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_batch(1, 13))
