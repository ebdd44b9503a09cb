#!/usr/bin/env bash
# The demo's promise, measured: `cps3d demo` over seeds 0, 1, 2 on this CPU's own kernels
# and as on a CPU without AVX-512 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2:
# libtorch's AVX2 kernels, oneDNN capped at AVX2, so float32 convolutions), one run at a
# time. Prints a markdown table: wall time, training time, s/step, the estimate, the
# held-out mean DSC and the organs above 0.5.
#
#   scripts/bench-demo.sh [WORK_DIR] [SEEDS...]     (default /tmp/cps3d-bench-demo, seeds 0 1 2)
#
# Extra demo options go in $DEMO_ARGS; $MODES picks and orders the kinds (default "native avx2"). Each run's transcript is kept in WORK_DIR/MODE-sSEED.log.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/cps3d-bench-demo}"
shift || true
if [[ $# -gt 0 ]]; then seeds=("$@"); else seeds=(0 1 2); fi
mkdir -p "$work"
(cd "$repo" && cargo build --release --quiet)
bin="$repo/target/release/cps3d"

echo "| CPU kernels | seed | demo wall s | training s | s/step | estimate s | mean DSC | organs > 0.5 |"
echo "|---|---|---|---|---|---|---|---|"
for mode in ${MODES:-native avx2}; do
  for seed in "${seeds[@]}"; do
    out="$work/$mode-s$seed"
    log="$work/$mode-s$seed.log"
    rm -rf "$out"
    envs=()
    [[ "$mode" == avx2 ]] && envs=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
    start=$(date +%s)
    # shellcheck disable=SC2086
    env "${envs[@]}" "$bin" demo --out "$out" --seed "$seed" ${DEMO_ARGS:-} >"$log" 2>&1
    wall=$(($(date +%s) - start))
    train=$(sed -n 's/.*\[      train\] done in \([0-9.]*\) s/\1/p' "$log")
    step=$(sed -n "s/.*a step's time (\([0-9.]*\) s.*/\1/p" "$log")
    estimate=$(sed -n 's/.*expected training time on this machine: \([0-9.]*\) s.*/\1/p' "$log")
    mean=$(awk '$1 == "mean" {print $2}' "$log")
    organs=$(awk 'f && $1 != "mean" && $2 > 0.5 {n++} /^organ/ {f=1} $1 == "mean" {f=0} END {print n+0}' "$log")
    printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n" "$mode" "$seed" "$wall" "$train" "$step" "$estimate" "$mean" "$organs"
  done
done
