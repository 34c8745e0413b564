#!/usr/bin/env bash
# Rebuild fastlm's embedded default model (fastlm/default_model/) with `fastlm train` itself.
#
# Corpus: the Python standard library's own source (*.py under sysconfig's stdlib path, without test
# directories, site-packages, the generated codec tables in encodings/ and pydoc_data's help text), one
# file after another separated by <|endoftext|>, in sorted path order. Every 40th file is held out as
# the evaluation text. A byte-level BPE tokenizer is trained on the training text by `fastlm train`.
#
# Usage: scripts/train_default_model.sh [WORK_DIR]   (default /tmp/fastlm_default_model)
# Then copy WORK_DIR/out/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,
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
    --vocab-size 4096 --block-size 256 --batch-size 16 --steps 1500 --lr 3e-3 --warmup 100 --min-lr-ratio 0.1 \
    --weight-decay 0.1 --eval-every 250 --save-every 250 --seed 0 --out "$WORK/out" ${RESUME:+--resume}

if [ "${COPY:-0}" = 1 ]; then
    for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
        cp "$WORK/out/$f" "$REPO/fastlm/default_model/$f"
    done
fi
