#!/usr/bin/env bash
# The benchmarks of ngx_deepseek_guard_module: ./build.sh bench [--quick] [scenario ...]
# (./build.sh builds the module and installs wrk first, then execs this).
# Scenarios: admit reject cache keys overload coalesce misses instructions
# (default: all),
# and queue, stall, fleet and tokens (only when named; each its own report).
# See bench/README.md.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH")
export NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
export DSG_MODULE=${DSG_MODULE:-$REPO/build/ngx_http_deepseek_guard_module.so}
PYTHON=${DSG_PYTHON:-/usr/bin/python3}
# hundreds of concurrent connections: raise the soft fd limit to the hard one
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# fleet (bench/fleet_scenario.py) and tokens (bench/tokens_scenario.py):
# only when named, each its own report (<date>-fleet.md, <date>-tokens.md),
# fleet first, then tokens; the other scenarios named with them run after
rest=() quick=() fleet= tokens=
for a in "$@"; do
    case "$a" in
        fleet) fleet=1 ;;
        tokens) tokens=1 ;;
        --quick) quick=(--quick); rest+=("$a") ;;
        *) rest+=("$a") ;;
    esac
done
if [ -n "$fleet" ]; then
    "$PYTHON" "$BENCH/fleet_scenario.py" "${quick[@]}"
fi
if [ -n "$tokens" ]; then
    "$PYTHON" "$BENCH/tokens_scenario.py" "${quick[@]}"
fi
if [ -n "$fleet$tokens" ]; then
    if [ ${#rest[@]} -eq ${#quick[@]} ]; then
        exit 0
    fi
    set -- "${rest[@]}"
fi
exec "$PYTHON" "$BENCH/bench.py" "$@"
