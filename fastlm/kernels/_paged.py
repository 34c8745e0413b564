"""Triton kernels of paged attention (split-KV decode, varlen prefill); the host side of the public
file fastlm/kernels/paged_attention.py. The kernels land in the next commit."""


def paged_decode(q, k_cache, v_cache, block_tables, seqlens, scale):
    raise NotImplementedError("the Triton paged decode kernel is not written yet: use the CPU reference")


def paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale):
    raise NotImplementedError("the Triton paged prefill kernel is not written yet: use the CPU reference")
