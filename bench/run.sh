#!/usr/bin/env bash
# The benchmarks of ngx_deepseek_guard_module: ./build.sh bench [--quick] [scenario ...]
# (./build.sh builds the module and installs wrk first, then execs this).
# Scenarios: admit reject cache keys overload coalesce misses (default: all),
# and queue (only when named; its own report).
# See bench/README.md.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH")
export NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
export DSG_MODULE=${DSG_MODULE:-$REPO/build/ngx_http_deepseek_guard_module.so}
PYTHON=${DSG_PYTHON:-/usr/bin/python3}
# hundreds of concurrent connections: raise the soft fd limit to the hard one
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec "$PYTHON" "$BENCH/bench.py" "$@"
