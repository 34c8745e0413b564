"""Stepping a Transformer through AttentionMetadata by hand: a few sequences in a small paged pool
whose blocks are handed out in a shuffled order (so block tables are not the identity), the pool
poisoned with NaN so an unwritten slot that is read shows."""
import torch

from fastlm.model import AttentionMetadata


class PagedRows:
    def __init__(self, model, rows: int, max_len: int, block_size: int = 4):
        cfg = model.config
        self.model, self.block_size = model, block_size
        per_row = -(-max_len // block_size)
        shape = (cfg.n_layer, rows * per_row, block_size, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.full(shape, float("nan"), dtype=model.dtype, device=model.device)
        self.v = torch.full(shape, float("nan"), dtype=model.dtype, device=model.device)
        order = torch.randperm(rows * per_row).tolist()
        self.tables = [order[r * per_row:(r + 1) * per_row] for r in range(rows)]
        self.lengths = [0] * rows

    def step(self, chunks: dict) -> dict:
        """chunks: row -> the row's next token ids; one forward -> row -> logits (len, vocab) of all of them.
        One-token chunks are decode rows, longer ones prefill chunks (packed after the decodes)."""
        order = sorted(chunks, key=lambda r: len(chunks[r]) > 1)
        decodes = [r for r in order if len(chunks[r]) == 1]
        prefills = [r for r in order if len(chunks[r]) > 1]
        ids, positions, slots, cu = [], [], [], [0]
        for r in order:
            start = self.lengths[r]
            for p in range(start, start + len(chunks[r])):
                positions.append(p)
                slots.append(self.tables[r][p // self.block_size] * self.block_size + p % self.block_size)
            ids += chunks[r]
            if r in prefills:
                cu.append(cu[-1] + len(chunks[r]))
            self.lengths[r] += len(chunks[r])
        dev, i32 = self.model.device, torch.int32
        meta = AttentionMetadata(
            positions=torch.tensor(positions, device=dev), slot_mapping=torch.tensor(slots, device=dev),
            k_pool=self.k, v_pool=self.v, num_decodes=len(decodes),
            decode_block_tables=torch.tensor([self.tables[r] for r in decodes], dtype=i32, device=dev).view(len(decodes), len(self.tables[0])),
            decode_seqlens=torch.tensor([self.lengths[r] for r in decodes], dtype=i32, device=dev),
            prefill_block_tables=torch.tensor([self.tables[r] for r in prefills], dtype=i32, device=dev).view(len(prefills), len(self.tables[0])),
            prefill_cu_seqlens_q=torch.tensor(cu, dtype=i32, device=dev),
            prefill_seqlens_k=torch.tensor([self.lengths[r] for r in prefills], dtype=i32, device=dev),
            logits_indices=torch.arange(len(ids), device=dev))
        logits = self.model(torch.tensor(ids, device=dev), metadata=meta)
        out, at = {}, 0
        for r in order:
            out[r] = logits[at:at + len(chunks[r])]
            at += len(chunks[r])
        return out
