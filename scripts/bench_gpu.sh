#!/usr/bin/env bash
# The GPU checks behind the README's GPU table, for a machine with torch, JAX and Keras 3:
# the callback tests on torch and JAX, then bench_ema with 55 M parameters at batch 512
# (1,024 inputs, four hidden Dense layers of 4,096, AdamW), on torch and JAX.
# Usage: scripts/bench_gpu.sh [OUT_DIR]   (PYTHON picks the interpreter; default python3)
set -u
out=${1:-bench-out/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
tests=(tests/test_ema.py tests/test_window_average.py tests/test_batchnorm.py)
model=(--optimizer adamw --batch-size 512 --inputs 1024 --width 4096 --depth 4 --steps 200)
for backend in torch jax; do
    KERAS_BACKEND=$backend timeout "${TEST_LIMIT:-150}" "$py" -m pytest "${tests[@]}" -q \
        -p no:cacheprovider >"$out/tests-$backend.txt" 2>&1
    echo "tests on $backend (rc $?): $(tail -n 1 "$out/tests-$backend.txt")"
    timeout "${BENCH_LIMIT:-240}" "$py" scripts/bench_ema.py --backend "$backend" "${model[@]}" \
        --epochs 3 --repeats "${REPEATS:-3}" --out "$out/ema-$backend.json" 2>&1 |
        tee "$out/ema-$backend.txt"
done
