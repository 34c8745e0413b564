"""Tensor-parallel inference through the engine on 2 CPU processes (gloo, 1 thread each): greedy tokens of
LLM(path, tensor_parallel_size=2) equal one process's for GPT-2 with an odd vocabulary (97, padded to 98),
a GQA Llama (4 query / 2 KV heads) and an MQA Llama (1 KV head, replicated on both ranks), on a batch of
prompts of mixed lengths run together (continuous batching, chunked prefill next to decodes, prefix
caching, n > 1 forks copying a KV block on every rank); rank 0 holds its shard only; a step's message
survives its encoding; arguments are checked before any process starts."""
import pytest
import torch

import fastlm
from fastlm.kernels._utils import KERNELS_ENV
from fastlm.model import ModelConfig
from fastlm.model.attention_metadata import AttentionMetadata
from fastlm.runtime.parallel.messages import decode_copies, decode_step, encode_copies, encode_step
from tests.model.hf_models import build_hf_model

MODELS = ("gpt2_untied_hd32", "llama_gqa_hd16", "llama3_tied_hd32")
SHARED = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # a full block of 8 that the second request reuses
PROMPTS = [SHARED + [30, 31], [40, 41, 42], [7] * 20, SHARED + [60], list(range(3, 43)), [77]]
# blocks of 8 tokens, at most 24 tokens per step (the 40-token prompt is prefilled in chunks, next to
# decodes), 4 sequences at once (the other prompts wait for a slot)
ENGINE = dict(block_size=8, max_num_batched_tokens=24, max_num_seqs=4)
TP = dict(tensor_parallel_size=2, threads_per_rank=1, dist_timeout=60)


@pytest.fixture(autouse=True)
def restore_threads():
    """Rank 0 is this process: LLM(..., threads_per_rank=1) sets its torch threads."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_engine")
    for name in MODELS:
        build_hf_model(name).save_pretrained(root / name)
    return {name: root / name for name in MODELS}


@pytest.fixture(scope="module")
def reference_env():
    """The PyTorch reference kernels in this process and in the ranks it starts (they inherit it)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KERNELS_ENV, "reference")
        yield


def _run(llm):
    """Greedy ids of PROMPTS together; the first two again (prefix cache hits); 3 samples of the 20-token
    prompt (forked at their first token: the partly filled block is copied)."""
    greedy = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    return (llm.generate_tokens(PROMPTS, **greedy), llm.generate_tokens(PROMPTS[:2], **greedy),
            llm.generate_tokens(PROMPTS[2:3], n=3, **greedy))


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_equal_one_process(folders, reference_env, name):
    single = fastlm.LLM(folders[name], dtype="float32", **ENGINE)
    expected, expected_stats = _run(single), single.stats()
    with fastlm.LLM(folders[name], dtype="float32", **TP, **ENGINE) as llm:
        got, stats = _run(llm), llm.stats()
        full, local = ModelConfig.from_hf(folders[name]), llm.model.config
    assert got == expected
    assert all(len(row) == 12 for row in got[0])  # eos ignored: every step of every prompt compared
    for key in ("prefix_cache_hit_tokens", "preemptions", "running", "waiting"):
        assert stats[key] == expected_stats[key], key
    assert stats["prefix_cache_hit_tokens"] >= 8 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert (local.n_head, local.intermediate_size) == (full.n_head // 2, full.intermediate_size // 2)
    assert llm.model.tok_emb.weight.shape[0] == 49  # vocabulary 97 padded to 98, half on each rank


def test_a_closed_llm_refuses_work(folders, reference_env):
    llm = fastlm.LLM(folders["llama_gqa_hd16"], dtype="float32", **TP)
    assert llm.generate_tokens([[1, 2, 3]], max_new_tokens=2, temperature=0)
    llm.close()
    assert all(proc.returncode == 0 for proc in llm.parallel.group.workers)  # rank 1 ended cleanly
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate_tokens([[1, 2, 3]], max_new_tokens=2, temperature=0)


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1"),
    (dict(tensor_parallel_size=2.0), "tensor_parallel_size must be an integer"),
    (dict(tensor_parallel_size=3), r"tensor_parallel_size \(3\) must divide the model's 4 attention heads"),
    (dict(tensor_parallel_size=8), "must divide the model's 4 attention heads"),
    (dict(tensor_parallel_size=2, quantize="int8"), "quantize is not available with tensor_parallel_size > 1"),
    (dict(tensor_parallel_size=2, threads_per_rank=0), "threads_per_rank must be >= 1"),
    (dict(tensor_parallel_size=2, dist_timeout=0), "dist_timeout must be > 0"),
    (dict(tensor_parallel_size=2, block_size=0), "block_size must be an integer >= 1"),
    (dict(tensor_parallel_size=2, device="cpu:1"), "device must be 'cpu' or 'cuda'"),
    (dict(threads_per_rank=2), "threads_per_rank applies with tensor_parallel_size > 1"),
])
def test_bad_arguments_fail_before_any_rank_starts(folders, options, message):
    with pytest.raises(ValueError, match=message):
        fastlm.LLM(folders["llama_gqa_hd16"], **options)
    assert not torch.distributed.is_initialized()


def _step_metadata():
    """A step of 2 decode rows and 2 prefill chunks (5 and 2 tokens) with odd block tables."""
    i32 = torch.int32
    pool = torch.zeros(1, 9, 4, 1, 2)
    return torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13]), AttentionMetadata(
        positions=torch.tensor([3, 17, 0, 1, 2, 3, 4, 9, 10]), slot_mapping=torch.tensor([3, 29, 8, 9, 10, 11, 12, 30, 31]),
        k_pool=pool, v_pool=pool, num_decodes=2,
        decode_block_tables=torch.tensor([[0, 0, 0], [5, 6, 7]], dtype=i32), decode_seqlens=torch.tensor([4, 18], dtype=i32),
        prefill_block_tables=torch.tensor([[2, 3], [1, 7]], dtype=i32), prefill_cu_seqlens_q=torch.tensor([0, 5, 7], dtype=i32),
        prefill_seqlens_k=torch.tensor([5, 11], dtype=i32), logits_indices=torch.tensor([0, 1, 8]))


def test_a_step_message_decodes_to_the_same_step():
    input_ids, meta = _step_metadata()
    sizes, payload = encode_step(input_ids, meta)
    names = ("tokens", "decodes", "decode_width", "prefills", "prefill_width", "logits", "copies")
    k_pool, v_pool = torch.ones(1, 9, 4, 1, 2), torch.full((1, 9, 4, 1, 2), 2.0)
    ids, got = decode_step(dict(zip(names, sizes)), payload, k_pool, v_pool)
    assert torch.equal(ids, input_ids) and got.k_pool is k_pool and got.v_pool is v_pool
    assert got.num_decodes == meta.num_decodes
    for field in ("positions", "slot_mapping", "decode_block_tables", "decode_seqlens", "prefill_block_tables",
                  "prefill_cu_seqlens_q", "prefill_seqlens_k", "logits_indices"):
        mine, theirs = getattr(got, field), getattr(meta, field)
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), field
    sizes, payload = encode_copies([(3, 8), (4, 0)])
    assert decode_copies(dict(zip(names, sizes)), payload) == [(3, 8), (4, 0)]


def test_threads_and_an_aborted_request_on_one_tensor_parallel_llm(folders, reference_env):
    """Several threads share one tensor-parallel LLM, each getting its one-process result, while another
    request is dropped half-way (aborted): its blocks are freed on every rank and nothing else changes."""
    import threading

    from fastlm.runtime.sampling import SamplingParams

    greedy = dict(max_new_tokens=10, temperature=0, ignore_eos=True)
    single = fastlm.LLM(folders["llama_gqa_hd16"], dtype="float32", **ENGINE)
    expected = {i: single.generate_tokens([p], **greedy)[0] for i, p in enumerate(PROMPTS[:4])}
    with fastlm.LLM(folders["llama_gqa_hd16"], dtype="float32", **TP, **ENGINE) as llm:
        dropped = llm.engine_loop.stream(PROMPTS[4], SamplingParams(max_new_tokens=30, temperature=0,
                                                                    ignore_eos=True))
        next(dropped)
        start, results, errors = threading.Barrier(4), {}, []

        def work(i):
            try:
                start.wait()
                results[i] = [llm.generate_tokens([PROMPTS[i]], **greedy)[0] for _ in range(2)]
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        next(dropped)
        dropped.close()  # aborted while the threads' requests run
        for t in threads:
            t.join()
        stats = llm.stats()
    assert errors == [] and results == {i: [ids, ids] for i, ids in expected.items()}
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["running"] == stats["waiting"] == 0
