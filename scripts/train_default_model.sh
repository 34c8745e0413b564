#!/usr/bin/env bash
# Rebuild fastlm's embedded default model (fastlm/default_model/) with `fastlm train` itself.
#
# Corpus: the Python standard library's own source (*.py under sysconfig's stdlib path, without test
# directories, site-packages, the generated codec tables in encodings/ and pydoc_data's help text), one
# file after another separated by <|endoftext|>, in sorted path order. Every 40th file is held out as
# the evaluation text. A byte-level BPE tokenizer (4096 tokens) is trained on the training text by
# `fastlm train`, then the "default" preset (Llama-style, dim 128, 4 layers, 4 heads / 2 KV heads, context
# 512, tied embeddings: 1.3M parameters) trains for 1000 steps of 8 x 512 tokens (4.1M tokens, ~1.4 epochs)
# with bf16 autocast on the CPU (fp32 master weights; about 1.4x faster than fp32 on AVX512-BF16 cores).
#
# Usage: scripts/train_default_model.sh [WORK_DIR]   (default /tmp/fastlm_default_model)
# Then copy WORK_DIR/out/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,special_tokens_map.json,
# generation_config.json} into fastlm/default_model/ (the script does it when COPY=1).
set -euo pipefail

WORK=${1:-/tmp/fastlm_default_model}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"

python - "$WORK" <<'EOF'
import sys, sysconfig
from pathlib import Path

work = Path(sys.argv[1])
root = Path(sysconfig.get_paths()["stdlib"])
skip_dirs = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}
files = sorted(p for p in root.rglob("*.py")
               if not skip_dirs & set(p.relative_to(root).parts[:-1]) and not p.name.startswith("_sysconfigdata"))
train, evals = [], []
for i, path in enumerate(files):
    (evals if i % 40 == 20 else train).append(path.read_text(encoding="utf-8", errors="replace"))
sep = "<|endoftext|>"
for name, texts in (("train.txt", train), ("eval.txt", evals)):
    data = sep.join(texts) + sep
    (work / name).write_text(data, encoding="utf-8")
    print(f"{name}: {len(texts)} files, {len(data.encode('utf-8'))} bytes", file=sys.stderr)
EOF

cd "$REPO"
python -m fastlm.cli train --data "$WORK/train.txt" --eval "$WORK/eval.txt" --config default \
    --vocab-size 4096 --block-size 512 --batch-size 8 --steps 1000 --lr 2e-3 --warmup 50 --min-lr-ratio 0.1 \
    --weight-decay 0.1 --clip 1.0 --eval-every 250 --save-every 250 --precision bf16 --device cpu --seed 0 \
    --out "$WORK/out" ${RESUME:+--resume}

if [ "${COPY:-0}" = 1 ]; then
    for f in config.json model.safetensors tokenizer.json tokenizer_config.json special_tokens_map.json \
             generation_config.json; do
        cp "$WORK/out/$f" "$REPO/fastlm/default_model/$f"
    done
fi
