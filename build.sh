#!/usr/bin/env bash
# The one entry point of ngx_deepseek_guard_module.
#
#   ./build.sh            install dependencies, build the dynamic module
#   ./build.sh test       build, run the Check unit tests and the prove suite
#   ./build.sh run        build, start the example gateway and the mock LLM
#   ./build.sh bench      build, run the benchmarks in bench/
#
# The module is left at build/ngx_http_deepseek_guard_module.so.
# NGINX_SRC=<dir> builds against another nginx source tree (it must be
# configured --with-compat for the module to load into that binary).

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD="$REPO/build"
SO="$BUILD/ngx_http_deepseek_guard_module.so"
NGINX_SRC=${NGINX_SRC:-/usr/share/nginx/src}
export NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
export DSG_MODULE="$SO"

DEPS="nginx nginx-dev liblmdb-dev lmdb-utils libssl-dev libjansson-dev
      libpcre2-dev zlib1g-dev check pkg-config gcc make perl python3
      curl prometheus"
BENCH_DEPS="wrk"

need() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null \
            | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "build.sh: installing ${missing[*]}"
    local sudo=
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # Debian starts nginx and prometheus on install: forbid it for the
    # install (policy-rc.d), tests run their own instances on free ports
    local policy=/usr/sbin/policy-rc.d ours=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        ours=1
    fi
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null || { [ -n "$ours" ] && $sudo rm -f "$policy"; exit 1; }
    [ -n "$ours" ] && $sudo rm -f "$policy"
    return 0
}

build() {
    # shellcheck disable=SC2086
    need $DEPS
    mkdir -p "$BUILD"
    local src="$BUILD/nginx"
    local stamp="$BUILD/configure.stamp"
    local want
    want=$(cat "$REPO/config" "$NGINX_SRC/conf_flags" 2>/dev/null \
           | md5sum | cut -d' ' -f1)-$NGINX_SRC

    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
       || [ ! -f "$src/objs/Makefile" ]
    then
        echo "build.sh: configuring nginx from $NGINX_SRC"
        rm -rf "$src"
        cp -r "$NGINX_SRC" "$src"
        local flags=()
        if [ -f "$src/conf_flags" ]; then
            # Debian's nginx-dev ships the distribution's configure flags
            # shellcheck disable=SC1091
            . "$src/conf_flags"
            flags=("${NGX_CONF_FLAGS[@]}")
        else
            flags=(--with-compat)
        fi
        local conf=./configure
        [ -x "$src/configure" ] || conf=./auto/configure
        (cd "$src" && $conf "${flags[@]}" \
            --add-dynamic-module="$REPO" >"$BUILD/configure.log" 2>&1) || {
            tail -30 "$BUILD/configure.log"; exit 1; }
        echo "$want" >"$stamp"
    fi

    make -s -C "$src" -f objs/Makefile modules >"$BUILD/make.log" 2>&1 || {
        cat "$BUILD/make.log"; exit 1; }
    grep -E 'warning|error' "$BUILD/make.log" || true
    # a new inode, never an overwrite: a running nginx has the old file
    # mapped, and rewriting it in place crashes that nginx
    if ! cmp -s "$src/objs/ngx_http_deepseek_guard_module.so" "$SO"; then
        cp "$src/objs/ngx_http_deepseek_guard_module.so" "$SO.tmp"
        mv -f "$SO.tmp" "$SO"
    fi

    smoke
    echo "build.sh: module at ${SO#"$REPO"/}"
}

# nginx -t of a minimal configuration that loads the module
smoke() {
    local d
    d=$(mktemp -d)
    mkdir -p "$d/logs"
    cat >"$d/nginx.conf" <<EOF
load_module $SO;
error_log $d/logs/error.log;
pid $d/nginx.pid;
events { }
http {
    access_log off;
    server { listen 127.0.0.1:1; }
}
EOF
    "$NGINX_BIN" -p "$d" -c "$d/nginx.conf" -t -q -e "$d/logs/error.log" || {
        cat "$d/logs/error.log"; rm -rf "$d"; exit 1; }
    rm -rf "$d"
}

unit() {
    local out="$BUILD/unit"
    mkdir -p "$out"
    # The core is compiled without any nginx include path: a stray nginx
    # include in a dsg_* file breaks this build at once.
    # shellcheck disable=SC2046
    gcc -std=gnu11 -g -O1 -Wall -Wextra -Werror -Wno-unused-parameter \
        -fsanitize=address,undefined -fno-omit-frame-pointer \
        -I "$REPO/ngx_deepseek_guard_module" \
        "$REPO"/t/unit/*.c "$REPO"/ngx_deepseek_guard_module/dsg_*.c \
        $(pkg-config --cflags --libs check) -llmdb -ljansson -lcrypto \
        -o "$out/check_dsg"
    (cd "$out" && CK_DEFAULT_TIMEOUT=60 ./check_dsg)
}

integration() {
    cd "$REPO"
    prove ${PROVE_ARGS:-} t/*.t
}

case "${1:-build}" in
    build)
        build
        ;;
    test)
        build
        unit
        if [ $# -gt 1 ]; then
            shift
            cd "$REPO" && prove -v "$@"
        else
            integration
        fi
        ;;
    unit)
        build
        unit
        ;;
    run)
        build
        exec "$REPO/examples/run.sh"
        ;;
    bench)
        build
        # shellcheck disable=SC2086
        need $BENCH_DEPS
        exec "$REPO/bench/run.sh" "${@:2}"
        ;;
    *)
        echo "usage: $0 [build|test [t/file.t ...]|unit|run|bench]" >&2
        exit 2
        ;;
esac
