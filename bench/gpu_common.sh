# Shared by bench/gpu_check.sh and bench/gpu_load.sh (sourced, not run): paths, environment, packages
# from wheels on a box without network, and the random-weight replica they run on.
# The caller sets NAME (log folder) and DEV and SIZE before sourcing.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-${TMPDIR:-/tmp}/m3q-$NAME}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODEL=/tmp/m3q-replica-$SIZE
WHEELS=${GPU_WHEELS:-.whl}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1

install_wheels() {  # install_wheels DIR TARGET: the wheels in DIR into TARGET, no network, no dependencies
    ls "$1"/*.whl >/dev/null 2>&1 || { echo "no wheels in $1"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl
}

site_packages() {  # what the project imports beyond a GPU image: celery, kombu, redis-py
    if "$PY" -c "import celery, kombu, redis" 2>/dev/null; then echo "celery, kombu, redis: already importable"; return 0; fi
    install_wheels "$WHEELS/site" /tmp/site || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -c "import celery, kombu, redis; print('celery', celery.__version__, 'kombu', kombu.__version__, 'redis', redis.__version__, 'from', celery.__file__)"
}

replica() {  # the random-weight replica of size $SIZE at $MODEL, made once
    if [ -f "$MODEL/m3q_replica.json" ]; then echo "reusing $MODEL"; return 0; fi
    timeout 240 "$PY" -m worker.replica "$MODEL" --size "$SIZE" && du -sh "$MODEL"
}
