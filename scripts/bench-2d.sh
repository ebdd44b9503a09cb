#!/bin/bash
# The 2D data path against the 3D one, in one run on the same phantoms (README "Measured"):
# six 150×512×512 phantoms at 2.5×0.8×0.8 mm, the paper's patches (3D 112×160×128, 2D
# 512×512 with batch 12+12), 2D shards with single-slice bricks (the default) and with 32³
# bricks, each benched with and without augmentation, then `tune --cores 2` on both 2D sets.
# Usage: scripts/bench-2d.sh [WORK_DIR]   (needs a release build: cargo build --release)
set -euo pipefail
B=${CPS3D:-$(pwd)/target/release/cps3d}
W=${1:-runs/bench-2d}
mkdir -p "$W" && cd "$W"
[ -d data ] || "$B" synth data --labeled 3 --unlabeled 3 --shape 150,512,512 --spacing-xy 0.8,0.8 --spacing-z 2.5,2.5 -j 2 -q
[ -f fp.json ] || "$B" fingerprint data -o fp.json -j 2 -q
"$B" plan fp.json -o plans.json --target-spacing 2.5,0.8,0.8 --patch-size 112,160,128 --patch-size-2d 512,512 --max-features-2d 480 -q
[ -d s3d ] || "$B" preprocess data -p plans.json -o s3d -j 2 -q
[ -d s2d_bricks ] || "$B" preprocess data -p plans.json -o s2d_bricks -c 2d --brick 32,32,32 -j 2 -q
[ -d s2d_slices ] || "$B" preprocess data -p plans.json -o s2d_slices -c 2d -j 2 -q
du -sh s3d s2d_bricks s2d_slices
for s in s3d s2d_slices s2d_bricks; do
  for aug in "" "--no-augment"; do
    echo "=== $s $aug"
    "$B" bench "$s" --batches 30 $aug
  done
done
for s in s2d_slices s2d_bricks; do
  echo "=== tune $s"
  "$B" tune "$s" --cores 2 --batches 10
done
