"""Compiled CPU decode steps (fastlm.runtime.compiled_step): the greedy tokens of the whole-sequence oracle
through compiled steps (padded buckets, packed linears); the per-bucket choice forced, timed and cached;
a failing compile falls back to eager steps."""
import copy

import pytest
import torch

import fastlm
from fastlm.kernels import cpu_choice
from fastlm.runtime.compiled_step import CompiledDecodeSteps, step_key
from fastlm.runtime.cpu_linear import PackedLinear, pack_linears
from fastlm.runtime.engine import Engine
from tests.compare import ops_run
from tests.runtime.engine_util import PROMPTS, assert_all_free, generate, make_engine, reference_greedy  # noqa: F401


@pytest.fixture
def cpu_llms(llms):
    """The session's LLMs, which must be on the CPU: compiled steps are CPU-only (on a GPU, see
    test_compile_is_refused_on_a_gpu_pool)."""
    if any(llm.device.type != "cpu" for llm in llms.values()):
        pytest.skip("compiled decode steps run on the CPU; the test LLMs are on a GPU (FASTLM_TEST_DEVICE=cuda)")
    return llms


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


def count_shortcuts(steps: CompiledDecodeSteps) -> list:
    """A list that gets True for each step run_decodes took, False for each it left to run's path."""
    taken, run_decodes = [], steps.run_decodes

    def counting(seqs):
        out = run_decodes(seqs)
        taken.append(out is not None)
        return out
    steps.run_decodes = counting
    return taken


@pytest.mark.parametrize("name,packed,prompts", [("gpt2", True, PROMPTS[:3]), ("llama_gqa", False, PROMPTS[4:5])])
def test_compiled_steps_give_the_oracle_tokens(name, packed, prompts, cpu_llms, reference_kernels, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    llm = cpu_llms[name]
    engine = compiled_engine(llm, packed, max_num_seqs=4)
    steps = engine.runner.graphs
    assert isinstance(steps, CompiledDecodeSteps)
    taken = count_shortcuts(steps)
    assert generate(engine, prompts) == reference_greedy(llm, prompts)
    bucket = steps.bucket_for(len(prompts))  # 3 rows run padded in bucket 4; one row in bucket 1
    assert steps.compile_error is None and steps.choices[bucket] == "compiled"
    # each bucket's first step chose (run's path); the later ones wrote their rows straight in
    assert taken.count(False) == len(steps.choices) and taken.count(True) >= 20
    if packed:
        assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
        assert engine.pool.k[:, engine.pool.scratch_block].abs().sum() > 0  # the padding row wrote only there
    assert_all_free(engine)


def run_requests(engine, prompts, params) -> list:
    """Each prompt's generated ids (params: one SamplingParams per prompt), run to the end."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    out = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return [out[r] for r in rids]


def test_compiled_greedy_picks_stay_below_the_engines_vocab_size(cpu_llms, reference_kernels, monkeypatch):
    # the compiled step takes each row's argmax in its graph, over the ids below Engine(vocab_size=...)
    from fastlm.runtime.sampling import SamplingParams

    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    llm, prompts = cpu_llms["llama_gqa"], PROMPTS[4:5]
    params = [SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)]
    eager = dict(eos_token_ids=llm.eos_token_ids, tokenizer=llm.tokenizer, max_num_seqs=4)
    limit = max(run_requests(Engine(llm.model, **eager), prompts, params)[0])  # the top pick is now out
    compiled = compiled_engine(llm, max_num_seqs=4, vocab_size=limit)
    taken = count_shortcuts(compiled.runner.graphs)
    tokens = run_requests(compiled, prompts, params)
    assert tokens == run_requests(Engine(llm.model, vocab_size=limit, **eager), prompts, params)
    assert len(tokens[0]) == 16 and max(tokens[0]) < limit and any(taken)


def test_compiled_steps_sample_mixed_rows_as_eager_ones(cpu_llms, reference_kernels, monkeypatch):
    # a greedy row beside a seeded sampling one: the step's greedy picks are not used for that step
    from fastlm.runtime.sampling import SamplingParams

    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    llm = cpu_llms["gpt2"]
    params = [SamplingParams(max_new_tokens=12, temperature=0),
              SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=3)]
    compiled = compiled_engine(llm, max_num_seqs=4)
    taken = count_shortcuts(compiled.runner.graphs)
    eager = Engine(llm.model, llm.eos_token_ids, llm.tokenizer, max_num_seqs=4)
    assert run_requests(compiled, PROMPTS[:2], params) == run_requests(eager, PROMPTS[:2], params)
    assert any(taken)


@pytest.mark.parametrize("kernels", ["reference_kernels", "cpp_kernels"])
def test_a_block_table_out_of_the_pool_fails_the_shortcut_step(kernels, cpu_llms, monkeypatch, request, tmp_path):
    # run_decodes checks its rows in Python instead of check_step: a table entry outside the pool is refused
    request.getfixturevalue(kernels)
    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    from fastlm.runtime.sampling import SamplingParams

    llm = cpu_llms["llama_gqa"]
    engine = compiled_engine(llm, max_num_seqs=2)
    taken = count_shortcuts(engine.runner.graphs)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=30, temperature=0))
    while not any(taken):
        engine.step()
    seq = engine.requests[rid].seqs[0]
    good = seq.block_table[0]
    seq.block_table[0] = engine.pool.k.shape[1] + 7
    with pytest.raises(ValueError, match=r"decode row 0: block table \[.*\] names blocks outside the pool's \[0, "):
        engine.step()
    seq.block_table[0] = good
    engine.abort(rid)
    assert_all_free(engine)


def test_each_decode_row_is_checked_before_it_reaches_the_buffers():
    from fastlm.runtime.compiled_step import _check_row

    _check_row(0, 20, [3, 4], 16, 10, 4)  # token 20 in the second block; blocks 0..9 belong to sequences
    with pytest.raises(ValueError, match="decode row 1: a block table of 5 blocks, more than the 4"):
        _check_row(1, 20, [1, 2, 3, 4, 5], 16, 10, 4)
    with pytest.raises(ValueError, match=r"decode row 0: token 32 has no block in block table \[3, 4\]"):
        _check_row(0, 32, [3, 4], 16, 10, 4)
    for table in ([10], [-1], [2, 11]):  # 10: the padding rows' scratch block
        with pytest.raises(ValueError, match=r"names blocks outside the pool's \[0, 10\)"):
            _check_row(0, 3, table, 16, 10, 4)


def test_two_compiled_models_of_one_structure_run_their_own_weights(cpu_llms, reference_kernels, monkeypatch):
    # Dynamo guards the step's model on its type only (frozen weights, module guards skipped): a second
    # engine once ran the first one's frozen weights and gave its tokens
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    llm = cpu_llms["llama_gqa"]
    other = copy.deepcopy(llm.model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.3)
    prompts = PROMPTS[4:5]
    first = compiled_engine(llm, max_num_seqs=4)
    second = Engine(other, llm.eos_token_ids, llm.tokenizer, compile=True, max_num_seqs=4)
    assert generate(first, prompts) == reference_greedy(llm, prompts)
    eager_other = Engine(other, llm.eos_token_ids, llm.tokenizer, max_num_seqs=4)
    assert generate(second, prompts) == generate(eager_other, prompts) != generate(first, prompts)
    assert second.runner.graphs.choices == {1: "compiled"}


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_steps_give_the_eager_tokens(bits, cpu_llms, cpp_kernels, monkeypatch, tmp_path):
    # under torch.compile the quantized linears' settled CPU path (the C++ GEMV) is traced inline
    from fastlm.kernels.quant import QuantLinear
    from fastlm.model.quantize import QuantConfig, quantize_model

    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    llm = cpu_llms["llama_gqa"]
    model = quantize_model(copy.deepcopy(llm.model), QuantConfig(bits, 32 if bits == 4 else None, True))
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    prompts = PROMPTS[4:5]
    eager = Engine(model, llm.eos_token_ids, llm.tokenizer, max_num_seqs=4)
    compiled = Engine(model, llm.eos_token_ids, llm.tokenizer, compile=True, max_num_seqs=4)
    assert generate(compiled, prompts) == generate(eager, prompts)
    assert compiled.runner.graphs.compile_error is None and compiled.runner.graphs.choices == {1: "compiled"}


def test_forced_eager_never_compiles(cpu_llms, reference_kernels, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "eager")
    monkeypatch.setattr(CompiledDecodeSteps, "_run_compiled", lambda *a: pytest.fail("compiled under eager"))
    llm = cpu_llms["gpt2"]
    engine = compiled_engine(llm, max_num_seqs=4)
    assert generate(engine, PROMPTS[:2]) == reference_greedy(llm, PROMPTS[:2])
    assert set(engine.runner.graphs.choices.values()) == {"eager"}


def test_timed_choice_is_cached_and_an_eager_one_skips_compiling(cpu_llms, reference_kernels, own_cache, monkeypatch):
    llm = cpu_llms["llama_gqa"]
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


def test_a_failing_compile_falls_back_to_eager_steps(cpu_llms, reference_kernels, own_cache):
    llm = cpu_llms["gpt2"]
    engine = compiled_engine(llm, max_num_seqs=4)
    steps = engine.runner.graphs

    def broken(*args):
        raise RuntimeError("no C++ compiler")
    steps._compiled = broken
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        assert generate(engine, PROMPTS[:2]) == reference_greedy(llm, PROMPTS[:2])
    assert "no C++ compiler" in steps.compile_error and set(steps.choices.values()) == {"eager"}


def test_steps_beyond_the_compiled_buckets_run_eagerly(cpu_llms, reference_kernels, monkeypatch):
    monkeypatch.setattr(CompiledDecodeSteps, "_run_compiled", lambda *a: pytest.fail("compiled beyond bucket 8"))
    llm = cpu_llms["gpt2"]
    engine = compiled_engine(llm, max_num_seqs=16)
    steps = engine.runner.graphs
    assert steps.buckets == [1, 2, 4, 8] and steps.bucket_for(9) is None
    prompts = [p[:3] + [i + 3] for i, p in enumerate(PROMPTS * 2)][:10]  # 10 rows: no bucket, eager
    assert generate(engine, prompts) == reference_greedy(llm, prompts)


def test_compile_is_refused_on_a_gpu_pool(llms):
    llm = llms["gpt2"]
    if llm.device.type != "cuda":
        pytest.skip("needs the test LLMs on a GPU (FASTLM_TEST_DEVICE=cuda: benchmarks/gpu_check.py)")
    with pytest.raises(ValueError, match="compile=True is for one CPU process"):
        Engine(llm.model, llm.eos_token_ids, llm.tokenizer, compile=True)


def test_compile_is_refused_where_it_cannot_run(checkpoints):
    folder = str(checkpoints["gpt2"][0])
    with pytest.raises(ValueError, match="compile=True is not available with tensor_parallel_size > 1"):
        fastlm.LLM(folder, device="cpu", tensor_parallel_size=2, compile=True)


THREAD_PROMPTS = ["def read_config(path):", "class Foo(object):", "Once upon a time", "The quick brown fox"]


def _threads_with_an_abort(llm, prompts):
    """Each prompt generated on its own thread, all started at once; the first thread drops a stream of
    its prompt half-way (aborting that request) before its call. Returns ({prompt: text}, errors)."""
    import threading

    start, results, errors = threading.Barrier(len(prompts)), {}, []

    def work(prompt, abort):
        try:
            start.wait()
            if abort:
                stream = llm.stream(prompt, max_new_tokens=20, temperature=0)
                next(stream), next(stream)
                stream.close()  # aborts the request
            results[prompt] = llm.generate(prompt, max_new_tokens=20, temperature=0)
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p, i == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_threads_sharing_a_quantized_llm_with_an_abort(checkpoints, cpp_kernels, monkeypatch, tmp_path):
    """Four threads on one int4 LLM (the C++ GEMVs, QuantLinear's settled path, the kernel choice timed
    while they run), one of them dropping its stream half-way: each finished call gets the text the same
    quantized model gives alone, and every block is free after."""
    monkeypatch.setenv(cpu_choice.ENV_CACHE_DIR, str(tmp_path))
    path, options = str(checkpoints["llama_gqa"][0]), dict(dtype="float32", device="cpu", quantize="int4-g32")
    alone = fastlm.LLM(path, **options)
    try:
        solo = {p: alone.generate(p, max_new_tokens=20, temperature=0) for p in THREAD_PROMPTS}
    finally:
        alone.close()
    llm = fastlm.LLM(path, max_num_seqs=2, **options)
    try:
        results, errors = _threads_with_an_abort(llm, THREAD_PROMPTS)
        assert errors == [] and results == solo
        assert_all_free(llm.engine)
    finally:
        llm.close()


def test_threads_sharing_a_compiled_llm_with_an_abort(checkpoints, cpu_llms, reference_kernels, monkeypatch):
    """Four threads on one LLM(compile=True) (steps of 1 and 2 rows, compiled), one of them dropping its
    stream half-way: each finished call gets the eager LLM's text, and every block is free after."""
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    solo = {p: cpu_llms["llama_gqa"].generate(p, max_new_tokens=20, temperature=0) for p in THREAD_PROMPTS}
    llm = fastlm.LLM(str(checkpoints["llama_gqa"][0]), dtype="float32", device="cpu", compile=True, max_num_seqs=2)
    try:
        results, errors = _threads_with_an_abort(llm, THREAD_PROMPTS)
        assert errors == [] and results == solo
        steps = llm.engine.runner.graphs
        assert steps.compile_error is None and set(steps.choices.values()) == {"compiled"}
        assert_all_free(llm.engine)
    finally:
        llm.close()


def test_threads_sharing_an_llm_on_the_cpp_attention_with_an_abort(checkpoints, cpu_llms, cpp_kernels, monkeypatch):
    """The same four threads on one eager LLM whose decode attention is fastlm's C++ kernel (steps of 1
    and 2 rows): each call gets the PyTorch references' text, and every block is free after."""
    with monkeypatch.context() as references:
        references.setenv("FASTLM_KERNELS", "reference")
        solo = {p: cpu_llms["llama_gqa"].generate(p, max_new_tokens=20, temperature=0) for p in THREAD_PROMPTS}
    from fastlm.kernels import paged_attention

    decided = []  # the profiler does not see the engine's thread: record the dispatch decisions instead
    real = paged_attention._cpu_kernel_decodes
    monkeypatch.setattr(paged_attention, "_cpu_kernel_decodes", lambda *a: decided.append(real(*a)) or decided[-1])
    llm = fastlm.LLM(str(checkpoints["llama_gqa"][0]), dtype="float32", device="cpu", max_num_seqs=2)
    try:
        results, errors = _threads_with_an_abort(llm, THREAD_PROMPTS)
        assert errors == [] and results == solo
        assert decided and all(decided)  # every decode attention call took the C++ kernel
        assert_all_free(llm.engine)
    finally:
        llm.close()


@pytest.mark.parametrize("compiled", [False, True])
def test_cpp_gemv_and_decode_attention_give_the_oracle_tokens(compiled, cpu_llms, cpp_kernels, own_cache, monkeypatch):
    """Every packed linear's decode-sized calls through fastlm's C++ GEMV (forced) and the decode attention
    through its C++ kernel, in eager steps and inside compiled ones (steps of 1, 2 and 3 rows padded to 4)."""
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "gemv")
    llm = cpu_llms["llama_gqa"]
    engine = compiled_engine(llm, packed=True, max_num_seqs=4)
    for bucket in engine.runner.graphs.buckets:  # the step choice cached, as a timed one would be
        cpu_choice.default_cache().put(f"decode_step|{step_key(engine.model, bucket)}", "compiled" if compiled else "eager")
    prompts = [PROMPTS[0], PROMPTS[1][:5], PROMPTS[2][:9]]
    tokens, ran = ops_run(lambda: generate(engine, prompts))
    assert tokens == reference_greedy(llm, prompts)
    assert {"fastlm_cpu::gemv", "fastlm_cpu::paged_decode"} <= ran
    assert set(engine.runner.graphs.choices.values()) == {"compiled" if compiled else "eager"}
    assert_all_free(engine)


def test_compiled_steps_on_weights_in_huge_pages_give_the_oracle_tokens(own_cache, reference_kernels, tmp_path,
                                                                        monkeypatch):
    """Weights over 2 MB load into huge-page mappings (fastlm.model.hugepages), which Inductor's frozen
    graphs read as they do any other tensor's (parameters that were views of one storage decoded wrong
    tokens there)."""
    from fastlm.model import hugepages
    from tests.model.hf_models import build_hf_model

    build_hf_model("gpt2_tied_hd16", n_inner=4096).save_pretrained(tmp_path)  # ~4 MB of fp32 weights
    monkeypatch.setenv(cpu_choice.ENV_FORCE, "compiled")
    llm = fastlm.LLM(str(tmp_path), dtype="float32", device="cpu")
    if not hugepages.enabled("cpu"):
        pytest.skip("huge-page mappings are Linux-only")
    assert all(p.untyped_storage().data_ptr() == p.data_ptr() for p in llm.model.parameters())  # one storage each
    engine = compiled_engine(llm, max_num_seqs=2)
    prompts = [[5, 9, 13, 2, 7], [1, 3]]
    assert generate(engine, prompts) == reference_greedy(llm, prompts)
    assert engine.runner.graphs.compile_error is None
