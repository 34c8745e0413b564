"""paged_kv_write: new keys and values land in their slots of the pool and nowhere else (eager and under
torch.compile, where it is an op writing the pool in place); bad arguments are named."""
import pytest
import torch

from fastlm.kernels import paged_kv_write


def pools(blocks=5, block_size=4, heads=2, dim=8, dtype=torch.float32):
    k = torch.randn(blocks, block_size, heads, dim, dtype=dtype)
    return k, torch.randn_like(k)


def expected(pool, slots, new):
    flat = pool.clone().view(-1, *pool.shape[2:])
    for i, slot in enumerate(slots.tolist()):
        flat[slot] = new[i]
    return flat.view(pool.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_exactly_the_slots(dtype):
    k_pool, v_pool = pools(dtype=dtype)
    slots = torch.tensor([0, 7, 19, 3])  # block 0, 1, 4 (last slot), 0
    k, v = torch.randn(4, 2, 8, dtype=dtype), torch.randn(4, 2, 8, dtype=dtype)
    want_k, want_v = expected(k_pool, slots, k), expected(v_pool, slots, v)
    paged_kv_write(k_pool, v_pool, slots, k, v)
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)


def test_in_place_under_torch_compile():
    k_pool, v_pool = pools()
    slots, k, v = torch.tensor([2, 9]), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    want_k, want_v = expected(k_pool, slots, k), expected(v_pool, slots, v)
    layer = k_pool.data_ptr()
    compiled = torch.compile(lambda kp, vp, s, a, b: paged_kv_write(kp, vp, s, a, b, check_values=False), backend="eager")
    compiled(k_pool, v_pool, slots, k, v)
    assert k_pool.data_ptr() == layer and torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)


@pytest.mark.parametrize("case,match", [
    ("k_shape", "k must have shape"), ("v_dtype", "v must have the same dtype as k_cache"),
    ("slot_dtype", "slot_mapping must have dtype in \\(int64\\)"), ("slot_len", "slot_mapping must have shape"),
    ("pool_shape", "v_cache must have shape"), ("slot_range", "slot_mapping entries must be in \\[0, 20\\)"),
    ("negative", "slot_mapping entries must be in"),
])
def test_bad_arguments_are_named(case, match):
    k_pool, v_pool = pools()
    slots, k, v = torch.tensor([1, 2]), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    if case == "k_shape":
        k = torch.randn(2, 3, 8)
    elif case == "v_dtype":
        v = v.half()
    elif case == "slot_dtype":
        slots = slots.int()
    elif case == "slot_len":
        slots = torch.tensor([1, 2, 3])
    elif case == "pool_shape":
        v_pool = v_pool[:4]
    elif case == "slot_range":
        slots = torch.tensor([1, 20])
    elif case == "negative":
        slots = torch.tensor([-1, 2])
    before = k_pool.clone()
    with pytest.raises(ValueError, match=match):
        paged_kv_write(k_pool, v_pool, slots, k, v)
    assert torch.equal(k_pool, before)  # nothing written
