"""The KV-cached forward (prefill, decode, speculation-sized chunks, ragged rows) equals a full forward."""
import pytest
import torch

from fastlm.model import KVCache, Transformer
from tests.model.hf_models import VOCAB, build_hf_model, rel_err

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module", params=["gpt2_untied_hd32", "llama3_tied_hd32", "qwen2_bias_tied"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param).save_pretrained(folder)
    return Transformer.from_pretrained(folder)


def run_chunks(model, ids, chunk_sizes, cache):
    outs, start = [], 0
    for size in chunk_sizes:
        outs.append(model(ids[:, start:start + size], cache=cache))
        start += size
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[11] + [1] * 8, [9, 2, 3, 8, 5, 1], [1] * 5 + [12, 2], [10, 9]],
                         ids=["prefill+tokens", "prefill+speculation", "tokens+prefill", "two-prefills"])
def test_cached_forward_equals_full_forward(model, chunks):
    ids = torch.randint(0, VOCAB, (2, sum(chunks)))
    cache = model.new_cache(2, 40)
    got = run_chunks(model, ids, chunks, cache)
    assert rel_err(got, model(ids)) <= 1e-5
    assert cache.seqlens.tolist() == [sum(chunks)] * 2 and cache.seqlens.dtype == torch.int32


@torch.no_grad()
def test_last_only_returns_the_last_position(model):
    ids = torch.randint(0, VOCAB, (2, 11))
    full = model(ids)
    assert rel_err(model(ids, last_only=True), full[:, -1:]) <= 1e-6
    cache = model.new_cache(2, 16)
    assert rel_err(model(ids, cache=cache, last_only=True), full[:, -1:]) <= 1e-5
    assert cache.seqlens.tolist() == [11, 11]


@torch.no_grad()
def test_ragged_rows_share_one_cache(model):
    """Rows of different prompt lengths: prefill each through select(), then decode them together."""
    lengths, n_decode = [3, 14, 9], 4
    seqs = [torch.randint(0, VOCAB, (1, n + n_decode)) for n in lengths]
    cache = model.new_cache(3, 32)
    prefill_logits = [model(s[:, :n], cache=cache.select(slice(b, b + 1))) for b, (s, n) in enumerate(zip(seqs, lengths))]
    assert cache.seqlens.tolist() == lengths
    steps = []
    for t in range(n_decode):
        next_ids = torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)])  # (3, 1)
        steps.append(model(next_ids, cache=cache))
    steps = torch.cat(steps, dim=1)  # (3, n_decode, vocab)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        full = model(s)
        assert rel_err(prefill_logits[b], full[:, :n]) <= 1e-5
        assert rel_err(steps[b], full[0, n:]) <= 1e-5
    assert cache.seqlens.tolist() == [n + n_decode for n in lengths]


@torch.no_grad()
def test_ragged_speculation_chunk(model):
    """A 3-token step on rows of different lengths (the decode_attention path with Sq > 1)."""
    ids = torch.randint(0, VOCAB, (2, 12))
    cache = model.new_cache(2, 16)
    model(ids[:1, :4], cache=cache.select(slice(0, 1)))
    model(ids[1:, :7], cache=cache.select(slice(1, 2)))
    step = torch.stack([ids[0, 4:7], ids[1, 7:10]])  # (2, 3)
    got = model(step, cache=cache)
    assert rel_err(got[0], model(ids[:1, :7])[0, 4:]) <= 1e-5
    assert rel_err(got[1], model(ids[1:, :10])[0, 7:]) <= 1e-5


def test_cache_errors(model):
    cfg = model.config
    cache = model.new_cache(2, 16)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        model(ids[:1, :3], cache=cache.select(slice(0, 1)))
        with pytest.raises(ValueError, match="equal cache.seqlens"):
            model(ids, cache=cache)  # cached prefill of 10 > 8 tokens on ragged rows
        with pytest.raises(ValueError, match="cache overflow"):
            model(ids[:, :8], cache=_filled(model, 12))  # decode path: 12 cached + 8 new > 16 slots
        with pytest.raises(ValueError, match="cache overflow"):
            model(ids, cache=_filled(model, 7))  # prefill path: 7 cached + 10 new > 16 slots
        with pytest.raises(ValueError, match="cache buffers have shape"):
            model(ids[:1], cache=cache)  # batch size mismatch
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="rows"):
        cache.select(slice(0, 2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(2, 0, 8, 2, 16)


def _filled(model, n):
    """A two-row cache of 16 slots already holding n tokens per row."""
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, n)), cache=cache)
    return cache


def test_cache_views_share_storage(model):
    cache = model.new_cache(3, 8)
    row = cache.select(slice(1, 2))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 5)), cache=row)
    assert cache.seqlens.tolist() == [0, 5, 0]
    assert cache.k[:, 1, :5].abs().sum() > 0 and cache.k[:, 0].abs().sum() == 0
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0, 0] and row.seqlens.tolist() == [0]
