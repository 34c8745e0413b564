"""fp16 loading gives fp16 logits as good as transformers' own fp16 (judged against fp64 by the
comparison rule), from an fp32 checkpoint (converted while loading) and from an fp16 one; each weight is
the fp32 weight rounded once to fp16."""
import pytest
import torch

from fastlm.model import Transformer
from tests.compare import assert_close_by_rule
from tests.model.hf_models import VOCAB, build_hf_model, hf_classes

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture(scope="module", params=["gpt2_tied_hd16", "llama3_tied_hd32", "llama_gqa_hd16"])
def saved(request, tmp_path_factory):
    """(name, fp32 checkpoint folder, fp16 checkpoint folder)."""
    fp32, fp16 = tmp_path_factory.mktemp("fp32"), tmp_path_factory.mktemp("fp16")
    hf = build_hf_model(request.param)
    hf.save_pretrained(fp32)
    hf.to(torch.float16).save_pretrained(fp16)
    return request.param, fp32, fp16


def test_fp16_weights_are_the_fp32_weights_rounded_once(saved):
    _, fp32, fp16 = saved
    reference = Transformer.from_pretrained(fp32, dtype="float32").state_dict()
    for folder in (fp32, fp16):
        loaded = Transformer.from_pretrained(folder, dtype="float16" if folder == fp32 else None).state_dict()
        assert loaded.keys() == reference.keys()
        for name, tensor in loaded.items():
            assert tensor.dtype == torch.float16, name
            assert torch.equal(tensor, reference[name].half()), name


def test_fp16_logits_within_comparison_rule(saved):
    name, fp32, fp16 = saved
    _, model_cls = hf_classes(build_hf_model(name).config.model_type)
    hf64 = model_cls.from_pretrained(fp32, dtype=torch.float64, attn_implementation="eager").eval()
    hf16 = model_cls.from_pretrained(fp16, dtype=torch.float16, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        reference, yardstick = hf64(ids).logits, hf16(ids).logits
        for model in (Transformer.from_pretrained(fp32, dtype="fp16"), Transformer.from_pretrained(fp16)):
            got = model(ids)
            assert got.dtype == torch.float16
            assert_close_by_rule(got, reference, yardstick, atol=1e-3, name=f"{name} fp16 logits")
