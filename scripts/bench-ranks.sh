#!/usr/bin/env bash
# Data-parallel training on this machine: steps/s and data wait of one process and of
# `train --nproc-per-node 2`, one libtorch thread per rank (one process with 1 and with 2
# threads as baselines), the same keyed global batch of 2 + 2 (the ranks 1 + 1 each).
# Prints a markdown table from each run's log.jsonl (the epochs after the first).
#
#   scripts/bench-ranks.sh [WORK_DIR]      (default /tmp/cps3d-bench-ranks)
#
# Dataset: 8 + 8 phantoms 48×96×96, patch 32×64×64, features 16..128 (a step of a
# fraction of a second here: what the ranks' all-reduces cost shows).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/cps3d-bench-ranks}"
mkdir -p "$work"
(cd "$repo" && cargo build --release --quiet)
bin="$repo/target/release/cps3d"
if [[ ! -f "$work/shards/manifest.json" ]]; then
  "$bin" synth -q "$work/raw" --labeled 8 --unlabeled 8 --shape 48,96,96 --seed 1
  "$bin" fingerprint -q "$work/raw" -o "$work/fingerprint.json"
  "$bin" plan -q "$work/fingerprint.json" -o "$work/plans.json" --patch-size 32,64,64 \
    --base-features 16 --max-features 128 --batch-size 2 --unlabeled-batch 2
  "$bin" preprocess -q "$work/raw" -p "$work/plans.json" -o "$work/shards"
fi
common=(--epochs 4 --iterations 10 --devices cpu,cpu --fold all --val-iterations 1 --no-final-validation)

echo "| run | ranks × threads | s/step | steps/s | data wait |"
echo "|---|---|---|---|---|"
for run in one-1t one-2t two-ranks; do
  out="$work/$run"
  rm -rf "$out"
  case "$run" in
    one-1t) extra=(--threads 1); shape="1 × 1" ;;
    one-2t) extra=(--threads 2); shape="1 × 2" ;;
    two-ranks) extra=(--nproc-per-node 2); shape="2 × 1" ;;
  esac
  "$bin" train -q "$work/shards" -o "$out" "${common[@]}" "${extra[@]}" >"$work/$run.log" 2>&1
  python3 - "$out/log.jsonl" "$run" "$shape" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
step = sum(r["step_seconds"] for r in rows) / len(rows)
wait = sum(r["data_wait"] for r in rows) / len(rows)
print(f"| {sys.argv[2]} | {sys.argv[3]} | {step:.3f} | {1 / step:.2f} | {100 * wait:.1f}% |")
PY
done
