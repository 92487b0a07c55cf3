#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): continue the shipped weights on the reduced copy of
# the training data, inside a time budget, and bring back the exported weights and the log.
#
#   python tools/shrink_train_data.py --out var/gpu_data          # here, once: fits the 64 MiB transfer
#   device run, carry [var/gpu_data, var/whl-train]:  FIT_MINUTES=4 bash tools/gpu_train.sh
#
# var/whl-train holds the structlog wheel (the detector package logs with it; the machine lacks it).
# The copy's photos are 640/960 of full size, so the scale jitter is multiplied by 1.5 (0.4-1.2 of the
# original photo, as on the CPU runs). Results go to $OUT (here: var/gpu-out).
set -u
out=${OUT:-var/gpu-out}
mkdir -p "$out"
data=${DATA:-var/gpu_data}
run=${RUN_DIR:-/tmp/dashcamd-gpu-run}
export PYTHONUNBUFFERED=1
# shellcheck source=tools/device_wheels.sh
. tools/device_wheels.sh
use_carried_wheels "import structlog" var/whl-train || exit 1
workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 0 ))
# shellcheck disable=SC2086  # EXTRA_ARGS is meant to split
python3 -m dashcamd.train fit --run-dir "$run" --init weights/dashcamd-n-v1.pt \
    --plates-dir "$data/plates_openimages" --faces-dir "$data/faces_unlabelled" --labels-dir "$data/labels" \
    --device auto --epochs 400 --fit-minutes "${FIT_MINUTES:-4}" --batch-size "${BATCH:-64}" --crop-px 384 \
    --lr 0.003 --warmup-epochs 3 --eval-every-epochs 10 --workers "$workers" --threads 2 --save-every-min 100 \
    --augment '{"scale_min": 0.6, "scale_max": 1.8}' ${EXTRA_ARGS:-} > "$out/train.log" 2>&1
echo "fit exit $?"
grep "epoch done" "$out/train.log" | tail -3
for which in best last; do
    [ -f "$run/$which.pt" ] && python3 -m dashcamd.train export "$run/$which.pt" "$out/dashcamd-n-gpu-$which.pt" \
        > "$out/export-$which.json" 2>&1
done
ls -la "$out"
