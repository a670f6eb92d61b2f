#!/usr/bin/env bash
# The GPU measurements of the protection matrix, in one run, shortest first so that a lent machine's time
# limit costs the least: the default `sdb wrap` of a resnet20 on mnist-textures (target < 2 min), the full
# matrix with the leak audit on the colour set's normalised cells (target < 10 min; stopped after
# MATRIX_TIMEOUT seconds, default 540, its finished units kept and summarised), then the core tests on CUDA
# (SKIP_TESTS=1 leaves them out). Everything lands in OUT (default ./gpu-out).
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

tmp=$(mktemp -d)
start=$(date +%s)
"$py" -m sdb_cli wrap --train-teacher "${wrap[@]}" --out "$tmp/b.sdb" --data-dir "$tmp/data" >"$out/wrap.txt" 2>&1
echo "sdb wrap ${wrap[*]}: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"

start=$(date +%s)
timeout -k 10 "${MATRIX_TIMEOUT:-540}" "$py" benchmarks/protection_matrix.py "${matrix[@]}" \
    --json "$out/protection_matrix.json" >"$out/matrix.txt" 2>&1
code=$?
echo "matrix: exit $code in $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"
if [ ! -s "$out/protection_matrix.json" ] && [ -s "$out/protection_matrix.json.units.jsonl" ]; then
    # stopped early: the matrix of the units that finished (the JSON lists them)
    "$py" benchmarks/protection_matrix.py --from-units "$out/protection_matrix.json.units.jsonl" \
        --json "$out/protection_matrix.json" >>"$out/matrix.txt" 2>&1
    echo "matrix: $(wc -l <"$out/protection_matrix.json.units.jsonl") unit(s) finished in time" | tee -a "$out/env.txt"
fi
tail -n 30 "$out/matrix.txt"

if [ "${SKIP_TESTS:-0}" != "1" ]; then
    start=$(date +%s)
    "$py" -m pytest -q -x tests/core -p no:cacheprovider >"$out/tests_core.txt" 2>&1
    echo "tests/core: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"
fi
