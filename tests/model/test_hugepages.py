"""fastlm.model.hugepages: CPU weights and KV pools in mappings advised MADV_HUGEPAGE (Linux)."""
import sys

import pytest
import torch

from fastlm.model import hugepages

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages through madvise: Linux"),
              pytest.mark.usefixtures("reference_kernels")]


def vm_flags(address: int) -> set:
    """The VmFlags of the mapping holding `address` (/proc/self/smaps; 'hg': advised MADV_HUGEPAGE)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_empty_tensors_are_cut_from_one_advised_mapping():
    specs = [((3, 1000), torch.bfloat16), ((7,), torch.int8), ((1000, 700), torch.float32), ((2, 3, 5), torch.int32)]
    tensors = hugepages.empty_tensors(specs, "cpu")
    assert [(tuple(t.shape), t.dtype) for t in tensors] == [(tuple(s), d) for s, d in specs]
    assert all(t.is_contiguous() and t.data_ptr() % hugepages.ALIGN == 0 for t in tensors)
    assert all("hg" in vm_flags(t.data_ptr()) for t in tensors)
    # laid out one after the other in one mapping, each with a storage of its own
    starts = [t.data_ptr() for t in tensors]
    assert starts == sorted(starts) and starts[-1] - starts[0] < 2 * hugepages.HUGE_PAGE
    assert all(t.untyped_storage().data_ptr() == t.data_ptr() for t in tensors)
    for i, t in enumerate(tensors):  # no overlap: each keeps what was written into it
        t.fill_(i + 1)
    assert [t.unique().tolist() for t in tensors] == [[i + 1] for i in range(len(tensors))]


def test_zeros_reads_zeros_in_an_advised_mapping():
    pool = hugepages.zeros((2, 65, 16, 8, 64), torch.bfloat16, "cpu")  # 2.1 MB
    assert pool.shape == (2, 65, 16, 8, 64) and pool.dtype == torch.bfloat16 and not pool.any()
    assert pool.data_ptr() % hugepages.HUGE_PAGE == 0 and "hg" in vm_flags(pool.data_ptr())


def test_switched_off_or_small_allocations_are_plain(monkeypatch):
    small = hugepages.empty_tensors([((4, 4), torch.float32)], "cpu")[0]
    assert "hg" not in vm_flags(small.data_ptr())
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.enabled("cpu")
    big = hugepages.zeros((1024, 1024), torch.float32, "cpu")
    assert not big.any() and "hg" not in vm_flags(big.data_ptr())


def test_tensors_outlive_everything_but_themselves():
    import gc

    t = hugepages.empty_tensors([((1024, 1024), torch.float32)], "cpu")[0]
    gc.collect()  # the mapping's only holder is t's storage
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * 1024 * 1024


def test_loaded_weights_live_in_huge_pages_and_give_transformers_logits(tmp_path):
    from fastlm.model import Transformer
    from fastlm.runtime.engine.kv_pool import KVPool
    from tests.model.hf_models import VOCAB, build_hf_model, rel_err

    hf = build_hf_model("llama_gqa_hd16", intermediate_size=4096)  # 6 MB of fp32 weights: one mapping
    hf.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path, dtype="float32")
    assert all("hg" in vm_flags(p.data_ptr()) for p in model.parameters())
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) <= 1e-4
    pool = KVPool(model, block_size=16, kv_cache_memory=4 << 20)
    assert all("hg" in vm_flags(t.data_ptr()) and not t.any() for t in (pool.k, pool.v))


def test_pack_module_moves_tensors_in_place_keeping_ties_and_values():
    emb = torch.nn.Embedding(1200, 512)  # 2.4 MB
    head = torch.nn.Linear(512, 1200, bias=True)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    model.register_buffer("scale", torch.arange(5.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hugepages.pack_module(model)
    assert model.head.weight is model.emb.weight and "hg" in vm_flags(model.emb.weight.data_ptr())
    assert all("hg" in vm_flags(t.data_ptr()) for t in (model.head.bias, model.scale))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pack_module_leaves_overlapping_views_alone():
    base = torch.randn(1024, 1024)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(base[:600])
    model.b = torch.nn.Parameter(base[500:])  # overlaps a
    pointers = (model.a.data_ptr(), model.b.data_ptr())
    hugepages.pack_module(model)
    assert (model.a.data_ptr(), model.b.data_ptr()) == pointers


def test_quantized_while_loading_lands_in_huge_pages(tmp_path):
    from fastlm.kernels.quant import QuantLinear
    from fastlm.model import Transformer
    from tests.model.hf_models import build_hf_model

    build_hf_model("llama_gqa_hd16", intermediate_size=8192).save_pretrained(tmp_path)  # 3 MB in int8
    model = Transformer.from_pretrained(tmp_path, dtype="float32", quantize="int8")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quantized and all("hg" in vm_flags(t.data_ptr()) for m in quantized for t in m.buffers())
