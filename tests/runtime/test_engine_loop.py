"""EngineLoop: the step loop on a background thread, shared by threads and asyncio consumers."""
import asyncio
import threading

import pytest

from fastlm.runtime.engine.background import EngineLoop
from fastlm.runtime.sampling import SamplingParams
from tests.runtime.engine_util import GREEDY, PROMPTS, assert_all_free, make_engine, reference_greedy  # noqa: F401


@pytest.fixture
def loop_on(make_engine):
    """loop_on(llm, **engine options) -> a started EngineLoop, shut down at teardown."""
    loops = []

    def make(llm, **options):
        loops.append(EngineLoop(make_engine(llm, **options)))
        return loops[-1]

    yield make
    for loop in loops:
        loop.shutdown()


def collect(stream):
    """-> (token ids per sample, finish reasons per sample)."""
    ids, reasons = {}, {}
    for out in stream:
        ids.setdefault(out.index, []).extend(out.token_ids)
        if out.finished:
            reasons[out.index] = out.finish_reason
    return [ids[i] for i in sorted(ids)], [reasons[i] for i in sorted(reasons)]


def test_threads_sharing_one_loop_each_get_their_own_output(llms, loop_on, reference_kernels):
    llm = llms["llama_gqa"]
    expected = reference_greedy(llm, PROMPTS)
    loop = loop_on(llm)
    results = [None] * len(PROMPTS)

    def worker(i):
        results[i] = collect(loop.stream(PROMPTS[i], GREEDY))[0][0]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_asyncio_consumers_get_their_tokens_through_the_event_loop(llms, loop_on, reference_kernels):
    llm = llms["gpt2"]
    expected = reference_greedy(llm, PROMPTS[:3])
    loop = loop_on(llm)

    async def one(prompt):
        ids = []
        async for out in loop.astream(prompt, GREEDY):
            ids += out.token_ids
        return ids

    async def main():
        return await asyncio.gather(*(one(p) for p in PROMPTS[:3]))
    assert asyncio.run(main()) == expected


def test_leaving_a_stream_early_aborts_its_request(llms, loop_on, reference_kernels):
    llm = llms["gpt2"]
    loop = loop_on(llm)
    stream = loop.stream(PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))
    first = next(stream)
    assert first.token_ids
    stream.close()
    assert list(stream) == []
    # the abort is applied before the next request runs, so the engine is empty once that one is done
    ids, reasons = collect(loop.stream(PROMPTS[1], SamplingParams(max_new_tokens=3, temperature=0, n=2)))
    assert len(ids) == 2 and reasons == ["length", "length"]
    assert_all_free(loop.engine)


def test_a_failing_step_reaches_the_consumer_and_the_loop_goes_on(llms, loop_on, reference_kernels, monkeypatch):
    llm = llms["gpt2"]
    loop = loop_on(llm)
    run = loop.engine.runner.run
    calls = []

    def fail_once(step):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return run(step)
    monkeypatch.setattr(loop.engine.runner, "run", fail_once)
    with pytest.raises(RuntimeError, match="device lost"):
        collect(loop.stream(PROMPTS[0], GREEDY))
    assert collect(loop.stream(PROMPTS[0], GREEDY))[0][0] == reference_greedy(llm, PROMPTS[:1])[0]


def test_invalid_requests_fail_on_the_callers_thread(llms, loop_on):
    loop = loop_on(llms["gpt2"])
    with pytest.raises(ValueError, match="empty prompt"):
        loop.stream([], GREEDY)
    with pytest.raises(ValueError, match="params must be"):
        loop.stream([1, 2], None)
