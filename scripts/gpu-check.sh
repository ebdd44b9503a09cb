#!/usr/bin/env bash
# GPU check for the CPS trainers: builds cps3d against the CUDA libtorch, makes a
# small synthetic dataset, plans the paper's 3D network (patch 112×160×128, 14
# classes, 30,795,654 parameters), and runs N CPS steps with both trainers on the
# GPU(s), printing step time, data-wait share and peak GPU memory.
#
#   scripts/gpu-check.sh [STEPS]        (default 20)
#
# Needs an NVIDIA GPU and nvidia-smi. Work files go to ${WORK:-/tmp/cps3d-gpu-check}.
set -euo pipefail
STEPS="${1:-20}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${WORK:-/tmp/cps3d-gpu-check}"
cd "$repo"
command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: no GPU here" >&2; exit 1; }
nvidia-smi -L
scripts/setup-libtorch.sh --gpu
cargo build --release
bin="$repo/target/release/cps3d"
"$bin" info
rm -rf "$work" && mkdir -p "$work" && cd "$work"
"$bin" synth raw --labeled 4 --unlabeled 4 --shape 128,192,160 --spacing-xy 1.0,1.0 --spacing-z 1.0,1.0 -j "$(nproc)" -q
"$bin" fingerprint raw -o fp.json -q >/dev/null
"$bin" plan fp.json -o plans.json --target-spacing 1,1,1 --patch-size 112,160,128 | grep -E "3d_fullres|parameters"
"$bin" preprocess raw -p plans.json -o shards -j "$(nproc)" -q
# Peak GPU memory, sampled every 100 ms while training runs.
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 100 > gpu-mem.csv &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
devices="cuda:0,cuda:0"
[[ "$(nvidia-smi -L | wc -l)" -ge 2 ]] && devices="cuda:0,cuda:1"
"$bin" train shards -o run --epochs 1 --iterations "$STEPS" --devices "$devices" --loaders 4 --augmenters 4 --fold all --val-iterations 5 --no-final-validation
kill $smi 2>/dev/null || true
python3 - <<'PY'
import json
log = [json.loads(l) for l in open("run/log.jsonl")]
e = log[-1]
print(f"CPS steps: {e['epoch'] + 1} epoch(s); step time {e['step_seconds']:.3f} s; data wait {100 * e['data_wait']:.1f}%; loss {e['loss']}")
peak = {}
for line in open("gpu-mem.csv"):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[1].isdigit():
        peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]))
print("peak GPU memory (MiB, nvidia-smi, whole device):", peak)
PY
