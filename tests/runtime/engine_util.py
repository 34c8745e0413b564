"""Helpers of the engine tests: engines whose block accounting is checked at teardown, and a driver
that runs requests to completion."""
from typing import Dict, List

import pytest
import torch

from fastlm.runtime.engine import Engine
from fastlm.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=24, temperature=0)
# ids valid in both test vocabularies; lengths 1 to 45 (several blocks of 16, a partial one, one token)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42], [7] * 20, [100, 150], list(range(3, 48)), [77]]


def assert_all_free(engine: Engine) -> None:
    """Every block back in the free list with no reference, no request or sequence left."""
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert stats["running"] == stats["waiting"] == 0, stats
    assert not engine.requests
    assert all(block.ref_count == 0 for block in engine.blocks.blocks)


@pytest.fixture
def make_engine():
    """make_engine(llm, **engine options) -> Engine on llm's model; all blocks must be free at teardown."""
    made = []

    def make(llm, **options):
        engine = Engine(llm.model, llm.eos_token_ids, llm.tokenizer, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        assert_all_free(engine)


def run_to_end(engine: Engine, on_step=None) -> Dict[int, List[List[int]]]:
    """Step until nothing is left; -> request id -> token ids per sample. on_step(step number) runs
    before each step (to add or abort requests mid-way)."""
    requests, steps = {}, 0
    while True:
        if on_step is not None:
            on_step(steps)
        if not engine.has_unfinished():
            return requests
        for out in engine.step():
            samples = requests.setdefault(out.request_id, [])
            while len(samples) <= out.index:
                samples.append([])
            samples[out.index].extend(out.token_ids)
        steps += 1


def generate(engine: Engine, prompts, params=GREEDY) -> List[List[int]]:
    """Greedy (by default) ids of each prompt, all submitted at once."""
    rids = [engine.add_request(p, params) for p in prompts]
    results = run_to_end(engine)
    return [results[r][0] for r in rids]


@torch.no_grad()
def reference_greedy(llm, prompts, max_new_tokens: int = 24) -> List[List[int]]:
    """Greedy continuations by whole-sequence forwards (no KV cache at all): the engine's oracle. Stops
    at eos (not returned), after max_new_tokens or at the context."""
    model, eos, results = llm.model, set(llm.eos_token_ids), []
    for prompt in prompts:
        ids = list(prompt)
        while len(ids) - len(prompt) < max_new_tokens and len(ids) < model.config.max_seq_len:
            token = int(model(torch.tensor([ids], device=model.device), last_only=True)[0, -1].argmax())
            if token in eos:
                break
            ids.append(token)
        results.append(ids[len(prompt):])
    return results
