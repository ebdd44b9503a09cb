#!/bin/bash
# A CPS training step's peak memory and time against the authors' step in PyTorch with
# nnU-Net's own network and loss (README "train", issue 17). CPU, float32, 2 threads.
# The plan: patch 48×96×96 at 2.5×0.8×0.8 mm on the 150×512×512 phantoms of
# scripts/bench-autotune.sh (5 stages, features 32–320, 16,470,904 parameters, 14
# classes), batch 2 + 2, no augmentation. Three rows, measured in the same run:
#   cps3d (default: first two encoder stages recomputed), cps3d --recompute-stages 0,
#   and scripts/reference/cps_step.py in PYTHON's environment (skipped when absent:
#   python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1).
# Peak memory is the process's maximum RSS (/usr/bin/time -v); ours includes the data
# path, the reference's random inputs need none.
# Usage: scripts/bench-cps-step.sh [WORK_DIR]   (needs a release build: cargo build --release)
set -euo pipefail
B=${CPS3D:-$(pwd)/target/release/cps3d}
REF=$(pwd)/scripts/reference/cps_step.py
PYTHON=${PYTHON:-/tmp/refvenv/bin/python}
W=${1:-runs/bench-autotune}
mkdir -p "$W" && cd "$W"
[ -d data ] || "$B" synth data --labeled 3 --unlabeled 3 --shape 150,512,512 --spacing-xy 0.8,0.8 --spacing-z 2.5,2.5 -j 2 -q
[ -f fp.json ] || "$B" fingerprint data -o fp.json -j 2 -q
if [ ! -f plans48.json ]; then
  "$B" plan fp.json -o plans48.json --target-spacing 2.5,0.8,0.8 --patch-size 48,96,96 -q
  # The paper's batch, 2 labeled + 2 unlabeled (the plan sizes 9 + 9 for this small patch).
  python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); p["cps"].update(labeled_batch=2, unlabeled_batch=2); json.dump(p, open(sys.argv[1], "w"), indent=2)' plans48.json
fi
[ -d s48 ] || "$B" preprocess data -p plans48.json -o s48 -j 2 -q

rss_gb() { awk '/Maximum resident set size/ {printf "%.2f", $6 / 1e6}' "$1"; }
step_s() { python3 -c 'import json,sys; print("%.1f" % [json.loads(l) for l in open(sys.argv[1])][-1]["step_seconds"])' "$1"; }

echo "| | peak RSS GB | s per step |"
echo "|---|---|---|"
for stages in 2 0; do
  /usr/bin/time -v "$B" train s48 -o "step-r$stages" --overwrite --fold all --no-augment --epochs 1 --iterations 3 \
    --val-iterations 1 --no-final-validation --threads 2 --recompute-stages "$stages" -q > /dev/null 2> "step-r$stages.time"
  echo "| cps3d --recompute-stages $stages | $(rss_gb "step-r$stages.time") | $(step_s "step-r$stages/log.jsonl") |"
done
if [ -x "$PYTHON" ] && "$PYTHON" -c 'import nnunetv2' 2> /dev/null; then
  "$PYTHON" "$REF" s48/plans.json --steps 2 --threads 2 > step-ref.json
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("| PyTorch %s + nnU-Net, the authors'"'"' step | %.2f | %.1f |" % (r["torch"], r["peak_rss_gb"], r["seconds_per_step"]))' step-ref.json
else
  echo "(reference skipped: no nnunetv2 in $PYTHON)"
fi
