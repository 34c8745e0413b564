"""LayerNorm and RMSNorm with fused residual add (placeholder: references only; Triton kernels pending)."""
import torch
import torch.nn.functional as F


def layer_norm_ref(x, weight, bias=None, eps=1e-5, residual=None):
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    y = F.layer_norm(h.float(), (h.shape[-1],), weight.float(), None if bias is None else bias.float(), eps).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    return layer_norm_ref(x, weight, bias, eps, residual)


def rms_norm(x, weight, eps=1e-6, residual=None):
    return rms_norm_ref(x, weight, eps, residual)


class LayerNorm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-5, bias=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype)) if bias else None

    def forward(self, x, residual=None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual)


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual)


def compile_specs():
    return []
