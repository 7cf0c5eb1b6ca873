#!/usr/bin/env bash
# A three-node fleet on one machine: a real redis-server on 127.0.0.1:6390,
# the mock LLM, and three nginx nodes from examples/fleet-node.conf on
# PORT, PORT+1 and PORT+2.  It sends one API key's requests round-robin
# over the three nodes for 20 seconds, one every 33 ms at most (this loop
# manages about 15 a second), more than the key's fleet-wide quota of 600
# a minute, and prints what each node admitted and what the fleet admitted
# in all: about 160 plus 80% of the burst of 20, not three times that (the
# key is of class normal, which may use 80% of the quota; 20% is the
# critical class's reserve).  Then it keeps the fleet running until Ctrl-C.
#
# Environment: PORT (8080), NGINX_BIN, DSG_MODULE, DSG_PYTHON, DSG_KEEP=1
# (keep the temporary prefix), NO_WAIT=1 (stop after the demonstration).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PORT=${PORT:-8080}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
MODULE=${DSG_MODULE:-$REPO/build/ngx_http_deepseek_guard_module.so}
PYTHON=${DSG_PYTHON:-/usr/bin/python3}
REDIS_PORT=6390

[ -f "$MODULE" ] || { echo "fleet-run.sh: run ./build.sh first" >&2; exit 1; }
command -v redis-server >/dev/null || {
    echo "fleet-run.sh: redis-server is needed (apt-get install redis-server)" >&2
    exit 1
}

PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/dsg-fleet-XXXXXX")
chmod 755 "$PREFIX"
mkdir -p "$PREFIX/logs"
PIDS=()

# shellcheck disable=SC2317  # called from the traps
stop() {
    trap - INT TERM EXIT
    for n in 1 2 3; do
        [ -f "$PREFIX/node$n/nginx.pid" ] \
            && kill -QUIT "$(cat "$PREFIX/node$n/nginx.pid")" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    sleep 1
    if [ -n "${DSG_KEEP:-}" ]; then
        echo "fleet-run.sh: kept $PREFIX"
    else
        rm -rf "$PREFIX"
    fi
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop' EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$PREFIX" >"$PREFIX/logs/redis.log" 2>&1 &
PIDS+=($!)

"$PYTHON" "$REPO/t/mock/mock_llm.py" --listen 127.0.0.1:0 --quiet \
    --first-token-ms 5 --portfile "$PREFIX/mock.port" \
    >>"$PREFIX/logs/mock.log" 2>&1 &
PIDS+=($!)

for _ in $(seq 100); do
    [ -s "$PREFIX/mock.port" ] && break
    sleep 0.1
done
MOCK_PORT=$(cat "$PREFIX/mock.port")

for n in 1 2 3; do
    d="$PREFIX/node$n"
    mkdir -p "$d/logs"
    chmod 755 "$d"
    sed -e "s|@MODULE@|$MODULE|g" -e "s|@PREFIX@|$d|g" \
        -e "s|@UPSTREAM@|127.0.0.1:$MOCK_PORT|g" \
        -e "s|@PORT@|$((PORT + n - 1))|g" \
        "$HERE/fleet-node.conf" >"$d/nginx.conf"
    "$NGINX_BIN" -p "$d/" -c "$d/nginx.conf" -e "$d/logs/error.log"
done

sleep 1

echo "fleet-run.sh: nodes on 127.0.0.1:$PORT..$((PORT + 2)), redis on" \
     "127.0.0.1:$REDIS_PORT, mock on 127.0.0.1:$MOCK_PORT, prefix $PREFIX"
echo "fleet-run.sh: one key, ~30 requests/s round-robin for 20 s" \
     "(its fleet-wide quota: 600r/m, burst 20)"

# each request in the background, one every 33 ms, its node and status
# into a file
end=$((SECONDS + 20))
i=0
while [ "$SECONDS" -lt "$end" ]; do
    n=$((i % 3))
    (code=$(curl -s -o /dev/null -w '%{http_code}' \
        "http://127.0.0.1:$((PORT + n))/v1/chat/completions" \
        -H 'Authorization: Bearer sk-normal-demo' \
        -H 'Content-Type: application/json' \
        -d '{"model":"deepseek-chat","messages":[{"role":"user","content":"hi"}]}')
     echo "$n $code" >>"$PREFIX/codes") &
    i=$((i + 1))
    sleep 0.033
done
wait_all=$((SECONDS + 10))
while [ "$(wc -l <"$PREFIX/codes")" -lt "$i" ] && [ "$SECONDS" -lt "$wait_all" ]
do
    sleep 0.2
done

total=0
for n in 0 1 2; do
    c=$(grep -c "^$n 200$" "$PREFIX/codes" || true)
    total=$((total + c))
    echo "  node $((n + 1)) (port $((PORT + n))): $c admitted"
done
echo "  the fleet: $total admitted of $i"
echo
curl -s "http://127.0.0.1:$PORT/metrics" | grep '^deepseek_guard_fleet_'

[ -n "${NO_WAIT:-}" ] && exit 0

echo
echo "fleet-run.sh: Ctrl-C stops the fleet"
wait
