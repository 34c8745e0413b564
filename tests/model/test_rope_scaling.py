"""RoPE scaling at real lengths against transformers' own rope initialisation (ROPE_INIT_FUNCTIONS and
LlamaRotaryEmbedding), on real model configurations, where every Llama-3 band (kept high frequencies,
interpolated middle, divided low frequencies) is populated; the kinds fastlm lacks are refused."""
import math

import pytest
import torch

from fastlm.model import ModelConfig
from fastlm.model.rope import Rotary, rope_inv_freq
from tests.model.hf_models import CONFIGS

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
# name -> LlamaConfig kwargs of a released model's attention geometry and rope
REAL = {
    "llama-3.1-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=131072, rope_scaling=LLAMA31),
    "llama-3.2-1b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=131072, rope_scaling={**LLAMA31, "factor": 32.0}),
    "linear-x4-llama-2": dict(hidden_size=4096, num_attention_heads=32, rope_theta=10000.0,
                              max_position_embeddings=16384, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "plain-llama-2": dict(hidden_size=4096, num_attention_heads=32, rope_theta=10000.0, max_position_embeddings=4096),
}
POSITIONS = [0, 1, 4095, 8191, 8192, 8193, 32767, 65536, 131071]


def hf_config(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, num_hidden_layers=1, intermediate_size=64, **kwargs)


def ours(hf):
    cfg = ModelConfig.from_hf(hf.to_dict())
    return cfg, Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def bands(inv_freq, scaling):
    """How many frequencies fall in each Llama-3 band: (kept, interpolated, divided)."""
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq.double()
    high, low = old_len / scaling["high_freq_factor"], old_len / scaling["low_freq_factor"]
    return int((wavelen < high).sum()), int(((wavelen >= high) & (wavelen <= low)).sum()), int((wavelen > low).sum())


@pytest.mark.parametrize("name", sorted(REAL))
def test_inverse_frequencies_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = hf_config(**REAL[name])
    cfg, rotary = ours(hf)
    rope_type = hf.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    expected, attention_scaling = init(hf, device="cpu")
    assert attention_scaling == 1.0  # fastlm applies no cos/sin scale: right only for these kinds
    assert rotary.inv_freq.shape == expected.shape == (cfg.head_dim // 2,)
    torch.testing.assert_close(rotary.inv_freq.cpu(), expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b"])
def test_every_llama3_band_is_reached_and_treated_as_transformers_does(name):
    """The kept high frequencies stay, the low ones are divided by factor, the middle is interpolated."""
    hf = hf_config(**REAL[name])
    cfg, rotary = ours(hf)
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    kept, interpolated, divided = bands(plain, cfg.rope_scaling)
    assert kept >= 8 and interpolated >= 3 and divided >= 8, (kept, interpolated, divided)
    factor = cfg.rope_scaling["factor"]
    torch.testing.assert_close(rotary.inv_freq[:kept], plain[:kept], rtol=0, atol=0)
    torch.testing.assert_close(rotary.inv_freq[-divided:], plain[-divided:] / factor, rtol=1e-6, atol=0)
    middle = rotary.inv_freq[kept:kept + interpolated]
    assert ((middle < plain[kept:kept + interpolated]) & (middle > plain[kept:kept + interpolated] / factor)).all()


@pytest.mark.parametrize("name", sorted(REAL))
def test_cos_sin_at_real_positions_match_transformers(name):
    """Angles at positions up to 128K (beyond the original 8K context): fp32 position x frequency."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = hf_config(**REAL[name])
    _, rotary = ours(hf)
    positions = torch.tensor([POSITIONS])
    cos_hf, sin_hf = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rotary(positions)  # (1, T, 1, head_dim)
    torch.testing.assert_close(cos[:, :, 0], cos_hf, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin[:, :, 0], sin_hf, rtol=0, atol=2e-5)


def test_the_parity_fixture_reaches_every_band():
    """tests/model/hf_models.py's Llama-3 checkpoint (compared logit for logit with transformers in
    test_parity.py and test_cache.py) must exercise all three bands, or a bug in one passes."""
    _, kwargs = CONFIGS["llama3_tied_hd32"]
    plain = rope_inv_freq(kwargs["head_dim"], kwargs["rope_theta"])
    assert min(bands(plain, kwargs["rope_scaling"])) >= 1, bands(plain, kwargs["rope_scaling"])


@pytest.mark.parametrize("scaling, words", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported; supported: default, linear, llama3"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "'yarn' is not supported"),
])
def test_kinds_fastlm_lacks_are_refused(scaling, words):
    hf = hf_config(hidden_size=4096, num_attention_heads=32, rope_theta=10000.0, max_position_embeddings=8192,
                   rope_scaling=scaling)
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf(hf.to_dict())
