#!/usr/bin/env bash
# Run the test suite with the servers it needs: the local Redis when it answers on 127.0.0.1:6379 (or
# DLSR_TEST_REDIS_URL), else a private redis-server on a free port for this run only. The Tansu broker is
# started by the test fixtures themselves. Usage: scripts/run_tests.sh PYTHON [pytest args...]
set -euo pipefail
PY="$1"; shift
cd "$(dirname "$0")/.."

started=""
cleanup() { if [ -n "$started" ]; then kill "$started" 2>/dev/null || true; fi; }
trap cleanup EXIT

url="${DLSR_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
if ! "$PY" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2).ping()" "$url" 2>/dev/null; then
  if command -v redis-server >/dev/null 2>&1; then
    port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
    started=$!
    export DLSR_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
    for _ in $(seq 50); do
      "$PY" -c "import redis,sys; redis.Redis.from_url(sys.argv[1]).ping()" "$DLSR_TEST_REDIS_URL" 2>/dev/null && break
      sleep 0.1
    done
    echo "started a private redis-server for this run at $DLSR_TEST_REDIS_URL"
  else
    echo "no Redis at $url and no redis-server to start: install Redis or set DLSR_TEST_REDIS_URL" >&2
    exit 1
  fi
fi

# Shared data: ../shared/data next to the repository (CI), else DLSR_TEST_DATA.
"$PY" -m pytest -q "$@"

# The same state on Redis Cluster: the stream, crash and replica tests (and the Redis unit tests) again, against
# three local masters the fixtures start (tests/redis_cluster.py). `make test` asks for it (CLUSTER_PASS=1).
if [ -n "${CLUSTER_PASS:-}" ]; then
  echo "--- the Redis Cluster pass ---"
  DLSR_TEST_REDIS_CLUSTER=1 "$PY" -m pytest -q -p no:cacheprovider \
    tests/common/test_keys.py tests/monitor/test_state.py tests/common/test_registry.py tests/common/test_hotswap.py \
    tests/common/test_baseline.py tests/console/test_views.py \
    tests/integration/test_monitor_stream.py tests/integration/test_monitor_crash.py \
    tests/integration/test_monitor_replicas.py
fi
