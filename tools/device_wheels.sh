# Sourced by the scripts run on a lent GPU machine (bench/gpu_check.sh, tools/gpu_train.sh), which has
# torch but not all of dashcamd's other dependencies and no index to fetch them from: install the carried
# wheels into /tmp/site, only when an import fails, and put that folder on PYTHONPATH.
#
#   use_carried_wheels "import av, structlog" .whl

use_carried_wheels() {
    local imports=$1 wheel_dir=$2
    python3 -c "$imports" 2>/dev/null && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheel_dir"/*.whl || return 1
    export PYTHONPATH=/tmp/site
}
