#!/usr/bin/env bash
# Prepares libtorch 2.13.0 (the version tch 0.26 binds) from PyPI, idempotently.
#
#   scripts/setup-libtorch.sh          lean CPU folder (default; ~0.5 GB on disk)
#   scripts/setup-libtorch.sh --gpu    full CUDA build in a venv (~4.6 GB)
#   scripts/setup-libtorch.sh --print  print the folder that LIBTORCH should name
#
# The result is reached through the symlink `.libtorch` in the repository root,
# which `.cargo/config.toml` passes to torch-sys as LIBTORCH. --gpu is implied
# when `nvidia-smi` sees a GPU. Downloads are cached in $CPS3D_CACHE
# (default ~/.cache/cps3d), so a fresh clone on the same machine sets up in seconds.
set -euo pipefail

TORCH_VERSION=2.13.0
CUDART_VERSION=13.0.96
CUPTI_VERSION=13.0.85
# The CUDA toolkit torch 2.13's wheel depends on (its METADATA: cuda-toolkit[...]==13.0.3).
CUDA_TOOLKIT_VERSION=13.0.3

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CPS3D_CACHE:-$HOME/.cache/cps3d}"
mode=cpu
print_only=0
for arg in "$@"; do
  case "$arg" in
    --gpu) mode=gpu ;;
    --cpu) mode=cpu_forced ;;
    --print) print_only=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup-libtorch: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
if [[ "$mode" == cpu ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  mode=gpu
fi
[[ "$mode" == cpu_forced ]] && mode=cpu

python="${PYTHON:-$(command -v python3 || command -v python)}"
log() { echo "setup-libtorch: $*" >&2; }

if [[ "$mode" == gpu ]]; then
  target="$cache/venv-torch-$TORCH_VERSION"
  libtorch_dir() { "$target/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))'; }
  if [[ ! -f "$target/.complete" ]]; then
    log "creating CUDA venv in $target (about 2.6 GB download)"
    rm -rf "$target"
    "$python" -m venv "$target"
    "$target/bin/pip" install -q "torch==$TORCH_VERSION"
    touch "$target/.complete"
  fi
  # The headers c10d's NCCL process group includes beyond torch's own (CUDA's compiler
  # host headers and CCCL; NCCL's and the math libraries' come with torch): without them
  # cps3d builds without NCCL and reduces CUDA gradients through host memory with Gloo.
  if [[ ! -f "$target/.nccl-headers" ]]; then
    log "adding the CUDA headers the NCCL process group needs (a few MB)"
    "$target/bin/pip" install -q "cuda-toolkit[crt,cccl]==$CUDA_TOOLKIT_VERSION"
    touch "$target/.nccl-headers"
  fi
  dir="$(libtorch_dir)"
else
  target="$cache/libtorch-$TORCH_VERSION-cpu"
  dir="$target"
  if [[ ! -f "$target/.complete" ]]; then
    wheels="$cache/wheels"
    mkdir -p "$wheels"
    log "downloading torch==$TORCH_VERSION and the two CUDA runtime wheels libtorch_cpu.so links against"
    "$python" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" \
      "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION"
    tmp="$target.tmp.$$"
    rm -rf "$tmp" && mkdir -p "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    log "extracting the lean CPU folder into $target"
    "$python" - "$wheels" "$tmp" "$TORCH_VERSION" <<'PY'
import glob, os, sys, zipfile
wheels, out, version = sys.argv[1:]
torch_whl = sorted(glob.glob(os.path.join(wheels, f"torch-{version}-*.whl")))[-1]
with zipfile.ZipFile(torch_whl) as z:
    for name in z.namelist():
        if not (name.startswith("torch/lib/") or name.startswith("torch/include/")):
            continue
        base = os.path.basename(name)
        # The CUDA kernels are ~90% of the wheel and useless without a GPU.
        if base.startswith("libtorch_cuda") or base.startswith("libc10_cuda"):
            continue
        dest = os.path.join(out, name[len("torch/"):])
        if name.endswith("/"):
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(name) as src, open(dest, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if base.endswith(".so") or ".so." in base:
            os.chmod(dest, 0o755)
# libtorch_cpu.so has NEEDED entries for the CUDA runtime and CUPTI even in CPU use.
for pattern in ("nvidia_cuda_runtime-*.whl", "nvidia_cuda_cupti-*.whl"):
    whl = sorted(glob.glob(os.path.join(wheels, pattern)))[-1]
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if base.startswith("libcudart.so") or base.startswith("libcupti.so"):
                dest = os.path.join(out, "lib", base)
                with z.open(name) as src, open(dest, "wb") as dst:
                    dst.write(src.read())
                os.chmod(dest, 0o755)
with open(os.path.join(out, "build-version"), "w") as f:
    f.write(version + "\n")
PY
    # libgomp comes with the wheel under a hashed name (torch.libs); keep the plain soname too.
    if ! ls "$tmp/lib"/libgomp* >/dev/null 2>&1; then
      gomp="$("$python" - "$wheels" "$TORCH_VERSION" <<'PY'
import glob, os, sys, zipfile
whl = sorted(glob.glob(os.path.join(sys.argv[1], f"torch-{sys.argv[2]}-*.whl")))[-1]
with zipfile.ZipFile(whl) as z:
    print("\n".join(n for n in z.namelist() if "libgomp" in n))
PY
)"
      if [[ -n "$gomp" ]]; then
        "$python" -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[3],'wb').write(z.read(sys.argv[2]))" \
          "$(ls "$wheels"/torch-"$TORCH_VERSION"-*.whl | tail -1)" "$(echo "$gomp" | head -1)" "$tmp/lib/$(basename "$(echo "$gomp" | head -1)")"
      fi
    fi
    for f in "$tmp"/lib/libgomp*; do
      [[ -e "$f" ]] && [[ ! -e "$tmp/lib/libgomp.so.1" ]] && cp "$f" "$tmp/lib/libgomp.so.1"
    done
    rm -rf "$target"
    mv "$tmp" "$target"
    trap - EXIT
    touch "$target/.complete"
  fi
fi

if [[ "$print_only" == 1 ]]; then
  echo "$dir"
  exit 0
fi
ln -sfn "$dir" "$repo/.libtorch"
log "libtorch $TORCH_VERSION ($mode) ready: .libtorch -> $dir"
