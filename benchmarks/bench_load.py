"""Memory and time to load a checkpoint: fastlm's Transformer.from_pretrained vs transformers'
from_pretrained, on random GPT-2 and Llama checkpoints of ~100-250 MB written to a temp folder.

Each load runs in a fresh subprocess that first loads a tiny checkpoint of the same family (imports and
one-time setup, which cost ~70 MB for either library, are not charged), then reports its peak resident
memory (VmHWM, reset through /proc/self/clear_refs) minus the resident memory before loading. The figure that
matters is that delta divided by the checkpoint's size on disk: ~1.0 means one copy of the weights
(the loaded model), 2.0 would mean a second full copy existed at some point. Every weight is touched
after the load (a loader that maps the file lazily is charged once the weights are used), and the
resident increase is split into anonymous memory (owned by the process) and file-backed pages (the
model still aliases the checkpoint file through mmap).

    python benchmarks/bench_load.py [--quick] [--out benchmarks/out]
"""
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DEFAULT_OUT, write_csv  # noqa: E402

# name -> (model_type, HF config kwargs, dtype saved). fp32 GPT-2 ~200 MB, bf16 Llama ~120 MB.
CHECKPOINTS = {
    "gpt2-51M-fp32": ("gpt2", dict(vocab_size=50257, n_embd=512, n_layer=8, n_head=8, n_positions=1024), "float32"),
    "llama-59M-bf16": ("llama", dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
                       "bfloat16"),
}
QUICK = {"gpt2-12M-fp32": ("gpt2", dict(vocab_size=50257, n_embd=128, n_layer=2, n_head=4, n_positions=256), "float32")}


def _status_kb():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def child(loader, folder, warmup_folder):
    """Runs in the subprocess: load a tiny checkpoint of the same family first (so imports and one-time
    setup are not charged to the load), reset the peak, load, report JSON on stdout."""
    import gc

    if loader == "fastlm":
        from fastlm.model import Transformer

        load = lambda path: Transformer.from_pretrained(path)  # noqa: E731
    else:
        import transformers

        load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")  # noqa: E731
    load(warmup_folder)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status_kb()
    t0 = time.perf_counter()
    model = load(folder)
    seconds = time.perf_counter() - t0
    for p in model.parameters():  # touch every weight: a lazily mapped file is charged once it is used
        p.detach().sum()
    after = _status_kb()
    n_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    print(json.dumps({"seconds": seconds, "rss_before_kb": before["VmRSS"], "peak_kb": after["VmHWM"],
                      "rss_after_kb": after["VmRSS"], "anon_delta_kb": after["RssAnon"] - before["RssAnon"],
                      "file_delta_kb": after["RssFile"] - before["RssFile"], "param_bytes": n_bytes}))


def build_checkpoint(folder, model_type, kwargs, dtype):
    import torch
    import transformers

    config_cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[model_type]
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs))
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    del model
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def measure(loader, folder, warmup_folder):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", loader, folder, warmup_folder],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small checkpoint")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "FOLDER", "WARMUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlm_bench_load_") as tmp:
        for name, (model_type, kwargs, dtype) in (QUICK if args.quick else CHECKPOINTS).items():
            folder = os.path.join(tmp, name)
            disk = build_checkpoint(folder, model_type, kwargs, dtype)
            tiny = dict(kwargs, vocab_size=128, **({"n_layer": 1} if model_type == "gpt2" else {"num_hidden_layers": 1}))
            build_checkpoint(folder + "-warmup", model_type, tiny, dtype)
            for loader in ("fastlm", "transformers"):
                r = measure(loader, folder, folder + "-warmup")
                delta = (r["peak_kb"] - r["rss_before_kb"]) * 1024
                rows.append({"checkpoint": name, "loader": loader, "disk_MB": round(disk / 1e6, 1),
                             "peak_delta_MB": round(delta / 1e6, 1), "peak_over_disk": round(delta / disk, 2),
                             "anon_after_MB": round(r["anon_delta_kb"] * 1024 / 1e6, 1),
                             "file_backed_after_MB": round(r["file_delta_kb"] * 1024 / 1e6, 1),
                             "load_seconds": round(r["seconds"], 2)})
                print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    for name in dict.fromkeys(r["checkpoint"] for r in rows):
        ours, peer = (next(r for r in rows if r["checkpoint"] == name and r["loader"] == lo) for lo in ("fastlm", "transformers"))
        print(f"{name}: fastlm peak/disk {ours['peak_over_disk']} vs transformers {peer['peak_over_disk']}; "
              f"load time ratio fastlm/transformers {ours['load_seconds'] / max(peer['load_seconds'], 1e-9):.2f}")
    print("csv:", write_csv(rows, os.path.join(args.out, "bench_load.csv")))
    print("png:", _plot(rows, os.path.join(args.out, "bench_load.png")))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, loader in enumerate(("fastlm", "transformers")):
        values = [next(r["peak_over_disk"] for r in rows if r["checkpoint"] == n and r["loader"] == loader) for n in names]
        ax.bar([j + 0.4 * i for j in range(len(names))], values, width=0.4, label=loader)
    ax.axhline(1.0, color="gray", linestyle="--", label="one copy of the weights")
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel("peak RSS increase / size on disk")
    ax.set_title("Memory while loading a checkpoint (CPU)")
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
