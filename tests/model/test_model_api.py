"""The Transformer API beyond inference parity: training gradients, random init, input validation,
and a loaded model owning its memory."""
import pytest
import torch

from fastlm.model import ModelConfig, Transformer
from fastlm.model.weight_map import weight_map
from tests.model.hf_models import VOCAB, build_hf_model, rel_err

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.mark.parametrize("name", ["gpt2_tied_hd16", "llama_gqa_hd16", "qwen2_bias_tied"])
def test_gradients_match_transformers(name, tmp_path):
    """Training from a checkpoint: the same loss and the same gradient for every parameter."""
    hf = build_hf_model(name)
    hf.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    hf_loss = hf(ids, labels=ids).loss
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - hf_loss.item()) <= 1e-5 * abs(hf_loss.item())
    hf_loss.backward()
    loss.backward()
    ours, hf_params = dict(model.named_parameters()), dict(hf.named_parameters())
    for entry in weight_map(model.config):  # every parameter, through the explicit name map
        grads = ours[entry.ours].grad.split(list(entry.sizes), dim=0)
        for hf_name, grad in zip(entry.hf, grads):
            expected = hf_params[hf_name].grad
            assert rel_err(grad.t() if entry.transpose else grad, expected) <= 1e-4, hf_name
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_random_init_and_training_step():
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=16)
    model = Transformer(cfg)
    assert model.dtype == torch.float32 and model.training
    assert model.layers[0].attn.wo.weight.std() < model.layers[0].attn.wqkv.weight.std()  # scaled residual init
    ids = torch.randint(0, VOCAB, (3, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), ids.roll(-1, 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tied_embeddings_share_one_tensor(tmp_path):
    build_hf_model("qwen2_bias_tied").save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.config.tie_embeddings


def test_loaded_model_does_not_alias_the_file(tmp_path):
    """Overwriting the checkpoint (e.g. saving a fine-tuned model to the same folder) must not change
    a model already loaded from it."""
    hf = build_hf_model("llama_gqa_hd16")
    hf.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        before = model(ids)
        for p in hf.parameters():
            p.mul_(-1.0)
        hf.save_pretrained(tmp_path)
        assert torch.equal(model(ids), before)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(5, dtype=torch.long), r"\(B, T\)"),
    (torch.zeros(1, 5), r"\(B, T\) int64"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(1, 65, dtype=torch.long), "max_seq_len"),
    ([[1, 2]], r"\(B, T\)"),
])
def test_input_validation(bad, match):
    model = Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layer=1, n_head=2, max_seq_len=64))
    with pytest.raises(ValueError, match=match):
        model(bad)
    with pytest.raises(ValueError, match="config must be a ModelConfig"):
        Transformer({"dim": 32})
