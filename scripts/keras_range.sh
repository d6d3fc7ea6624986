#!/usr/bin/env bash
# The callbacks at the oldest Keras of the [keras] extra's range (the newest end is .venv,
# pinned by constraints.txt, where scripts/test.sh runs every test): their tests that touch
# Keras internals (streamavg/callbacks/_keras_compat.py) again in .venv-keras-oldest, which
# holds exactly that Keras release and takes every other package from .venv, on each
# backend installed, in a pytest of its own with two devices as tests/test_backends.py runs
# them. Arguments replace the selection of tests (say, every callback test module).
# Run by scripts/test.sh after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-keras-oldest
[ -x $venv/bin/python ] || .venv/bin/python -m venv $venv  # the same Python as .venv
floor=$(.venv/bin/python -c '
import re, tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["keras"]
print(*[re.fullmatch(r"keras>=([\d.]+),<[\d.]+", spec)[1] for spec in extra])')
site=$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$main')" > "$site/zz-streamavg-main-venv.pth"
installed() { $venv/bin/python -c 'import importlib.metadata as m; print(m.version("keras"))'; }
# Keras alone: its dependencies are .venv's (those of the newest Keras, a superset so far).
[ "$(installed)" = "$floor" ] || [ "$(installed)" = "$floor.0" ] ||
    $venv/bin/python -m pip install -q --no-deps "keras==$floor"
echo "Keras $(installed) (the [keras] extra's floor), over $main"

if [ $# -eq 0 ]; then
    set -- tests/test_keras_compat.py tests/test_batchnorm.py tests/test_distributed.py \
        tests/test_ema.py::test_matches_the_numpy_reference \
        tests/test_ema.py::test_validation_sees_the_average_and_training_goes_on_from_bit_exact_raw_weights \
        tests/test_ema.py::test_other_evaluate_calls_during_fit_are_left_alone \
        "tests/test_ema.py::test_gradient_accumulation_folds_after_each_real_update[3]" \
        tests/test_ema.py::test_steps_a_loss_scale_optimizer_skips_are_left_out \
        "tests/test_ema.py::test_an_interrupted_fit_leaves_nothing_in_the_way[True]" \
        tests/test_ema.py::test_later_fits_reuse_the_traced_train_step_and_average_across_fits \
        tests/test_phema.py::test_snapshots_come_every_n_real_steps_and_record_their_exact_step \
        tests/test_sweeps.py::test_directions_are_the_ones_keras_callbacks_take
fi
export TF_CPP_MIN_LOG_LEVEL=3 STREAMAVG_TEST_DEVICES=2
failed=()
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for backend in tensorflow jax torch; do  # at once: each is mostly one core's work
    if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not u.find_spec('$backend'))"; then
        echo "$backend: not installed, skipped" > "$logs/$backend"
        continue
    fi
    env=(KERAS_BACKEND=$backend)
    [ $backend = jax ] && env+=(JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2)
    (env "${env[@]}" $venv/bin/python -m pytest -q -p no:cacheprovider "$@" > "$logs/$backend" 2>&1 ||
        touch "$logs/$backend.failed") &
done
wait
for backend in tensorflow jax torch; do
    echo "$backend:"
    cat "$logs/$backend"
    [ -e "$logs/$backend.failed" ] && failed+=($backend)
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "keras_range.sh: the callbacks' tests failed at Keras $floor on: ${failed[*]}" >&2
    exit 1
fi
