"""The engine's forward (AttentionMetadata over a paged pool: decode rows and prefill chunks packed in
one step, rows at different lengths) equals a full forward of each sequence; metadata validation."""
import pytest
import torch

from fastlm.model import AttentionMetadata, Transformer
from tests.model.hf_models import VOCAB, build_hf_model, rel_err
from tests.model.paged_steps import PagedRows

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module", params=["gpt2_untied_hd32", "llama3_tied_hd32", "qwen2_bias_tied"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param).save_pretrained(folder)
    return Transformer.from_pretrained(folder)


# per row, the chunk sizes of its steps: prefill then decodes, prefill + 3-token chunks, decodes then a
# prefill over them, two prefills; rows step together, so steps mix decode rows and prefill chunks
CHUNKS = [[11] + [1] * 8, [9, 2, 3, 8, 5, 1], [1] * 5 + [12, 2], [10, 9]]


@torch.no_grad()
@pytest.mark.parametrize("block_size", [1, 16])
def test_packed_steps_equal_full_forwards(model, block_size):
    seqs = [torch.randint(0, VOCAB, (sum(c),)) for c in CHUNKS]
    rows = PagedRows(model, len(CHUNKS), max(sum(c) for c in CHUNKS), block_size)
    got = [[] for _ in CHUNKS]
    for i in range(max(len(c) for c in CHUNKS)):
        chunks = {}
        for r, sizes in enumerate(CHUNKS):
            if i < len(sizes):
                start = sum(sizes[:i])
                chunks[r] = seqs[r][start:start + sizes[i]].tolist()
        for r, logits in rows.step(chunks).items():
            got[r].append(logits)
    for r, seq in enumerate(seqs):
        assert rel_err(torch.cat(got[r]), model(seq[None])[0]) <= 1e-5


@torch.no_grad()
def test_last_only_returns_the_last_position(model):
    ids = torch.randint(0, VOCAB, (2, 11))
    assert rel_err(model(ids, last_only=True), model(ids)[:, -1:]) <= 1e-6


def test_metadata_validation(model):
    rows = PagedRows(model, 1, 8)
    good = dict(positions=torch.arange(3), slot_mapping=torch.arange(3), k_pool=rows.k, v_pool=rows.v, num_decodes=0,
                decode_block_tables=torch.zeros(0, 2, dtype=torch.int32), decode_seqlens=torch.zeros(0, dtype=torch.int32),
                prefill_block_tables=torch.tensor([rows.tables[0]], dtype=torch.int32),
                prefill_cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
                prefill_seqlens_k=torch.tensor([3], dtype=torch.int32), logits_indices=torch.tensor([2]))
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert model(ids, metadata=AttentionMetadata(**good)).shape == (1, VOCAB)
        with pytest.raises(ValueError, match="metadata must be an AttentionMetadata"):
            model(ids, metadata=good)
        with pytest.raises(ValueError, match=r"input_ids must be a \(N,\)"):
            model(ids[None], metadata=AttentionMetadata(**good))
        with pytest.raises(ValueError, match="metadata.positions' shape"):
            model(ids[:2], metadata=AttentionMetadata(**good))
        with pytest.raises(ValueError, match="k_pool must be"):
            model(ids, metadata=AttentionMetadata(**dict(good, k_pool=rows.k[..., :8], v_pool=rows.v[..., :8])))
        with pytest.raises(ValueError, match="model's dtype"):
            model(ids, metadata=AttentionMetadata(**dict(good, k_pool=rows.k.double(), v_pool=rows.v.double())))


def test_metadata_values_are_checked_once_per_step(model, monkeypatch):
    """Lengths and block tables are read back (a host sync on a GPU) once per forward, not once per layer,
    and a bad value still fails with the kernel's message before any layer runs."""
    import fastlm.kernels.paged_attention as paged
    import fastlm.model.transformer as transformer

    rows = PagedRows(model, 2, 12)
    rows.step({0: [1, 2, 3], 1: [4, 5]})  # two prefills, then a step with a decode row and a prefill chunk
    calls = {"decode": 0, "prefill": 0}
    for kind in calls:
        real = getattr(transformer, f"check_{kind}_values")

        def counted(*args, kind=kind, real=real):
            calls[kind] += 1
            return real(*args)
        for module in (transformer, paged):  # the model's own call and the kernels' per-call checks
            monkeypatch.setattr(module, f"check_{kind}_values", counted)
    with torch.no_grad():
        rows.step({0: [6], 1: [7, 8]})
    assert calls == {"decode": 1, "prefill": 1} and model.config.n_layer > 1
    rows.tables[0][0] = rows.k.shape[1] + 3  # a table entry past the pool
    with torch.no_grad(), pytest.raises(ValueError, match=r"block_tables\[0, 0\] = \d+ is not a block of the pool"):
        rows.step({0: [9]})
