"""What rank 0 sends the other ranks of a tensor-parallel engine, as torch.distributed broadcasts.

A message is a fixed-size int64 header (its kind, then the sizes of its tensors), followed for STEP and
COPY by one int64 payload holding every tensor back to back:
    STEP  input_ids, positions, slot_mapping (N each), decode block tables (D x Wd), decode seqlens (D),
          prefill block tables (P x Wp), prefill cu_seqlens_q (P + 1), prefill seqlens_k (P),
          logits_indices (R): the step's AttentionMetadata, less the KV pools (each rank has its own)
    COPY  (src, dst) block pairs (C x 2), copied in every layer of the pool (forks of n > 1 requests)
    PING  nothing: rank 0 is alive, only idle (sent when nothing else was sent for a while)
    STOP  nothing: rank 0 closed; the other ranks leave their loop
So a step costs two broadcasts whatever its size. The block tables are rank 0's block manager's; they
are valid on every rank because every pool has the same number of blocks.
"""
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from fastlm.model.attention_metadata import AttentionMetadata

STEP, COPY, PING, STOP = 1, 2, 3, 4
# header fields after the kind
SIZES = ("tokens", "decodes", "decode_width", "prefills", "prefill_width", "logits", "copies")
HEADER_LEN = 1 + len(SIZES)


class Channel:
    """Broadcasts from rank 0 on `device` (the GPU for NCCL, the CPU for gloo), over the default group."""

    def __init__(self, device):
        self.device = torch.device(device)

    def send(self, kind: int, sizes: Sequence[int] = (), payload: torch.Tensor = None) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.long)
        header[0] = kind
        header[1:1 + len(sizes)] = torch.tensor(list(sizes), dtype=torch.long)
        dist.broadcast(header.to(self.device), src=0)
        if payload is not None:
            dist.broadcast(payload.to(self.device), src=0)

    def receive(self) -> Tuple[int, dict, torch.Tensor]:
        """-> (kind, {size name: value}, payload or None)."""
        header = torch.empty(HEADER_LEN, dtype=torch.long, device=self.device)
        dist.broadcast(header, src=0)
        kind, *values = header.tolist()
        sizes = dict(zip(SIZES, values))
        if kind not in (STEP, COPY):
            return kind, sizes, None
        payload = torch.empty(_payload_len(kind, sizes), dtype=torch.long, device=self.device)
        dist.broadcast(payload, src=0)
        return kind, sizes, payload


def _payload_len(kind: int, s: dict) -> int:
    if kind == COPY:
        return 2 * s["copies"]
    return (3 * s["tokens"] + s["decodes"] * (s["decode_width"] + 1) + s["prefills"] * (s["prefill_width"] + 2) + 1
            + s["logits"])


def encode_step(input_ids: torch.Tensor, meta: AttentionMetadata) -> Tuple[List[int], torch.Tensor]:
    """(header sizes, payload) of one engine step."""
    sizes = [input_ids.shape[0], meta.num_decodes, meta.decode_block_tables.shape[1], meta.num_prefills,
             meta.prefill_block_tables.shape[1], meta.logits_indices.shape[0], 0]
    parts = (input_ids, meta.positions, meta.slot_mapping, meta.decode_block_tables, meta.decode_seqlens,
             meta.prefill_block_tables, meta.prefill_cu_seqlens_q, meta.prefill_seqlens_k, meta.logits_indices)
    return sizes, torch.cat([p.reshape(-1).long() for p in parts])


def decode_step(sizes: dict, payload: torch.Tensor, k_pool, v_pool) -> Tuple[torch.Tensor, AttentionMetadata]:
    """(input_ids, AttentionMetadata over this rank's pools) of a received step."""
    n, d, wd, p, wp = (sizes[k] for k in ("tokens", "decodes", "decode_width", "prefills", "prefill_width"))
    lengths = (n, n, n, d * wd, d, p * wp, p + 1, p, sizes["logits"])
    ids, positions, slots, d_tables, d_lens, p_tables, cu, p_lens, logits = payload.split(lengths)
    i32 = torch.int32
    return ids, AttentionMetadata(
        positions=positions, slot_mapping=slots, k_pool=k_pool, v_pool=v_pool, num_decodes=d,
        decode_block_tables=d_tables.to(i32).view(d, wd), decode_seqlens=d_lens.to(i32),
        prefill_block_tables=p_tables.to(i32).view(p, wp), prefill_cu_seqlens_q=cu.to(i32),
        prefill_seqlens_k=p_lens.to(i32), logits_indices=logits)


def encode_copies(pairs: Sequence[Tuple[int, int]]) -> Tuple[List[int], torch.Tensor]:
    sizes = [0] * (len(SIZES) - 1) + [len(pairs)]
    return sizes, torch.tensor(list(pairs), dtype=torch.long).view(-1)


def decode_copies(sizes: dict, payload: torch.Tensor) -> List[Tuple[int, int]]:
    return [tuple(pair) for pair in payload.view(sizes["copies"], 2).tolist()]
