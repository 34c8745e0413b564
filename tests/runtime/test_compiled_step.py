"""Compiled CPU decode steps (fastlm.runtime.compiled_step): the greedy tokens of the whole-sequence oracle
through compiled steps (padded buckets, packed linears); the per-bucket choice forced, timed and cached;
a failing compile falls back to eager steps."""
import copy

import pytest

import fastlm
from fastlm.kernels import cpu_choice
from fastlm.runtime.compiled_step import CompiledDecodeSteps, step_key
from fastlm.runtime.cpu_linear import PackedLinear, pack_linears
from fastlm.runtime.engine import Engine
from tests.runtime.engine_util import PROMPTS, assert_all_free, generate, make_engine, reference_greedy  # noqa: F401


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """A fresh choice cache (nothing timed or forced yet) in tmp_path."""
    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(cpu_choice.ENV_FORCE, raising=False)
    return tmp_path


def compiled_engine(llm, packed=False, **options):
    model = llm.model
    if packed:  # the tiny weights are below pack_linears' default size: pack them all
        model = copy.deepcopy(model)
        assert pack_linears(model, min_bytes=0) > 0
    return Engine(model, llm.eos_token_ids, llm.tokenizer, compile=True, **options)


@pytest.mark.parametrize("name,packed,prompts", [("gpt2", True, PROMPTS[:3]), ("llama_gqa", False, PROMPTS[4:5])])
def test_compiled_steps_give_the_oracle_tokens(name, packed, prompts, llms, reference_kernels, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    llm = llms[name]
    engine = compiled_engine(llm, packed, max_num_seqs=4)
    steps = engine.runner.graphs
    assert isinstance(steps, CompiledDecodeSteps)
    assert generate(engine, prompts) == reference_greedy(llm, prompts)
    bucket = steps.bucket_for(len(prompts))  # 3 rows run padded in bucket 4; one row in bucket 1
    assert steps.compile_error is None and steps.choices[bucket] == "compiled"
    if packed:
        assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
        assert engine.pool.k[:, engine.pool.scratch_block].abs().sum() > 0  # the padding row wrote only there
    assert_all_free(engine)


def test_forced_eager_never_compiles(llms, reference_kernels, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "eager")
    monkeypatch.setattr(CompiledDecodeSteps, "_run_compiled", lambda *a: pytest.fail("compiled under eager"))
    llm = llms["gpt2"]
    engine = compiled_engine(llm, max_num_seqs=4)
    assert generate(engine, PROMPTS[:2]) == reference_greedy(llm, PROMPTS[:2])
    assert set(engine.runner.graphs.choices.values()) == {"eager"}


def test_timed_choice_is_cached_and_an_eager_one_skips_compiling(llms, reference_kernels, own_cache, monkeypatch):
    llm = llms["llama_gqa"]
    engine = compiled_engine(llm, max_num_seqs=2)
    assert generate(engine, PROMPTS[5:6]) == reference_greedy(llm, PROMPTS[5:6])
    key = f"decode_step|{step_key(llm.model, 1)}"
    timed = engine.runner.graphs.choices[1]
    assert timed in ("eager", "compiled") and cpu_choice.default_cache().get(key) == timed
    # a later engine (a later load) reads the cache: no timing; with "eager" cached, no compile either
    cpu_choice.default_cache().put(key, "eager")
    monkeypatch.setattr(cpu_choice, "time_candidates", lambda *a, **k: pytest.fail("timed again"))
    monkeypatch.setattr(CompiledDecodeSteps, "_run_compiled", lambda *a: pytest.fail("compiled under a cached eager"))
    again = compiled_engine(llm, max_num_seqs=2)
    assert generate(again, PROMPTS[5:6]) == reference_greedy(llm, PROMPTS[5:6])
    assert again.runner.graphs.choices == {1: "eager"}


def test_a_failing_compile_falls_back_to_eager_steps(llms, reference_kernels, own_cache):
    llm = llms["gpt2"]
    engine = compiled_engine(llm, max_num_seqs=4)
    steps = engine.runner.graphs

    def broken(*args):
        raise RuntimeError("no C++ compiler")
    steps._compiled = broken
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        assert generate(engine, PROMPTS[:2]) == reference_greedy(llm, PROMPTS[:2])
    assert "no C++ compiler" in steps.compile_error and set(steps.choices.values()) == {"eager"}


def test_steps_beyond_the_compiled_buckets_run_eagerly(llms, reference_kernels, monkeypatch):
    monkeypatch.setattr(CompiledDecodeSteps, "_run_compiled", lambda *a: pytest.fail("compiled beyond bucket 8"))
    llm = llms["gpt2"]
    engine = compiled_engine(llm, max_num_seqs=16)
    steps = engine.runner.graphs
    assert steps.buckets == [1, 2, 4, 8] and steps.bucket_for(9) is None
    prompts = [p[:3] + [i + 3] for i, p in enumerate(PROMPTS * 2)][:10]  # 10 rows: no bucket, eager
    assert generate(engine, prompts) == reference_greedy(llm, prompts)


def test_compile_is_refused_where_it_cannot_run(checkpoints):
    folder = str(checkpoints["gpt2"][0])
    with pytest.raises(ValueError, match="compile=True is not available with tensor_parallel_size > 1"):
        fastlm.LLM(folder, device="cpu", tensor_parallel_size=2, compile=True)
