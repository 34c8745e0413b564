"""Rotary position embeddings in the HF `rotate_half` layout (the layout of every HF Llama-family
checkpoint: the two rotated halves of a head are its first and second halves, not interleaved pairs).

Angles are computed in fp32 from integer positions (as transformers does), the rotation is done in
fp32 and cast once, so bf16 models lose no precision in the angle."""
import torch


def rope_inv_freq(head_dim, theta, scaling=None, device=None):
    """(head_dim // 2,) fp32 inverse frequencies, with "linear" or Llama-3 ("llama3") scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq, s):
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between."""
    factor, low, high, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(torch.nn.Module):
    """Holds the fp32 inverse frequencies; maps positions to (cos, sin)."""

    def __init__(self, head_dim, theta, scaling=None, device=None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling, device), persistent=False)

    def reset(self, device):
        """Recompute the frequencies on `device` (after loading onto a model built on the meta device)."""
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the frequencies; keep them fp32 on whatever device fn chose.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset(self.inv_freq.device)
        return self

    def forward(self, positions):
        """positions (B, T) or (1, T) integer -> cos, sin each (B, T, 1, head_dim) fp32."""
        angles = positions.float()[..., None] * self.inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # (B, T, 1, head_dim)
        return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x (B, T, H, D) -> x rotated by the angles, same dtype. rotate_half(x) = cat(-x2, x1)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # each (B, T, H, D/2)
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, T, H, D)
    return (xf * cos + rotated * sin).to(x.dtype)
