"""The GPU read-back path of the generation loop: the host reads the device's token buffer every
`sync_every` steps (8 on a GPU); on CPU it reads every step, so these tests force the other intervals.
Every interval must give the ids of interval 1: eos inside a read window, a token count that is not a
multiple of the interval, ragged batches, stop strings. Also: which decode step make_decode_step chose."""
import types

import pytest
import torch

import fastlm.runtime.cuda_graph as cuda_graph
import fastlm.runtime.llm as llm_module
from fastlm.runtime.generate import STOP_CHECK_INTERVAL, DecodeStep, TokenLoop, generate_ids
from fastlm.runtime.sampling import SamplingParams
from tests.conftest import ON_CUDA

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42], [7] * 20, [100, 150]]  # ragged
INTERVALS = [1, 3, STOP_CHECK_INTERVAL]
N_NEW = 19  # a multiple of none of the intervals


def run_loop(model, prompts, params, eos_ids, sync_every):
    """(ids per row, the chunks the loop yielded) with the host reading every `sync_every` steps."""
    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + params.max_new_tokens)
    loop = TokenLoop(model, cache, DecodeStep(model, cache), prompts, params, eos_ids, sync_every=sync_every)
    chunks = list(loop)
    return [sum((chunk[row] for chunk in chunks), []) for row in range(len(prompts))], chunks


@pytest.fixture
def model(llms, reference_kernels):
    return llms["llama_gqa"].model


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=1.3, top_k=40, seed=7),
                                     dict(temperature=0.9, repetition_penalty=1.5, seed=2)],
                         ids=["greedy", "sampled", "penalty"])
@pytest.mark.parametrize("interval", INTERVALS[1:])
def test_every_interval_gives_the_ids_of_interval_1(model, interval, options):
    params = SamplingParams(max_new_tokens=N_NEW, **options)
    expected, _ = run_loop(model, PROMPTS, params, (), 1)
    assert [len(ids) for ids in expected] == [N_NEW] * len(PROMPTS)
    ids, chunks = run_loop(model, PROMPTS, params, (), interval)
    assert ids == expected
    # Reads every `interval` steps and once more at the end for the partial last window.
    full_windows, rest = divmod(N_NEW, interval)
    assert [len(chunk[0]) for chunk in chunks] == [interval] * full_windows + [rest] * (rest > 0)


@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("eos_at", [4, 9])  # inside windows of 3 and of 8, not at their ends
def test_eos_inside_a_read_window_ends_that_row_exactly(model, interval, eos_at):
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0)
    free, _ = run_loop(model, PROMPTS, params, (), 1)
    eos = free[0][eos_at]
    assert eos not in free[0][:eos_at]
    expected = [ids[:ids.index(eos)] if eos in ids else ids for ids in free]
    assert any(len(ids) == N_NEW for ids in expected)  # a row that runs on after another one ended
    ids, chunks = run_loop(model, PROMPTS, params, (eos,), interval)
    assert ids == expected
    rows_done_at = [next(i for i, c in enumerate(chunks) if sum(len(x[row]) for x in chunks[:i + 1]) == len(e))
                    for row, e in enumerate(expected)]
    assert all(chunk[row] == [] for row, done in enumerate(rows_done_at) for chunk in chunks[done + 1:])


@pytest.mark.parametrize("interval", INTERVALS)
def test_the_loop_stops_reading_once_every_row_is_done(model, interval):
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0)
    free, _ = run_loop(model, PROMPTS[:1], params, (), 1)
    eos = free[0][4]
    assert eos not in free[0][:4]
    _, chunks = run_loop(model, PROMPTS[:1], params, (eos,), interval)
    assert len(chunks) == 4 // interval + 1  # the window holding the eos is the last one read


@pytest.fixture
def read_every(monkeypatch):
    """Make LLM read every k steps on CPU, as it does (every STOP_CHECK_INTERVAL) on a GPU."""
    def force(k):
        monkeypatch.setattr(llm_module, "default_sync_every", lambda device, streaming: k)
    return force


@pytest.mark.parametrize("interval", INTERVALS[1:])
def test_llm_ids_and_stop_strings_with_a_read_interval(llms, reference_kernels, read_every, interval):
    from tests.runtime.test_generate import clean_substring

    llm = llms["gpt2"]
    prompts = ["The quick brown fox", "Once", "naïve café and more words"]
    free_text = llm.generate(prompts, max_new_tokens=N_NEW, temperature=0)
    free_ids = llm.generate_tokens([llm.tokenizer.encode(p) for p in prompts], max_new_tokens=N_NEW, temperature=0)
    stop = clean_substring(free_text[0], 2, 2)
    stopped = llm.generate(prompts, max_new_tokens=N_NEW, temperature=0, stop=stop)
    assert stopped[0] == free_text[0][:free_text[0].index(stop)]
    read_every(interval)
    assert llm.generate(prompts, max_new_tokens=N_NEW, temperature=0) == free_text
    assert llm.generate_tokens([llm.tokenizer.encode(p) for p in prompts], max_new_tokens=N_NEW,
                               temperature=0) == free_ids
    assert llm.generate(prompts, max_new_tokens=N_NEW, temperature=0, stop=stop) == stopped


def test_cuda_graph_step_refuses_a_cpu_cache(model):
    cpu_cache = model.new_cache(1, 16, device="cpu")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA cache, got device cpu"):
        cuda_graph.GraphedDecodeStep(model, cpu_cache)
    step = cuda_graph.make_decode_step(model, cpu_cache)
    assert isinstance(step, DecodeStep) and not step.uses_cuda_graph and step.capture_error is None


def test_failed_capture_falls_back_observably(model, monkeypatch):
    def broken_capture(model, cache):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "GraphedDecodeStep", broken_capture)
    gpu_like_cache = types.SimpleNamespace(device=torch.device("cuda"))
    with pytest.warns(UserWarning, match="capture of the decode step failed"):
        step = cuda_graph.make_decode_step(model, gpu_like_cache)
    assert not step.uses_cuda_graph
    assert step.capture_error == "RuntimeError: operation not permitted when stream is capturing"


@pytest.mark.skipif(not ON_CUDA, reason="needs a GPU (FASTLM_TEST_DEVICE=cuda); on CPU the tests above cover "
                                        "the refusal and the fallback")
def test_generation_on_a_gpu_replays_the_captured_graph(checkpoints):
    from fastlm.model import Transformer

    model = Transformer.from_pretrained(checkpoints["llama_gqa"][0], dtype=torch.float32, device="cuda")
    steps = []

    def graphed(model, cache):
        steps.append(cuda_graph.make_decode_step(model, cache))
        return steps[-1]

    params = SamplingParams(max_new_tokens=N_NEW, temperature=0)
    with torch.no_grad():
        ids = generate_ids(model, PROMPTS, params, step_factory=graphed)
    assert len(steps) == 1 and steps[0].uses_cuda_graph, steps[0].capture_error
    assert ids == generate_ids(model, PROMPTS, params, step_factory=DecodeStep)
