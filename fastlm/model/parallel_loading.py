"""Loading one rank's slice of a HF checkpoint for tensor parallelism (see fastlm.model.parallel).

Every tensor is read with safetensors' `get_slice`: only the rows/columns of this rank leave the file,
never a whole weight (let alone the whole model) per rank. The names and shapes are checked against
config.json first, exactly as the single-process loader does (fastlm.model.loading).
"""
from pathlib import Path

import torch

from fastlm.model.checkpoint_files import open_checkpoint
from fastlm.model.config import ModelConfig
from fastlm.model.loading import _check_names_and_shapes, resolve_dtype
from fastlm.model.parallel import Shard, check_splittable, parallelize
from fastlm.model.weight_map import normalize_hf_name, weight_map


def load_tensor_parallel(path, *, rank, world_size, dtype=None, device=None, group=None):
    """This rank's part of a tensor-parallel model (eval mode); torch.distributed must be initialized
    (every rank calls this, then runs every forward together). Returns a Transformer whose config holds
    the local sizes and whose `shard` attribute the full config; its forward returns the logits on
    rank 0 and None on the other ranks."""
    from fastlm.model.transformer import Transformer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    full = ModelConfig.from_hf(folder)
    check_splittable(full, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size - 1}], got {rank}")
    shard = Shard(rank, world_size, full, group)
    dtype, device = resolve_dtype(dtype, full.torch_dtype), torch.device("cpu" if device is None else device)
    with torch.device("meta"):
        whole = Transformer(full)  # only for the name/shape checks: meta tensors hold no memory
        model = parallelize(Transformer(shard.local_config()), shard)
    entries = weight_map(full)
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    with open_checkpoint(folder) as ckpt:
        names = {normalize_hf_name(full, n): n for n in ckpt.names}
        _check_names_and_shapes(full, entries, whole, ckpt, names)
        reader = _SliceReader(ckpt, names)
        state = {}
        for entry in entries:
            tensor = torch.zeros(shapes[entry.ours], dtype=dtype, device=device)  # zeros: the vocab padding
            _fill(tensor, entry, shard, reader)
            state[entry.ours] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    if full.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if model.rotary is not None:
        model.rotary.reset(device)
    return model.eval()


class _SliceReader:
    """Row/column ranges of checkpoint tensors, in fastlm's orientation."""

    def __init__(self, ckpt, names):
        self.ckpt, self.names, self._files = ckpt, names, {}

    def read(self, hf_name, rows=None, cols=None, transpose=False):
        from safetensors import safe_open

        name = self.names[hf_name]
        path = self.ckpt.file_of(name)
        if path.suffix != ".safetensors":
            raise ValueError(f"tensor-parallel loading reads safetensors checkpoints; {path} is not one "
                             "(save the model with safetensors, e.g. save_pretrained(safe_serialization=True))")
        if path not in self._files:
            self._files[path] = safe_open(str(path), framework="pt", device="cpu")
        hf_rows, hf_cols = (cols, rows) if transpose else (rows, cols)
        index = (slice(*hf_rows) if hf_rows else slice(None),) + ((slice(*hf_cols),) if hf_cols else ())
        part = self._files[path].get_slice(name)[index]
        return part.t() if transpose else part


def _fill(tensor, entry, shard: Shard, reader: _SliceReader):
    """Copy this rank's slices of entry's HF tensors into tensor (the rank's parameter)."""
    name, cfg = entry.ours, shard.full
    if name in ("tok_emb.weight", "lm_head.weight"):
        start, stop = shard.vocab_rows
        stop = min(stop, cfg.vocab_size)  # rows past the vocabulary stay zero
        if start < stop:
            tensor[:stop - start].copy_(reader.read(entry.hf[0], rows=(start, stop), transpose=entry.transpose))
    elif name.endswith(("attn.wqkv.weight", "attn.wqkv.bias", "mlp.w_up.weight", "mlp.w_up.bias")):
        offset = 0
        for hf_name, (start, stop) in _column_pieces(entry, shard):
            rows = tensor[offset:offset + stop - start]
            rows.copy_(reader.read(hf_name, rows=(start, stop), transpose=entry.transpose))
            offset += stop - start
    elif name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
        hd = cfg.head_dim
        start, stop = [h * hd for h in shard.q_heads] if ".attn." in name else shard.mlp_rows
        tensor.copy_(reader.read(entry.hf[0], cols=(start, stop), transpose=entry.transpose))
    else:  # replicated: norms, row-parallel biases, learned positions
        tensor.copy_(reader.read(entry.hf[0], transpose=entry.transpose))


def _column_pieces(entry, shard: Shard):
    """[(hf_name, (first row, last row + 1))] of a column-parallel parameter, in its local row order:
    q, k, v heads of the rank (GPT-2 stores them in one tensor) or its slices of gate and up."""
    cfg, hd = shard.full, shard.full.head_dim
    if ".mlp." in entry.ours:
        return [(hf_name, shard.mlp_rows) for hf_name in entry.hf]
    (qa, qb), (ka, kb) = shard.q_heads, shard.kv_heads
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    if len(entry.hf) == 3:  # separate q_proj, k_proj, v_proj
        return list(zip(entry.hf, ((qa * hd, qb * hd), (ka * hd, kb * hd), (ka * hd, kb * hd))))
    fused = entry.hf[0]  # GPT-2's c_attn: [q; k; v] rows
    return [(fused, (qa * hd, qb * hd)), (fused, (q + ka * hd, q + kb * hd)),
            (fused, (q + kv + ka * hd, q + kv + kb * hd))]
