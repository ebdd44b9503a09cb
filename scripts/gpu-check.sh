#!/usr/bin/env bash
# GPU check for the CPS trainers and inference: builds cps3d against the CUDA libtorch,
# makes a small synthetic dataset, plans the paper's 3D network (patch 112×160×128, 14
# classes, 30,795,654 parameters), runs STEPS CPS steps (5 epochs) with both siblings on the
# GPU(s) under fp16 autocast, printing step time, data-wait share, the loss per epoch and
# peak GPU memory; then 10 steps on 2 ranks (train --nproc-per-node 2: NCCL when the GPUs
# go round, Gloo when the ranks share one); then predicts one 512×512×100 scan with forced spacing
# (FLARE22 ranks time and GPU memory), printing seconds and peak GPU memory. Fits in ~9 minutes.
#
#   scripts/gpu-check.sh [STEPS]        (default 50)
#
# Needs an NVIDIA GPU and nvidia-smi. Work files go to ${WORK:-/tmp/cps3d-gpu-check}.
set -euo pipefail
STEPS="${1:-50}"
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
"$bin" train shards -o run --epochs 5 --iterations "$(( (STEPS + 4) / 5 ))" --devices "$devices" --loaders 4 --augmenters 4 --fold all --val-iterations 5 --no-final-validation
kill $smi 2>/dev/null || true
peak_mib() {
python3 - "$1" <<'PY'
import sys
peak = {}
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[1].isdigit():
        peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]))
print(peak)
PY
}
python3 - <<'PY'
import json
log = [json.loads(l) for l in open("run/log.jsonl")]
for e in log:
    print(f"epoch {e['epoch']}: step {e['step_seconds']:.3f} s, data wait {100 * e['data_wait']:.1f}%, loss {[round(v, 3) for v in e['loss']]}, phases {e.get('phases')}")
PY
echo "training: peak GPU memory (MiB, nvidia-smi, whole device; both siblings share cuda:0 on one GPU): $(peak_mib gpu-mem.csv)"
# Data-parallel: 2 ranks, each with half of the batch. NCCL needs a GPU of its own per
# rank and per sibling (two NCCL groups on one GPU can deadlock, so siblings sharing one
# reduce through Gloo); with fewer GPUs the ranks share them through Gloo.
ngpu="$(nvidia-smi -L | wc -l)"
if (( ngpu >= 4 )); then
  rank_env=(env); rank_args=(--devices cuda:0,cuda:1)
  echo "2 ranks: NCCL, rank r's siblings on cuda:2r and cuda:2r+1"
elif (( ngpu >= 2 )); then
  rank_env=(env); rank_args=(--devices cuda:0 --supervised-only)
  echo "2 ranks: NCCL, one supervised network per rank, rank r on cuda:r"
else
  rank_env=(env CUDA_VISIBLE_DEVICES=0 CPS3D_DIST_BACKEND=gloo); rank_args=(--devices cuda:0)
  echo "2 ranks: one GPU here, both ranks and siblings on cuda:0, Gloo through host memory"
fi
"${rank_env[@]}" "$bin" train shards -o run-ranks --epochs 2 --iterations 5 "${rank_args[@]}" --nproc-per-node 2 --loaders 2 --augmenters 2 --fold all --val-iterations 2 --no-final-validation
python3 - <<'PY'
import json
for l in open("run-ranks/log.jsonl"):
    e = json.loads(l)
    print(f"2 ranks, epoch {e['epoch']}: step {e['step_seconds']:.3f} s, data wait {100 * e['data_wait']:.1f}%, loss {[round(v, 3) for v in e['loss']]}")
PY
# One 512×512×100 CT-like scan at 0.8×0.8×2.5 mm, predicted with the paper's forced spacing.
"$bin" synth scan --labeled 1 --unlabeled 0 --shape 100,512,512 --spacing-xy 0.8,0.8 --spacing-z 2.5,2.5 -q
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 100 > gpu-mem-predict.csv &
smi=$!
start=$(date +%s.%N)
"$bin" predict -i scan/imagesTr -o pred -m run --checkpoint final --forced-spacing paper --device cuda:0 -q
end=$(date +%s.%N)
kill $smi 2>/dev/null || true
echo "predict 512×512×100, forced spacing paper: $(python3 -c "print(round($end - $start, 1))") s (process wall time), peak GPU memory (MiB): $(peak_mib gpu-mem-predict.csv)"
