"""Tensor parallelism on 2 CPU processes (gloo, 1 thread each): the logits equal the single-process
model's within 1e-5 in fp32 (full forwards, all positions and the last one only) for GPT-2 with an odd
vocabulary (97, padded to 98), a GQA Llama (4 query / 2 KV heads) and an MQA Llama (1 KV head, replicated, tied embeddings);
each rank holds only its slices."""
import os
import socket
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastlm.model import Transformer
from fastlm.model.parallel import Shard, check_splittable
from fastlm.model.parallel_loading import load_tensor_parallel
from tests.model.hf_models import VOCAB, build_hf_model

MODELS = ("gpt2_untied_hd32", "llama_gqa_hd16", "llama3_tied_hd32")
WORLD = 2


def _inputs():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (3, 11), generator=generator)


def _run(model, ids):
    """(logits of every position, logits of the last position only) of full forwards."""
    return model(ids), model(ids[:2, :5], last_only=True)


def _worker(rank, port, folders, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        for name, folder in folders.items():
            model = load_tensor_parallel(folder, rank=rank, world_size=WORLD, dtype=torch.float32)
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            with torch.no_grad():
                full, last = _run(model, _inputs())
            torch.save({"shapes": shapes, "full": full, "last": last}, f"{results}/{name}-{rank}.pt")
        # both ranks done with every collective before either tears gloo down (a rank leaving early
        # aborted its peer once: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # end without finalizing the interpreter (the results are on disk): a gloo thread taking the GIL during
    # finalization still aborted a rank after the barrier (SIGABRT in a fresh-clone run), as in fastlm's
    # own tensor-parallel workers and torchrun training ranks, which end the same way
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    folders = {}
    for name in MODELS:
        folders[name] = str(root / name)
        build_hf_model(name).save_pretrained(folders[name])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("FASTLM_KERNELS", "reference")  # the spawned ranks inherit it
        mp_env.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(port, folders, str(root)), nprocs=WORLD, join=True)
    return folders, root


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_the_single_process_model(parallel_run, name, reference_kernels):
    """Within 1e-5 of the largest logit (the MQA model's reach 29, where fp32 itself is 3e-5 off), and
    no further from transformers' fp64 logits than the single-process model is (the suite's rule)."""
    folders, root = parallel_run
    model = Transformer.from_pretrained(folders[name], dtype=torch.float32)
    with torch.no_grad():
        want_full, want_last = _run(model, _inputs())
        exact = build_hf_model(name).double()(_inputs()).logits
    got = [torch.load(root / f"{name}-{rank}.pt", weights_only=True) for rank in range(WORLD)]
    tolerance = 1e-5 * max(1.0, want_full.abs().max().item())
    torch.testing.assert_close(got[0]["full"], want_full, rtol=0, atol=tolerance)
    torch.testing.assert_close(got[0]["last"], want_last, rtol=0, atol=tolerance)
    error, single_error = ((logits.double() - exact).abs().max().item() for logits in (got[0]["full"], want_full))
    assert error <= 2 * single_error + 1e-6
    assert got[1]["full"] is None and got[1]["last"] is None  # the logits are gathered on rank 0


@pytest.mark.parametrize("name", MODELS)
def test_each_rank_holds_its_slices(parallel_run, name):
    folders, root = parallel_run
    cfg = Transformer.from_pretrained(folders[name]).config
    for rank in range(WORLD):
        shapes = torch.load(root / f"{name}-{rank}.pt", weights_only=True)["shapes"]
        shard = Shard(rank, WORLD, cfg)
        (qa, qb), (ka, kb) = shard.q_heads, shard.kv_heads
        assert shapes["layers.0.attn.wqkv.weight"] == ((qb - qa + 2 * (kb - ka)) * cfg.head_dim, cfg.dim)
        assert shapes["layers.0.attn.wo.weight"] == (cfg.dim, (qb - qa) * cfg.head_dim)
        assert shapes["layers.0.mlp.w_down.weight"] == (cfg.dim, cfg.intermediate_size // WORLD)
        assert shapes["tok_emb.weight"] == ((VOCAB + 1) // WORLD, cfg.dim)  # 97 padded to 98


def test_kv_heads_are_replicated_when_fewer_than_ranks():
    from fastlm.model import ModelConfig

    cfg = ModelConfig(vocab_size=97, dim=64, n_layer=1, n_head=8, n_kv_head=2)
    assert [Shard(r, 4, cfg).kv_heads for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [Shard(r, 4, cfg).q_heads for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert Shard(0, 4, cfg).local_config().n_kv_head == 1


@pytest.mark.parametrize("heads, kv_heads, world, message", [(6, 6, 4, "attention heads"), (8, 4, 3, "attention heads"),
                                                             (12, 4, 6, "KV heads")])
def test_unsplittable_models_are_refused(heads, kv_heads, world, message):
    from fastlm.model import ModelConfig

    cfg = ModelConfig(vocab_size=97, dim=96, n_layer=1, n_head=heads, n_kv_head=kv_heads)
    with pytest.raises(ValueError, match=message):
        check_splittable(cfg, world)
