#!/usr/bin/env bash
# Starts the example gateway (examples/gateway.conf) in front of the mock
# LLM (t/mock/mock_llm.py), both in the foreground of this script, and
# stops both on Ctrl-C.  ./build.sh run builds the module, then runs this.
#
# Environment:
#   PORT=8080         the gateway's port on 127.0.0.1
#   NGINX_BIN         default /usr/sbin/nginx (Debian's)
#   DSG_MODULE        default build/ngx_http_deepseek_guard_module.so
#   DSG_PYTHON        default /usr/bin/python3
#   DSG_KEEP=1        keep the temporary prefix (logs, cache) on exit
#   MOCK_ARGS         extra mock options, e.g. "--capacity 4"
#   DSG_NGINX_PRELOAD LD_PRELOAD of nginx only: the sanitizer runtimes of
#                     an ASan build of the module (./build.sh test-asan)

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PORT=${PORT:-8080}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
MODULE=${DSG_MODULE:-$REPO/build/ngx_http_deepseek_guard_module.so}
PYTHON=${DSG_PYTHON:-/usr/bin/python3}
CONF_IN="$HERE/gateway.conf"

if [ ! -f "$MODULE" ]; then
    echo "run.sh: $MODULE not found: run ./build.sh first" >&2
    exit 1
fi

PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/dsg-gateway-XXXXXX")
# the workers (user nobody when started as root) must reach the prefix
chmod 755 "$PREFIX"
mkdir -p "$PREFIX/logs"

MOCK_PID=
NGINX_PID=

# shellcheck disable=SC2317  # called from the traps
stop() {
    trap - INT TERM EXIT
    if [ -n "$NGINX_PID" ] && kill -0 "$NGINX_PID" 2>/dev/null; then
        # graceful: streams in progress finish, then the workers exit
        kill -QUIT "$NGINX_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$NGINX_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -TERM "$NGINX_PID" 2>/dev/null || true
        wait "$NGINX_PID" 2>/dev/null || true
    fi
    if [ -n "$MOCK_PID" ] && kill -0 "$MOCK_PID" 2>/dev/null; then
        kill -TERM "$MOCK_PID" 2>/dev/null || true
        wait "$MOCK_PID" 2>/dev/null || true
    fi
    if [ -n "${DSG_KEEP:-}" ]; then
        echo "run.sh: kept $PREFIX"
    else
        rm -rf "$PREFIX"
    fi
    echo "run.sh: stopped"
}

trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop' EXIT

# the mock LLM on a free port
# shellcheck disable=SC2086
"$PYTHON" "$REPO/t/mock/mock_llm.py" --listen 127.0.0.1:0 \
    --portfile "$PREFIX/mock.port" --quiet ${MOCK_ARGS:-} \
    >>"$PREFIX/logs/mock.log" 2>&1 &
MOCK_PID=$!

MOCK_PORT=
for _ in $(seq 100); do
    MOCK_PORT=$(cat "$PREFIX/mock.port" 2>/dev/null || true)
    [ -n "$MOCK_PORT" ] && break
    if ! kill -0 "$MOCK_PID" 2>/dev/null; then
        cat "$PREFIX/logs/mock.log" >&2
        echo "run.sh: the mock LLM did not start" >&2
        exit 1
    fi
    sleep 0.1
done

if [ -z "$MOCK_PORT" ]; then
    echo "run.sh: the mock LLM wrote no port" >&2
    exit 1
fi

sed -e "s|@MODULE@|$MODULE|g" \
    -e "s|@PREFIX@|$PREFIX|g" \
    -e "s|@UPSTREAM@|127.0.0.1:$MOCK_PORT|g" \
    -e "s|@PORT@|$PORT|g" \
    "$CONF_IN" >"$PREFIX/nginx.conf"

NGINX_PRELOAD=${DSG_NGINX_PRELOAD:-${LD_PRELOAD:-}}

LD_PRELOAD=$NGINX_PRELOAD \
"$NGINX_BIN" -p "$PREFIX/" -c "$PREFIX/nginx.conf" -t -q \
    -e "$PREFIX/logs/error.log" || {
    tail -5 "$PREFIX/logs/error.log" >&2 || true
    exit 1
}

# nginx in the foreground of this script: master and workers stay its
# children, Ctrl-C (or a TERM to this script) stops them
LD_PRELOAD=$NGINX_PRELOAD \
"$NGINX_BIN" -p "$PREFIX/" -c "$PREFIX/nginx.conf" -e "$PREFIX/logs/error.log" \
    -g 'daemon off;' &
NGINX_PID=$!

up=
for _ in $(seq 100); do
    if ! kill -0 "$NGINX_PID" 2>/dev/null; then
        tail -5 "$PREFIX/logs/error.log" >&2 || true
        echo "run.sh: nginx did not start" >&2
        exit 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        up=1
        break
    fi
    sleep 0.1
done

if [ -z "$up" ]; then
    echo "run.sh: nginx is not listening on 127.0.0.1:$PORT" >&2
    exit 1
fi

URL="http://127.0.0.1:$PORT"

cat <<EOF
run.sh: gateway on $URL (nginx pid $NGINX_PID), mock LLM on 127.0.0.1:$MOCK_PORT (pid $MOCK_PID)
run.sh: prefix $PREFIX (logs/access.log, logs/error.log, cache/)

A JSON chat (class "normal", cached: temperature 0 and X-Deterministic):

  curl -s $URL/v1/chat/completions \\
       -H 'Authorization: Bearer sk-normal-demo' \\
       -H 'Content-Type: application/json' -H 'X-Deterministic: 1' \\
       -d '{"model":"deepseek-chat","temperature":0,"messages":[{"role":"user","content":"Hello"}]}'

An SSE chat (class "critical"):

  curl -sN $URL/v1/chat/completions \\
       -H 'Authorization: Bearer sk-critical-demo' \\
       -H 'Content-Type: application/json' \\
       -d '{"model":"deepseek-chat","stream":true,"messages":[{"role":"user","content":"Hello"}]}'

Metrics:    curl -s $URL/metrics          (JSON: $URL/metrics?format=json)
Access log: tail -f $PREFIX/logs/access.log

Ctrl-C stops both.
EOF

# returns when either exits (or a signal arrives: the trap stops both)
set +e
wait -n "$NGINX_PID" "$MOCK_PID"
rc=$?
echo "run.sh: a process exited (status $rc)" >&2
exit "$rc"
