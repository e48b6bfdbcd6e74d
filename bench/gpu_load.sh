#!/usr/bin/env bash
# The load benchmarks (bench/load.py queries and bulk) with one worker on a CUDA device, on a large replica.
#
#   bash bench/gpu_load.sh            # from the repository root, on a CUDA box; OUT=DIR keeps the log there
#
# Needs a Redis on 127.0.0.1:6379; if none answers, it starts redis-server from PATH, or from Debian
# packages in .whl/redis/*.deb (a box without network). Missing Python packages come from .whl/site/*.whl,
# as in bench/gpu_check.sh. Knobs: GPU_LOAD_DEVICE (cuda), GPU_LOAD_SIZE (large), GPU_LOAD_SECONDS (20),
# GPU_LOAD_SCENARIOS ("queries queries:in-process bulk"; ":in-process" runs the device loop without the queue).
NAME=gpu-load DEV=${GPU_LOAD_DEVICE:-cuda} SIZE=${GPU_LOAD_SIZE:-large}
SECONDS_EACH=${GPU_LOAD_SECONDS:-20}
source "$(dirname "$0")/gpu_common.sh"

redis_up() { "$PY" -c "import redis; redis.Redis(socket_timeout=2).ping()" 2>/dev/null; }

main() {
    echo "== $(date +%T) packages"
    site_packages || return 1
    echo "== $(date +%T) redis"
    if ! redis_up; then
        local server=redis-server libs=""
        if ! command -v redis-server >/dev/null; then
            for f in "$WHEELS"/redis/*.deb; do dpkg -x "$f" /tmp/redis-root; done
            server=/tmp/redis-root/usr/bin/redis-server libs=/tmp/redis-root/usr/lib/x86_64-linux-gnu
        fi
        LD_LIBRARY_PATH=$libs "$server" --port 6379 --bind 127.0.0.1 --daemonize yes --save "" --appendonly no || return 1
        sleep 1
    fi
    redis_up && echo "redis answers" || return 1
    echo "== $(date +%T) replica ($SIZE)"
    replica || return 1
    nvidia-smi -L 2>/dev/null
    for scenario in ${GPU_LOAD_SCENARIOS:-queries queries:in-process bulk}; do
        local extra=""
        [[ $scenario == *:in-process ]] && extra=--in-process
        echo "== $(date +%T) bench/load.py ${scenario%%:*} $extra"
        timeout 240 "$PY" -W ignore bench/load.py "${scenario%%:*}" $extra --model "$MODEL" --device "$DEV" \
            --seconds "$SECONDS_EACH"
    done
    echo "== $(date +%T) done"
}

main 2>&1 | grep --line-buffered -v "REPLICA with random weights" | tee "$OUT/gpu_load.log"
