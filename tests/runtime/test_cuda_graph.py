"""Pure-decode steps through DecodeGraphs: bucket sizes, padding rows that only touch the scratch block
(run eagerly on CPU, where there is no graph to capture), and on a GPU the graphs really replayed."""
import pytest
import torch

from fastlm.runtime.cuda_graph import DecodeGraphs, bucket_sizes
from fastlm.runtime.sampling import SamplingParams
from tests.runtime.engine_util import PROMPTS, generate, make_engine, reference_greedy  # noqa: F401


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(3) == [1, 2, 4]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes(100)[-1] == 128 and bucket_sizes(10 ** 6)[-1] == 512


def graphed(engine, capture):
    graphs = DecodeGraphs(engine.model, engine.pool, engine.scheduler.max_num_seqs,
                          engine.blocks.blocks_for(engine.model.config.max_seq_len), capture=capture)
    engine.runner.graphs = graphs
    buckets, run = [], graphs.run
    graphs.run = lambda ids, meta: (buckets.append((meta.num_decodes, graphs.bucket_for(meta.num_decodes))),
                                    run(ids, meta))[1]
    return graphs, buckets


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_padded_decode_steps_give_every_output(name, llms, make_engine, reference_kernels):
    llm = llms[name]
    engine = make_engine(llm, max_num_seqs=8)
    _, buckets = graphed(engine, capture=False)
    prompts = PROMPTS[:5]  # decode batches of 5 (bucket 8, three padding rows), then fewer as rows end
    assert generate(engine, prompts) == reference_greedy(llm, prompts)
    assert (5, 8) in buckets and all(b >= n for n, b in buckets)
    scratch = engine.pool.k[:, engine.pool.scratch_block]
    assert scratch.abs().sum() > 0  # padding rows wrote there, and nowhere else (outputs unchanged)


def test_no_capture_on_a_cpu_pool(llms, make_engine):
    engine = make_engine(llms["gpt2"])
    assert engine.runner.graphs is None  # the engine makes none for a CPU pool
    graphs = DecodeGraphs(engine.model, engine.pool, 4, 8)
    assert not graphs.capture and not graphs.uses_cuda_graph and graphs.capture_error is None


def test_a_failed_capture_falls_back_observably(llms, make_engine, reference_kernels, monkeypatch):
    llm = llms["gpt2"]
    engine = make_engine(llm, max_num_seqs=4)
    graphs, buckets = graphed(engine, capture=False)
    graphs.capture = True  # as on a GPU, with a capture that fails

    def broken_capture(bucket):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "_capture", broken_capture)
    with pytest.warns(UserWarning, match="capture of a decode step failed"):
        assert generate(engine, PROMPTS[:3]) == reference_greedy(llm, PROMPTS[:3])
    assert buckets and not graphs.uses_cuda_graph and not graphs.capture
    assert graphs.capture_error == "RuntimeError: operation not permitted when stream is capturing"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_steps_replay_captured_graphs_on_a_gpu(llms, make_engine):
    llm = llms["gpt2"]
    if llm.device.type != "cuda":
        pytest.skip("the test LLMs are on the CPU (FASTLM_TEST_DEVICE=cuda runs this)")
    engine = make_engine(llm, max_num_seqs=8)
    assert engine.runner.graphs is not None and engine.runner.graphs.capture
    assert generate(engine, PROMPTS[:5], SamplingParams(max_new_tokens=24, temperature=0)) == reference_greedy(
        llm, PROMPTS[:5])
    assert engine.runner.graphs.uses_cuda_graph, engine.runner.graphs.capture_error
    assert set(engine.runner.graphs.graphs) >= {8}
