"""AttentionMetadata: what one step of the engine computes, passed explicitly to Transformer.forward.

A step packs N tokens of several sequences into one flat batch, decode rows first:
    tokens [0, num_decodes)   one token per sequence (decode), attended by paged_decode_attention
    tokens [num_decodes, N)   prefill chunks, packed back to back (cu_seqlens_q), each over its cached
                              prefix plus itself, attended by paged_prefill_attention
Every token's K/V are first written into the paged pool at slot_mapping (slot = block * block_size +
offset, the layout of fastlm.kernels.paged_attention); then attention reads keys through the block
tables. Nothing here is inferred from which fields are None: the counts say what the step is.
"""
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # (N,) int64 position of each token in its sequence
    slot_mapping: torch.Tensor  # (N,) int64 pool slot receiving each token's K/V
    k_pool: torch.Tensor  # (n_layer, num_blocks, block_size, n_kv_head, head_dim), the model's dtype
    v_pool: torch.Tensor
    num_decodes: int  # tokens [0, num_decodes) are decode rows (one token of one sequence each)
    decode_block_tables: torch.Tensor  # (num_decodes, max_blocks) int32
    decode_seqlens: torch.Tensor  # (num_decodes,) int32 keys per row, the new token included
    prefill_block_tables: torch.Tensor  # (P, max_blocks) int32, P prefill chunks
    prefill_cu_seqlens_q: torch.Tensor  # (P + 1,) int32 offsets of each chunk among tokens [num_decodes, N)
    prefill_seqlens_k: torch.Tensor  # (P,) int32 keys per chunk: cached prefix + the chunk
    logits_indices: torch.Tensor  # (R,) int64 tokens whose logits forward returns, in this order

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.prefill_seqlens_k.shape[0]

    def layer_pools(self, i: int):
        """(k_cache, v_cache) of layer i, each (num_blocks, block_size, n_kv_head, head_dim)."""
        return self.k_pool[i], self.v_pool[i]
