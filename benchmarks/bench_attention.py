"""Attention benchmark: fastlm's Triton kernels against torch scaled_dot_product_attention.

- prefill forward and backward TFLOP/s: 4·B·H·Sq·Sk·D (×0.5 causal, ×2.5 backward), Sq = Sk;
- decode GB/s: K/V bytes read (sum of lengths × Hkv × D × 2 tensors × element size), one new token
  per sequence; SDPA attends over the cache slice [0, L) (GQA by enable_gqa, no copies).
Ceilings measured in the same run: a large matmul (FLOP/s) and a large copy (GB/s).

    python benchmarks/bench_attention.py                 # GPU: 1k..16k prefill, 1k..128k decode (bf16)
    python benchmarks/bench_attention.py --quick --device cpu   # plumbing check (torch CPU path)
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (base_parser, check_device, describe_device, measure_copy_bandwidth,  # noqa: E402
                               measure_matmul_flops, plot, time_ms, write_csv)
from fastlm.kernels import decode_attention, flash_attention  # noqa: E402


def _sig(x, digits=4):
    return float(f"{x:.{digits}g}")


def sdpa(q, k, v, causal):
    """Peer: torch SDPA on (B, S, H, D) tensors."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def bench_prefill(device, dtype, seqlens, tokens, heads, head_dim, quick):
    rows = []
    for seqlen in seqlens:
        batch = max(1, tokens // seqlen)
        for causal in (True, False):
            q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
            for name, fn in (("fastlm", flash_attention), ("sdpa", sdpa)):
                fwd_ms = time_ms(lambda: fn(q, k, v, causal), device, reps=5 if quick else 20)
                out = fn(q, k, v, causal)
                bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), device,
                                 reps=5 if quick else 20)
                for pass_, ms, f in (("fwd", fwd_ms, flops), ("bwd", bwd_ms, 2.5 * flops)):
                    rows.append(dict(kind="prefill", impl=name, pass_=pass_, causal=causal, batch=batch,
                                     seqlen=seqlen, heads=heads, head_dim=head_dim, dtype=str(dtype)[6:],
                                     ms=_sig(ms), tflops=_sig(f / (ms * 1e-3) / 1e12)))
    return rows


def bench_decode(device, dtype, contexts, batch, q_heads, kv_heads, head_dim, quick):
    rows = []
    for context in contexts:
        q = torch.randn(batch, 1, q_heads, head_dim, device=device, dtype=dtype)
        k_cache, v_cache = (torch.randn(batch, context, kv_heads, head_dim, device=device, dtype=dtype)
                            for _ in range(2))
        seqlens = torch.full((batch,), context, dtype=torch.int32, device=device)
        kv_bytes = 2 * batch * context * kv_heads * head_dim * k_cache.element_size()
        peers = (("fastlm", lambda: decode_attention(q, k_cache, v_cache, seqlens)),
                 ("sdpa", lambda: sdpa(q, k_cache[:, :context], v_cache[:, :context], False)))
        for name, fn in peers:
            ms = time_ms(fn, device, reps=5 if quick else 20)
            rows.append(dict(kind="decode", impl=name, pass_="fwd", causal=True, batch=batch, seqlen=context,
                             heads=q_heads, head_dim=head_dim, dtype=str(dtype)[6:], ms=_sig(ms),
                             gbps=_sig(kv_bytes / (ms * 1e-3) / 1e9)))
    return rows


def report(rows, flops_ceiling, bw_ceiling):
    """Print fastlm next to SDPA for each configuration, with the ratio and the fraction of the ceiling."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["kind"], r["pass_"], r["causal"], r["seqlen"]), {})[r["impl"]] = r
    print(f"{'kind':<8}{'pass':<5}{'causal':<7}{'seqlen':>8}{'fastlm':>10}{'sdpa':>10}{'ratio':>7}{'of ceiling':>11}")
    for (kind, pass_, causal, seqlen), pair in by_key.items():
        metric, ceiling = ("tflops", flops_ceiling) if kind == "prefill" else ("gbps", bw_ceiling)
        ours, peer = pair["fastlm"][metric], pair["sdpa"][metric]
        ratio = ours / peer if peer else float("nan")
        pair["fastlm"]["ratio_vs_sdpa"] = _sig(ratio)
        pair["fastlm"]["fraction_of_ceiling"] = _sig(ours / ceiling)
        print(f"{kind:<8}{pass_:<5}{str(causal):<7}{seqlen:>8}{ours:>10.4g}{peer:>10.4g}{ratio:>7.2f}"
              f"{ours / ceiling:>11.1%}")


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    args = parser.parse_args(argv)
    device = check_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cuda":
        # sized for gpu_check's budget (~90 s with compiles): the targets are 4k-16k and 32k
        seqlens = [4096, 16384] if args.quick else [1024, 4096, 8192, 16384]
        contexts = [1024, 32768] if args.quick else [1024, 4096, 32768, 131072]
        prefill = dict(tokens=16384, heads=16, head_dim=128)
        decode = dict(batch=1, q_heads=32, kv_heads=8, head_dim=128)
    else:  # plumbing only: the CPU path is torch itself
        seqlens, contexts = [64, 128], [256, 1024]
        prefill = dict(tokens=256, heads=2, head_dim=64)
        decode = dict(batch=2, q_heads=4, kv_heads=2, head_dim=64)
    flops_ceiling = measure_matmul_flops(device, dtype if device.type == "cuda" else torch.float32)
    bw_ceiling = measure_copy_bandwidth(device, quick=args.quick)
    print(f"{describe_device(device)}, {str(dtype)[6:]}: matmul {flops_ceiling:.4g} TFLOP/s, "
          f"copy {bw_ceiling:.0f} GB/s")
    rows = bench_prefill(device, dtype, seqlens, quick=args.quick, **prefill)
    rows += bench_decode(device, dtype, contexts, quick=args.quick, **decode)
    report(rows, flops_ceiling, bw_ceiling)
    for r in rows:
        r.setdefault("ratio_vs_sdpa", "")
        r.setdefault("fraction_of_ceiling", "")
        r.setdefault("tflops", "")
        r.setdefault("gbps", "")
    tag = f"attention_{device.type}"
    print("wrote", write_csv(rows, os.path.join(args.out, f"{tag}.csv")))
    prefill_rows = [r for r in rows if r["kind"] == "prefill"]
    print("wrote", plot(prefill_rows, os.path.join(args.out, f"{tag}_prefill.png"), x="seqlen", y="tflops",
                        series=lambda r: f"{r['impl']} {r['pass_']} {'causal' if r['causal'] else 'full'}",
                        title=f"prefill attention, {str(dtype)[6:]}, D={prefill['head_dim']}",
                        ylabel="TFLOP/s", hline=flops_ceiling, hline_label="matmul ceiling"))
    print("wrote", plot([r for r in rows if r["kind"] == "decode"], os.path.join(args.out, f"{tag}_decode.png"),
                        x="seqlen", y="gbps", series="impl", xlabel="context", ylabel="GB/s (K/V read)",
                        title=f"decode attention, {str(dtype)[6:]}", hline=bw_ceiling, hline_label="copy ceiling"))


if __name__ == "__main__":
    main()
