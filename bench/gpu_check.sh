#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): the speed benchmark, then the tests that touch CUDA.
#
#   device run, carry [.whl, var/bench/speed_clip.mp4]:  bash bench/gpu_check.sh var/bench/speed_clip.mp4
#
# .whl holds Python 3.12 wheels of what that machine lacks (PyAV, pydantic(-settings, -core), structlog,
# watchdog, sdnotify and their small needs; see bench/README.md), and py-spy for bench/gil.py. Results go to
# $OUT (here: var/gpu-out). Environment: REPEATS (3), VARIANTS (see below), BENCH_TIMEOUT / TEST_TIMEOUT /
# GIL_TIMEOUT (s), DEVICE (auto), GIL_MODES ("full replay"; "" skips the interpreter-lock runs).
set -u
out=${OUT:-var/gpu-out}
mkdir -p "$out"
clip=${1:?usage: bench/gpu_check.sh CLIP}
export PYTHONUNBUFFERED=1
# shellcheck source=tools/device_wheels.sh
. tools/device_wheels.sh
use_carried_wheels "import av, pydantic_settings, structlog, watchdog, sdnotify" .whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import os, torch, av; print('cores', os.cpu_count(), 'torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'av', av.__version__)" 2>&1 | tee -a "$out/gpu.txt"

variants=${VARIANTS:-copy full replay processes=0 preset=superfast copy:preset=superfast}
# shellcheck disable=SC2086  # the variant list is meant to split
timeout "${BENCH_TIMEOUT:-240}" python3 bench/pipeline.py --clip "$clip" --repeats "${REPEATS:-3}" \
    --device "${DEVICE:-auto}" --timeout-s 60 --json "$out/speed.json" --variants $variants 2>&1 | tee "$out/speed.log"

# Where the pipeline's threads hold the interpreter lock, with CUDA inference (full) and without (replay).
if ls .whl/py_spy-*.whl > /dev/null 2>&1 && [ -n "${GIL_MODES-full replay}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/spy .whl/py_spy-*.whl
    for mode in ${GIL_MODES-full replay}; do
        PATH=/tmp/spy/bin:$PATH timeout "${GIL_TIMEOUT:-60}" python3 bench/gil.py --mode "$mode" --clip "$clip" \
            --json "$out/gil-$mode.json" 2>&1 | grep -v '^py-spy>' | tee "$out/gil-$mode.log"
    done
fi

# The tests where the detector may run on CUDA ("auto" device). The daemon tests pin the CPU: not here.
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -rfE -p no:cacheprovider tests/test_detect_infer.py \
    tests/test_pipeline.py > "$out/tests.log" 2>&1
echo "tests exit $?"
tail -15 "$out/tests.log"
