"""Generation against transformers' generate: greedy parity (alone and in ragged batches), sampling
options, seeds, eos and stop strings, streaming; one end-to-end run on the interpreter kernels."""
import pytest
import torch

from tests.runtime.checkpoints import CONTEXT
from tests.runtime.conftest import NAMES

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42], [7] * 20, [100, 150]]  # ids < both vocabs


def hf_greedy(hf, prompt, max_new_tokens, eos_id, **kwargs):
    """transformers' greedy continuation of one prompt, cut before its first eos."""
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=eos_id, pad_token_id=eos_id, **kwargs)[0, len(prompt):].tolist()
    return out[:out.index(eos_id)] if eos_id in out else out


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers_alone_and_in_a_ragged_batch(name, llms, checkpoints, reference_kernels):
    llm, (_, hf) = llms[name], checkpoints[name]
    eos = llm.eos_token_ids[0]
    expected = [hf_greedy(hf, p, 24, eos) for p in PROMPTS]
    assert any(len(e) >= 12 and len(set(e)) > 3 for e in expected)  # the comparison has substance
    batch = llm.generate_tokens(PROMPTS, max_new_tokens=24, temperature=0)
    alone = [llm.generate_tokens([p], max_new_tokens=24, temperature=0)[0] for p in PROMPTS]
    assert batch == expected
    assert alone == expected


@pytest.mark.parametrize("name", NAMES)
def test_repetition_penalty_matches_transformers(name, llms, checkpoints, reference_kernels):
    llm, (_, hf) = llms[name], checkpoints[name]
    eos = llm.eos_token_ids[0]
    expected = [hf_greedy(hf, p, 16, eos, repetition_penalty=1.8) for p in PROMPTS[:2]]
    assert llm.generate_tokens(PROMPTS[:2], max_new_tokens=16, temperature=0, repetition_penalty=1.8) == expected
    assert expected != [hf_greedy(hf, p, 16, eos) for p in PROMPTS[:2]]


def test_top_k_1_equals_greedy(llms, reference_kernels):
    llm = llms["llama_gqa"]
    greedy = llm.generate_tokens(PROMPTS, max_new_tokens=16, temperature=0)
    assert llm.generate_tokens(PROMPTS, max_new_tokens=16, temperature=1.5, top_k=1, seed=3) == greedy


def test_seed_reproduces_and_different_seeds_differ(llms, reference_kernels):
    llm = llms["gpt2"]
    options = dict(max_new_tokens=16, temperature=3.0, top_p=0.95, min_p=0.01)
    first = llm.generate(["Once upon a time", "The fox"], seed=11, **options)
    assert llm.generate(["Once upon a time", "The fox"], seed=11, **options) == first
    assert llm.generate(["Once upon a time", "The fox"], seed=12, **options) != first
    assert llm.generate_tokens(PROMPTS, seed=11, **options) == llm.generate_tokens(PROMPTS, seed=11, **options)


def test_eos_ends_generation_exactly(llms, reference_kernels, monkeypatch):
    llm = llms["gpt2"]
    monkeypatch.setattr(llm, "eos_token_ids", ())
    free = llm.generate_tokens(PROMPTS, max_new_tokens=20, temperature=0)
    assert [len(ids) for ids in free] == [20] * len(PROMPTS)
    stop_token = free[0][6]  # make a token the greedy run produces an eos
    monkeypatch.setattr(llm, "eos_token_ids", (stop_token,))
    cut = llm.generate_tokens(PROMPTS, max_new_tokens=20, temperature=0)
    assert cut == [ids[:ids.index(stop_token)] if stop_token in ids else ids for ids in free]
    assert len(cut[0]) <= 6
    text = llm.generate("Once upon a time", max_new_tokens=20, temperature=0)
    assert text == llm.tokenizer.decode(llm.generate_tokens([llm.tokenizer.encode("Once upon a time")],
                                                             max_new_tokens=20, temperature=0)[0])


def clean_substring(text, start, length):
    """The first substring of `length` characters at or after `start` without U+FFFD."""
    for i in range(start, len(text) - length):
        if "\ufffd" not in text[i:i + length]:
            return text[i:i + length]
    raise AssertionError(f"no clean substring in {text!r}")


@pytest.mark.parametrize("name", NAMES)
def test_stop_string_ends_generation_and_is_not_returned(name, llms, reference_kernels):
    llm = llms[name]
    prompt = "The quick brown fox"
    full = llm.generate(prompt, max_new_tokens=40, temperature=0)
    stop = clean_substring(full, 3, 1)
    expected = full[:full.index(stop)]
    assert llm.generate(prompt, max_new_tokens=40, temperature=0, stop=[stop, "never appears"]) == expected
    assert "".join(llm.stream(prompt, max_new_tokens=40, temperature=0, stop=stop)) == expected
    ids = llm.generate_tokens([llm.tokenizer.encode(prompt)], max_new_tokens=40, temperature=0, stop=stop)[0]
    assert stop in llm.tokenizer.decode(ids) and stop not in llm.tokenizer.decode(ids[:-1])


def test_multibyte_stop_string(llms, reference_kernels):
    llm = llms["gpt2"]
    full = llm.generate("héllo wörld, ça va?", max_new_tokens=60, temperature=0)
    wide = [c for c in full if ord(c) > 127 and c != "\ufffd"]
    assert wide, full  # deterministic: this checkpoint writes non-ASCII characters
    expected = full[:full.index(wide[0])]
    assert llm.generate("héllo wörld, ça va?", max_new_tokens=60, temperature=0, stop=wide[0]) == expected


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=1.2, top_k=40, seed=5)])
def test_stream_yields_the_text_of_generate(llms, reference_kernels, options):
    llm = llms["llama_gqa"]
    pieces = list(llm.stream("Once upon a time", max_new_tokens=30, **options))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == llm.generate("Once upon a time", max_new_tokens=30, **options)


def test_text_batch_equals_each_prompt_alone(llms, reference_kernels):
    llm = llms["llama_gqa"]
    prompts = ["Once upon a time", "The", "naïve café 日本語 and more words here"]
    batch = llm.generate(prompts, max_new_tokens=20, temperature=0)
    assert batch == [llm.generate(p, max_new_tokens=20, temperature=0) for p in prompts]
    assert isinstance(llm.generate(prompts[0], max_new_tokens=2), str)


def test_max_new_tokens_is_clipped_to_the_context(llms, reference_kernels, monkeypatch):
    llm = llms["gpt2"]
    monkeypatch.setattr(llm, "eos_token_ids", ())
    out = llm.generate_tokens([[3] * (CONTEXT - 5), [4, 5]], max_new_tokens=50, temperature=0)
    assert [len(ids) for ids in out] == [5, 50]  # each prompt's own room, whatever else runs beside it


def test_end_to_end_on_the_interpreter_kernels(llms, checkpoints):
    """No reference_kernels fixture: the Triton kernels run under TRITON_INTERPRET=1."""
    llm, (_, hf) = llms["gpt2"], checkpoints["gpt2"]
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [40, 41, 42]]
    expected = [hf_greedy(hf, p, 3, llm.eos_token_ids[0]) for p in prompts]
    assert llm.generate_tokens(prompts, max_new_tokens=3, temperature=0) == expected
