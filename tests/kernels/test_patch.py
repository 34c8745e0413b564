"""fastlm.kernels.patch on tiny random transformers models (GPT-2, Llama with GQA, Mistral, Qwen2 with MQA):
a patched model gives the unpatched model's logits and gradients; masks fastlm can't express fall back;
nothing leaks into models that were not patched."""
import copy

import pytest
import torch
import transformers

from fastlm.kernels import LayerNorm, RMSNorm, patch
from tests.compare import assert_close_by_rule

LAYERS = 2
VOCAB = 97
ON_CUDA = torch.empty(0).device.type == "cuda"
# fp32 on CPU: same math, tight. On a GPU the Triton attention's fp32 tl.dot may use TF32 (~1e-3).
FP32_TOL = dict(rtol=2e-3, atol=2e-3) if ON_CUDA else dict(rtol=1e-4, atol=1e-5)


def build(model_type, attn="sdpa", dtype=torch.float32, **overrides):
    """A tiny random *ForCausalLM of `model_type`, its attention implementation set to `attn`."""
    if model_type == "gpt2":
        kw = dict(n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True,  # a softmax scale per layer
                  bos_token_id=0, eos_token_id=0)
        config_cls, model_cls = transformers.GPT2Config, transformers.GPT2LMHeadModel
    else:
        kv_heads = {"llama": 2, "mistral": 2, "qwen2": 1}[model_type]  # GQA, GQA, MQA
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=64)
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[model_type]
    kw.update(overrides)
    config = config_cls(vocab_size=VOCAB, attn_implementation=attn, **kw)
    return model_cls(config).to(dtype)


def twin_of(model):
    """An independent copy (own parameters, own config)."""
    return copy.deepcopy(model)


def run(model, ids, **kwargs):
    """Logits and {name: grad} after one training-mode forward/backward with the LM loss."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_runs_match(a, b, **tol):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    torch.testing.assert_close(logits_a, logits_b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **tol, msg=lambda m: f"grad of {name}: {m}")


def expected_norms(model_type):
    return 2 * LAYERS + 1  # two per block and the final one


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2"])
def test_patched_model_matches_unpatched_fp32(model_type, attn, reference_kernels):
    original = build(model_type, attn)
    patched = twin_of(original)
    keys, params = list(patched.state_dict()), {id(p) for p in patched.parameters()}
    report = patch(patched)
    ids = torch.randint(0, VOCAB, (2, 11))

    assert_runs_match(run(patched, ids), run(original, ids), **FP32_TOL)
    assert list(patched.state_dict()) == keys and {id(p) for p in patched.parameters()} == params
    assert report.num_norms_replaced == expected_norms(model_type)
    norm_cls = LayerNorm if model_type == "gpt2" else RMSNorm
    assert sum(isinstance(m, norm_cls) for m in patched.modules()) == expected_norms(model_type)
    assert report.num_attention_modules == LAYERS
    assert (report.attention_implementation, report.fallback_implementation) == ("fastlm", attn)
    assert (report.flash_calls, report.fallback_calls) == (LAYERS, 0)


@pytest.mark.parametrize("model_type,attn,overrides", [
    ("llama", "sdpa", {}),
    ("gpt2", "eager", {"reorder_and_upcast_attn": True}),  # GPT-2's other eager path
])
def test_padding_mask_falls_back_to_previous_implementation(model_type, attn, overrides, reference_kernels):
    original = build(model_type, attn, **overrides)
    patched = twin_of(original)
    report = patch(patched)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row

    got, want = patched(ids, attention_mask=mask).logits, original(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[1], want[1], **FP32_TOL)
    torch.testing.assert_close(got[0, 3:], want[0, 3:], **FP32_TOL)  # padded query rows are arbitrary
    assert (report.flash_calls, report.fallback_calls) == (0, LAYERS)
    # an all-ones mask is plain causal: flash serves it
    torch.testing.assert_close(patched(ids, attention_mask=torch.ones_like(ids)).logits, original(ids).logits,
                               **FP32_TOL)
    assert report.flash_calls == LAYERS


def test_sliding_window_shorter_than_sequence_falls_back(reference_kernels):
    original = build("mistral", sliding_window=4)
    patched = twin_of(original)
    report = patch(patched)
    ids = torch.randint(0, VOCAB, (1, 10))
    torch.testing.assert_close(patched(ids).logits, original(ids).logits, **FP32_TOL)
    assert (report.flash_calls, report.fallback_calls) == (0, LAYERS)


def test_attention_weights_requested_fall_back_to_eager(reference_kernels):
    original = build("gpt2", "eager")
    patched = twin_of(original)
    report = patch(patched)
    ids = torch.randint(0, VOCAB, (1, 8))
    got, want = patched(ids, output_attentions=True), original(ids, output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits, **FP32_TOL)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, **FP32_TOL)
    assert (report.flash_calls, report.fallback_reasons) == (0, {"attention weights requested": LAYERS})


def test_generate_with_kv_cache_matches(reference_kernels):
    original = build("llama")
    patched = twin_of(original)
    report = patch(patched)
    prompt = torch.randint(0, VOCAB, (1, 6))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(prompt, **kw), original.generate(prompt, **kw))
    assert report.flash_calls == 5 * LAYERS and report.fallback_calls == 0  # prefill + 4 decode steps


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_patched_bf16_by_comparison_rule(model_type, reference_kernels):
    torch_bf16 = build(model_type, "sdpa", torch.bfloat16)
    reference = twin_of(torch_bf16).double()
    patched = twin_of(torch_bf16)
    patch(patched)
    ids = torch.randint(0, VOCAB, (2, 11))
    (logits, grads), (logits_t, grads_t), (logits64, grads64) = (run(m, ids) for m in (patched, torch_bf16, reference))
    assert_close_by_rule(logits, logits64, logits_t, atol=1e-2, name="logits")
    for name in grads:
        assert_close_by_rule(grads[name], grads64[name], grads_t[name], atol=1e-2, name=f"grad of {name}")


def test_interpreter_kernels_end_to_end():
    """The real Triton kernels (under the interpreter on CPU), not the references."""
    original = build("llama", num_attention_heads=2, num_key_value_heads=1)
    patched = twin_of(original)
    report = patch(patched)
    ids = torch.randint(0, VOCAB, (1, 7))
    assert_runs_match(run(patched, ids), run(original, ids), rtol=2e-3 if ON_CUDA else 1e-4, atol=2e-3 if ON_CUDA else 1e-4)
    assert report.flash_calls == LAYERS


def test_patched_model_compiles_without_graph_break(reference_kernels):
    """fullgraph=True: the attention function, its fallback test and the norms all trace; the graph holds
    fastlm's custom ops (run eagerly by a recording backend, so autograd works as usual), the norms' only
    on a GPU."""
    original = build("llama")
    patched = twin_of(original)
    patch(patched)
    targets = set()

    def recording_backend(graph_module, example_inputs):
        targets.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    compiled = torch.compile(patched, fullgraph=True, backend=recording_backend)
    ids = torch.randint(0, VOCAB, (2, 9))
    (logits_c, grads_c), (logits, grads) = run(compiled, ids), run(original, ids)
    torch.testing.assert_close(logits_c, logits, **FP32_TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c["_orig_mod." + name], grad, **FP32_TOL)
    assert "fastlm.flash_attn_fwd.default" in targets, targets
    # norms: the Triton op on a GPU; on CPU the reference itself is traced (the compiler fuses it)
    assert ("fastlm.norm_fwd.default" in targets) == ON_CUDA, targets


def test_unpatched_models_are_unaffected(reference_kernels):
    config = build("llama").config
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    twin = transformers.LlamaForCausalLM(config)  # same config object: the case that could leak
    ids = torch.randint(0, VOCAB, (2, 8))
    before = twin(ids).logits

    report = patch(model)
    later = transformers.LlamaForCausalLM(config)
    for other in (twin, later):
        assert other.config._attn_implementation == "sdpa"
        assert not any(isinstance(m, (RMSNorm, LayerNorm)) for m in other.modules())
        assert not any(hasattr(m, "_fastlm_route") for m in other.modules())
    assert torch.equal(twin(ids).logits, before)
    assert report.flash_calls == 0
    assert model.config is not config and model.model.config is model.config
    assert all(m.self_attn.config is model.config for m in model.model.layers)


def test_partial_patch(reference_kernels):
    original = build("qwen2")
    norms_only, attention_only = twin_of(original), twin_of(original)
    r_norms = patch(norms_only, attention=False)
    r_attention = patch(attention_only, norms=False)
    ids = torch.randint(0, VOCAB, (2, 8))

    assert r_norms.num_norms_replaced == expected_norms("qwen2") and r_norms.num_attention_modules == 0
    assert norms_only.config._attn_implementation == "sdpa" == r_norms.attention_implementation
    assert r_attention.num_norms_replaced == 0 and r_attention.attention_implementation == "fastlm"
    assert not any(isinstance(m, RMSNorm) for m in attention_only.modules())
    for model in (norms_only, attention_only):
        assert_runs_match(run(model, ids), run(original, ids), **FP32_TOL)
    assert r_attention.flash_calls == LAYERS


def test_patching_twice_keeps_the_first_patch(reference_kernels):
    original = build("gpt2", "eager")
    patched = twin_of(original)
    patch(patched)
    again = patch(patched)
    assert again.num_norms_replaced == 0 and again.fallback_implementation == "eager"
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(patched(ids).logits, original(ids).logits, **FP32_TOL)
    assert again.flash_calls == LAYERS


def test_patched_model_saves_a_plain_checkpoint(tmp_path, reference_kernels):
    original = build("llama")
    patched = twin_of(original)
    patch(patched)
    patched.save_pretrained(tmp_path)
    assert "fastlm" not in (tmp_path / "config.json").read_text()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    ids = torch.randint(0, VOCAB, (1, 6))
    torch.testing.assert_close(reloaded(ids).logits, original(ids).logits)


def test_unsupported_models_raise():
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    for model in (neox, torch.nn.Linear(4, 4)):
        with pytest.raises(ValueError, match="gpt2, llama, mistral, qwen2"):
            patch(model)
    with pytest.raises(ValueError, match="norms"):
        patch(build("llama"), norms="yes")
