#!/usr/bin/env bash
# The GPU measurements of the protection matrix, in one run: the core tests on CUDA, the full matrix
# (with the leak audit on the colour set's normalised cells) and the default `sdb wrap` of a resnet20
# on mnist-textures, each timed; everything lands in OUT (default ./gpu-out).
#     bash benchmarks/gpu_matrix.sh [OUT] [--quick]
# --quick runs the matrix's CPU subset and a cnn wrap on digits instead (to try the script without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee "$out/env.txt"
nvidia-smi -L >>"$out/env.txt" 2>&1 || true

if [ "${2:-}" = "--quick" ]; then
    matrix=(--quick --workers 2); wrap=(--arch cnn --data digits)
else
    matrix=(--audit --workers "${WORKERS:-12}"); wrap=(--arch resnet20 --data mnist-textures)
fi
start=$(date +%s)
"$py" -m pytest -q -x tests/core -p no:cacheprovider >"$out/tests_core.txt" 2>&1
echo "tests/core: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"

start=$(date +%s)
"$py" benchmarks/protection_matrix.py "${matrix[@]}" --json "$out/protection_matrix.json" >"$out/matrix.txt" 2>&1
echo "matrix: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"

tmp=$(mktemp -d)
start=$(date +%s)
"$py" -m sdb_cli wrap --train-teacher "${wrap[@]}" --out "$tmp/b.sdb" --data-dir "$tmp/data" >"$out/wrap.txt" 2>&1
echo "sdb wrap ${wrap[*]}: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"
tail -n 30 "$out/matrix.txt"
