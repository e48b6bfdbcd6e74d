#!/usr/bin/env bash
# The load benchmarks (bench/load.py queries and bulk) with one worker on a CUDA device, on a large replica.
#
#   bash bench/gpu_load.sh            # from the repository root, on a CUDA box; OUT=DIR keeps the log there
#
# Needs a Redis on 127.0.0.1:6379; if none answers, it starts redis-server from PATH, or from Debian
# packages in .whl/redis/*.deb (a box without network). Missing Python packages come from .whl/site/*.whl,
# as in bench/gpu_check.sh. Knobs: GPU_LOAD_DEVICE (cuda), GPU_LOAD_SIZE (large), GPU_LOAD_SECONDS (20),
# GPU_LOAD_SCENARIOS ("queries bulk").
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${TMPDIR:-/tmp}/m3q-gpu-load}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEV=${GPU_LOAD_DEVICE:-cuda}
SIZE=${GPU_LOAD_SIZE:-large}
SECONDS_EACH=${GPU_LOAD_SECONDS:-20}
MODEL=/tmp/m3q-replica-$SIZE
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

redis_up() { "$PY" -c "import redis; redis.Redis(socket_timeout=2).ping()" 2>/dev/null; }

main() {
    echo "== $(date +%T) packages"
    if ! "$PY" -c "import celery, kombu, redis" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/site/*.whl || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    echo "== $(date +%T) redis"
    if ! redis_up; then
        local server=redis-server libs=""
        if ! command -v redis-server >/dev/null; then
            for f in .whl/redis/*.deb; do dpkg -x "$f" /tmp/redis-root; done
            server=/tmp/redis-root/usr/bin/redis-server libs=/tmp/redis-root/usr/lib/x86_64-linux-gnu
        fi
        LD_LIBRARY_PATH=$libs "$server" --port 6379 --bind 127.0.0.1 --daemonize yes --save "" --appendonly no || return 1
        sleep 1
    fi
    redis_up && echo "redis answers" || return 1
    echo "== $(date +%T) replica ($SIZE)"
    [ -f "$MODEL/m3q_replica.json" ] || "$PY" -m worker.replica "$MODEL" --size "$SIZE" || return 1
    nvidia-smi -L 2>/dev/null
    for scenario in ${GPU_LOAD_SCENARIOS:-queries bulk}; do
        echo "== $(date +%T) bench/load.py $scenario"
        timeout 240 "$PY" -W ignore bench/load.py "$scenario" --model "$MODEL" --device "$DEV" --seconds "$SECONDS_EACH"
    done
    echo "== $(date +%T) done"
}

main 2>&1 | grep --line-buffered -v "REPLICA with random weights" | tee "$OUT/gpu_load.log"
