"""Paged attention benchmark: fastlm's paged kernels against the dense kernels and torch SDPA on gathered K/V.

The K/V pool holds blocks of 16 tokens placed in random order (as a long-running engine leaves them).
- decode GB/s: K/V bytes read (sum of lengths x Hkv x D x 2 tensors x element size), one new token per
  row. Peers: fastlm's dense decode_attention over contiguous (B, S, Hkv, D) caches (the bound paging
  should reach), and "gather + SDPA" (index_select of the rows' tokens out of the pool, then torch SDPA:
  what paging costs without a paged kernel).
- prefill TFLOP/s: 4 x Hq x D x (visible query-key pairs) for chunks of new tokens over a cached prefix
  (causal, bottom-right). Peers: fastlm's dense flash_attention on the same rows, and gather + SDPA.
Ceilings measured in the same run: a large copy (GB/s) and a large matmul (TFLOP/s).

    python benchmarks/bench_paged_attention.py                      # GPU, bf16
    python benchmarks/bench_paged_attention.py --quick --device cpu  # plumbing check (the CPU reference)
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (base_parser, check_device, describe_device, measure_copy_bandwidth,  # noqa: E402
                               measure_matmul_flops, plot, time_ms_each, write_csv)
from fastlm.kernels import (decode_attention, flash_attention, paged_decode_attention,  # noqa: E402
                            paged_prefill_attention)

BLOCK_SIZE = 16


def _sig(x, digits=4):
    return float(f"{x:.{digits}g}")


def shuffled_pool(k, v):
    """Dense (B, S, Hkv, D) K/V laid out as a pool of BLOCK_SIZE-token blocks in random order, with the
    block tables int32 (B, S / BLOCK_SIZE) and the token slots (B, S) for the gather peer."""
    B, S = k.shape[:2]
    n = S // BLOCK_SIZE
    tables = torch.randperm(B * n, device=k.device).to(torch.int32).view(B, n)
    pools = []
    for dense in (k, v):
        pool = torch.empty((B * n, BLOCK_SIZE) + dense.shape[2:], dtype=dense.dtype, device=dense.device)
        pool[tables.long().flatten()] = dense.reshape(B * n, BLOCK_SIZE, *dense.shape[2:])
        pools.append(pool)
    p = torch.arange(S, device=k.device)
    slots = tables.long()[:, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE  # (B, S)
    return pools[0], pools[1], tables, slots


def gather_sdpa(q, k_pool, v_pool, slots, mask=None, causal=False):
    """Peer: gather each row's tokens out of the pool, then torch SDPA on (B, S, H, D) views."""
    B, S = slots.shape
    k = k_pool.flatten(0, 1).index_select(0, slots.flatten()).view(B, S, *k_pool.shape[2:])
    v = v_pool.flatten(0, 1).index_select(0, slots.flatten()).view(B, S, *v_pool.shape[2:])
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def bench_decode(device, dtype, contexts, batch, q_heads, kv_heads, head_dim, reps):
    rows = []
    for context in contexts:
        q = torch.randn(batch, 1, q_heads, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, context, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
        k_pool, v_pool, tables, slots = shuffled_pool(k, v)
        seqlens = torch.full((batch,), context, dtype=torch.int32, device=device)
        kv_bytes = 2 * batch * context * kv_heads * head_dim * k.element_size()
        ms = time_ms_each({"fastlm_paged": lambda: paged_decode_attention(q, k_pool, v_pool, tables, seqlens),
                           "dense": lambda: decode_attention(q, k, v, seqlens),
                           "gather_sdpa": lambda: gather_sdpa(q, k_pool, v_pool, slots)}, device, reps=reps)
        rows += [dict(kind="decode", impl=name, batch=batch, q_len=1, context=context, heads=q_heads,
                      kv_heads=kv_heads, head_dim=head_dim, dtype=str(dtype)[6:], ms=_sig(t),
                      gbps=_sig(kv_bytes / (t * 1e-3) / 1e9)) for name, t in ms.items()]
    return rows


def bench_prefill(device, dtype, shapes, q_heads, kv_heads, head_dim, reps):
    """shapes: (batch, prefix, chunk): each row has `prefix` cached tokens and `chunk` new ones."""
    rows = []
    for batch, prefix, chunk in shapes:
        context = prefix + chunk
        q = torch.randn(batch, chunk, q_heads, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, context, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
        k_pool, v_pool, tables, slots = shuffled_pool(k, v)
        cu = torch.arange(0, (batch + 1) * chunk, chunk, dtype=torch.int32, device=device)
        seqlens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q_packed = q.flatten(0, 1)  # (B * chunk, Hq, D)
        positions = torch.arange(chunk, device=device)[:, None] + prefix  # bottom-right causal mask
        mask = None if prefix == 0 else torch.arange(context, device=device) <= positions
        pairs = batch * (chunk * prefix + chunk * (chunk + 1) // 2)  # visible query-key pairs
        flops = 4 * q_heads * head_dim * pairs
        paged = (q_packed, k_pool, v_pool, tables, cu, seqlens)
        ms = time_ms_each({"fastlm_paged": lambda: paged_prefill_attention(*paged),
                           "dense": lambda: flash_attention(q, k, v, causal=True),
                           "gather_sdpa": lambda: gather_sdpa(q, k_pool, v_pool, slots, mask, causal=prefix == 0)},
                          device, reps=reps)
        rows += [dict(kind="prefill", impl=name, batch=batch, q_len=chunk, context=context, heads=q_heads,
                      kv_heads=kv_heads, head_dim=head_dim, dtype=str(dtype)[6:], ms=_sig(t),
                      tflops=_sig(flops / (t * 1e-3) / 1e12)) for name, t in ms.items()]
    return rows


def report(rows, flops_ceiling, bw_ceiling):
    """Print the paged kernel next to its peers, with the ratios and the fraction of the ceiling."""
    groups = {}
    for r in rows:
        groups.setdefault((r["kind"], r["batch"], r["q_len"], r["context"]), {})[r["impl"]] = r
    print(f"{'kind':<8}{'batch':>6}{'q_len':>7}{'context':>8}{'paged':>10}{'dense':>10}{'gather+sdpa':>12}"
          f"{'x dense':>9}{'x gather':>9}{'of ceiling':>11}")
    for (kind, batch, q_len, context), group in groups.items():
        metric, ceiling = ("tflops", flops_ceiling) if kind == "prefill" else ("gbps", bw_ceiling)
        ours, dense, gathered = (group[name][metric] for name in ("fastlm_paged", "dense", "gather_sdpa"))
        group["fastlm_paged"].update(ratio_vs_dense=_sig(ours / dense), ratio_vs_gather_sdpa=_sig(ours / gathered),
                                     fraction_of_ceiling=_sig(ours / ceiling))
        print(f"{kind:<8}{batch:>6}{q_len:>7}{context:>8}{ours:>10.4g}{dense:>10.4g}{gathered:>12.4g}"
              f"{ours / dense:>9.2f}{ours / gathered:>9.2f}{ours / ceiling:>11.1%}")


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    args = parser.parse_args(argv)
    device = check_device(args.device, args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    heads = dict(q_heads=32, kv_heads=8, head_dim=128)
    if device.type == "cuda":  # sized for gpu_check's budget
        contexts = [1024, 8192] if args.quick else [1024, 4096, 16384, 65536]
        decode_batch = 32 if args.quick else 16
        shapes = [(4, 0, 2048), (2, 4096, 1024)] if args.quick else [(8, 0, 2048), (4, 4096, 1024), (1, 0, 8192)]
        reps = 20
    else:  # plumbing only: the CPU path is the PyTorch reference
        contexts, decode_batch, shapes, reps = [64, 256], 2, [(2, 0, 32), (2, 64, 16)], 3
        heads = dict(q_heads=4, kv_heads=2, head_dim=64)
    flops_ceiling = measure_matmul_flops(device, dtype if device.type == "cuda" else torch.float32)
    bw_ceiling = measure_copy_bandwidth(device, quick=args.quick)
    print(f"{describe_device(device)}, {str(dtype)[6:]}: matmul {flops_ceiling:.4g} TFLOP/s, "
          f"copy {bw_ceiling:.0f} GB/s")
    rows = bench_decode(device, dtype, contexts, decode_batch, reps=reps, **heads)
    rows += bench_prefill(device, dtype, shapes, reps=reps, **heads)
    report(rows, flops_ceiling, bw_ceiling)
    for r in rows:
        for key in ("gbps", "tflops", "ratio_vs_dense", "ratio_vs_gather_sdpa", "fraction_of_ceiling"):
            r.setdefault(key, "")
    tag = f"paged_attention_{device.type}"
    print("wrote", write_csv(rows, os.path.join(args.out, f"{tag}.csv")))
    print("wrote", plot([r for r in rows if r["kind"] == "decode"], os.path.join(args.out, f"{tag}_decode.png"),
                        x="context", y="gbps", series="impl", ylabel="GB/s (K/V read)", hline=bw_ceiling,
                        hline_label="copy ceiling", title=f"paged decode attention, batch {decode_batch}, "
                        f"{str(dtype)[6:]}, page {BLOCK_SIZE}"))
    print("wrote", plot([r for r in rows if r["kind"] == "prefill"], os.path.join(args.out, f"{tag}_prefill.png"),
                        x="context", y="tflops", series="impl", ylabel="TFLOP/s", hline=flops_ceiling,
                        hline_label="matmul ceiling", title=f"paged prefill attention, {str(dtype)[6:]}"))


if __name__ == "__main__":
    main()
