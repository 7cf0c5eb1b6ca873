#!/usr/bin/env bash
# The one entry point of ngx_deepseek_guard_module.
#
#   ./build.sh            install dependencies, build the dynamic module
#   ./build.sh test       build, run the Check unit tests (ASan/UBSan), replay
#                         the fuzz regressions, run the prove suite, a 5 s
#                         libFuzzer smoke of each target and the prove suite
#                         again against the ASan/UBSan build, and the
#                         valgrind subset (what CI runs);
#                         ./build.sh test t/file.t ... runs only those files
#   ./build.sh run        build, start the example gateway and the mock LLM
#   ./build.sh bench      build, run the benchmarks in bench/
#   ./build.sh test-asan  the prove suite against an ASan/UBSan build of the
#                         module (build/asan/) loaded into the stock nginx
#   ./build.sh test-valgrind  a subset (admission, cache, SSE) under valgrind
#   ./build.sh peer       nginx's own test suite (../shared/peer, or PEER_DIR)
#                         on stock nginx and with the module applied at http
#                         level (PEER_VARIANTS, default "guard cache
#                         cache_valid"); fails on any difference from stock
#                         that t/peer-expected.txt does not list
#   ./build.sh fuzz [s]   replay t/fuzz/regress and the seed corpora, then run
#                         each libFuzzer target s seconds (default 60; 0: only
#                         the replay)
#   ./build.sh deb        the Debian package (debian/) built from a copy of
#                         the tree in build/deb-src: build/libnginx-mod-http-
#                         deepseek-guard_<version>_<arch>.deb, then lintian
#                         (fails on any E:; accepted warnings in README.md)
#
# The module is left at build/ngx_http_deepseek_guard_module.so.
# NGINX_SRC=<dir> builds against another nginx source tree (it must be
# configured --with-compat for the module to load into that binary).

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD="$REPO/build"
SO="$BUILD/ngx_http_deepseek_guard_module.so"
ASAN_SO="$BUILD/asan/ngx_http_deepseek_guard_module.so"
NGINX_SRC=${NGINX_SRC:-/usr/share/nginx/src}
export NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
export DSG_MODULE="$SO"

DEPS="nginx nginx-dev liblmdb-dev lmdb-utils libssl-dev libjansson-dev
      libhiredis-dev libxxhash-dev redis-server libpcre2-dev zlib1g-dev check pkg-config gcc make perl python3
      curl prometheus"
BENCH_DEPS="wrk valgrind"
FUZZ_DEPS="clang libclang-rt-dev"
VALGRIND_DEPS="valgrind"
# what nginx's own tests need besides Perl (without them ~44 files skip)
PEER_DEPS="libio-socket-ssl-perl libnet-ssleay-perl libfcgi-perl
           libscgi-perl"
# t/81-status-page.t: Debian's chromium, driven by playwright-core (npm)
BROWSER_DEPS="chromium"
# dpkg-buildpackage of debian/ (nginx-dev provides dh-sequence-nginx)
DEB_DEPS="build-essential debhelper dpkg-dev nginx-dev liblmdb-dev
          libjansson-dev libhiredis-dev libssl-dev lintian"

# fuzz targets: t/fuzz/fuzz_<name>.c exercises ngx_deepseek_guard_module/dsg_<name>.c
FUZZ_TARGETS=${FUZZ_TARGETS:-"entry json bucket queue store fleet tokens"}
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer"

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

# The status page (deepseek_guard_status): uPlot and playwright-core from
# npm, pinned in status/package-lock.json, installed by `npm ci` into
# status/node_modules (not in git) when the lockfile changed, then
# status/page.html with uPlot inlined becomes the C header that `config`
# requires, build/status/ngx_http_deepseek_guard_status_page.h.  Debian's
# nodejs and npm only where no node and npm are installed.
status_page() {
    local dir="$REPO/status" sum
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        need nodejs npm
    fi
    sum=$(md5sum <"$dir/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$dir/node_modules/.dsg-lock" 2>/dev/null)" != "$sum" ]
    then
        echo "build.sh: npm ci in status/"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || {
            echo "build.sh: npm ci failed in status/" >&2; exit 1; }
        echo "$sum" >"$dir/node_modules/.dsg-lock"
    fi
    mkdir -p "$BUILD/status"
    perl "$dir/gen-page.pl" "$dir" \
        "$BUILD/status/ngx_http_deepseek_guard_status_page.h"
}

build() {
    # shellcheck disable=SC2086
    need $DEPS
    mkdir -p "$BUILD"
    status_page
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

# The module compiled with ASan and UBSan into build/asan/: a copy of the
# configured tree of build/nginx (same flags: the .so loads into Debian's
# nginx) where only the module's objects get the sanitizer flags.
asan_build() {
    local dir="$BUILD/asan"
    local src="$dir/nginx"
    if ! cmp -s "$BUILD/configure.stamp" "$dir/configure.stamp" \
       || [ ! -f "$src/objs/Makefile" ]
    then
        echo "build.sh: copying the configured nginx tree to ${dir#"$REPO"/}"
        rm -rf "$src"
        mkdir -p "$dir"
        cp -r "$BUILD/nginx" "$src"
        # objects of the plain build must not satisfy make here
        find "$src/objs" -name '*.o' -delete
        rm -f "$src"/objs/*.so
        cp "$BUILD/configure.stamp" "$dir/configure.stamp"
    fi
    local cflags
    cflags=$(sed -n 's/^CFLAGS =//p' "$src/objs/Makefile")
    make -s -C "$src" -f objs/Makefile modules \
        CFLAGS="$cflags $SAN_FLAGS" LINK="\$(CC) $SAN_FLAGS" \
        >"$dir/make.log" 2>&1 || { cat "$dir/make.log"; exit 1; }
    grep -E 'warning|error' "$dir/make.log" || true
    if ! cmp -s "$src/objs/ngx_http_deepseek_guard_module.so" "$ASAN_SO"; then
        cp "$src/objs/ngx_http_deepseek_guard_module.so" "$ASAN_SO.tmp"
        mv -f "$ASAN_SO.tmp" "$ASAN_SO"
    fi
}

# nginx -t of a configuration that loads the ASan module, runtime preloaded
asan_smoke() {
    local d
    d=$(mktemp -d)
    mkdir -p "$d/logs"
    cat >"$d/nginx.conf" <<EOF
load_module $ASAN_SO;
error_log $d/logs/error.log;
pid $d/nginx.pid;
events { }
http {
    access_log off;
    server { listen 127.0.0.1:1; }
}
EOF
    LD_PRELOAD="$DSG_NGINX_PRELOAD" "$NGINX_BIN" -p "$d" -c "$d/nginx.conf" \
        -t -q -e "$d/logs/error.log" || {
        cat "$d/logs/error.log"; rm -rf "$d"; exit 1; }
    rm -rf "$d"
}

# The sanitizer runtimes must be loaded before anything else in the stock
# (uninstrumented) nginx: LD_PRELOAD, for nginx only (DSG::Test applies
# DSG_NGINX_PRELOAD to the nginx it runs, never to perl or the mock).
# Workers are forks of the master: they inherit the runtime and the
# options it read at exec, whatever nginx does to their environment.
# Reports go to stderr, which nginx points at error.log: the harness fails
# a test on any "ERROR: AddressSanitizer" or "runtime error:" line there.
# Leak detection is valgrind's part (nginx never frees its last cycle).
# handle_sigbus=0: a SIGBUS is what LMDB's map gives on a data file cut
# or overwritten behind its back (t/73); the stock build dies of it and the
# master respawns the worker, and under ASan it must do the same, not turn
# into a report.  Any other SIGBUS still shows as "exited on signal 7".
test_asan() {
    build
    # shellcheck disable=SC2086
    need $BROWSER_DEPS
    asan_build
    local rt lib
    rt=
    for lib in libasan.so libubsan.so; do
        rt="$rt $(readlink -f "$(gcc -print-file-name=$lib)")"
    done
    export DSG_MODULE="$ASAN_SO"
    export DSG_NGINX_PRELOAD="${rt# }"
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:handle_sigbus=0:strip_path_prefix=$REPO/:${ASAN_OPTIONS:-}"
    export UBSAN_OPTIONS="print_stacktrace=1:strip_path_prefix=$REPO/:${UBSAN_OPTIONS:-}"
    asan_smoke
    echo "build.sh: ASan/UBSan module at ${ASAN_SO#"$REPO"/}"
    cd "$REPO"
    local start=$SECONDS rc=0
    if [ $# -gt 0 ]; then
        prove -v "$@" || rc=$?
    else
        prove ${PROVE_ARGS:-} t/*.t || rc=$?
    fi
    echo "build.sh: test-asan took $((SECONDS - start)) s"
    return $rc
}

test_valgrind() {
    build
    # shellcheck disable=SC2086
    need $VALGRIND_DEPS
    cd "$REPO"
    prove -v t/valgrind/*.t
}

# Each fuzz target built with gcc and t/fuzz/replay.c (no clang needed):
# replays the regression inputs and the seed corpora once.
fuzz_replay() {
    local out="$BUILD/fuzz" t
    mkdir -p "$out"
    for t in $FUZZ_TARGETS; do
        gcc -std=gnu11 -g -O1 -Wall -Wextra -Werror -Wno-unused-parameter \
            $SAN_FLAGS -fno-sanitize-recover=all \
            -I "$REPO/ngx_deepseek_guard_module" \
            "$REPO/t/fuzz/replay.c" "$REPO/t/fuzz/fuzz_$t.c" \
            "$REPO/ngx_deepseek_guard_module/dsg_$t.c" -ljansson -llmdb \
            -o "$out/replay_$t.tmp"
        mv -f "$out/replay_$t.tmp" "$out/replay_$t"
        "$out/replay_$t" "$REPO/t/fuzz/regress/$t" "$REPO/t/fuzz/corpus/$t"
    done
}

# libFuzzer runs of every target, $(nproc) at a time (FUZZ_JOBS), each
# $1 seconds; new inputs go to build/fuzz/corpus/<target> (the seeds in
# t/fuzz/corpus/ are only read), crashes to build/fuzz/artifacts/<target>/.
# FUZZ_TARGETS selects targets, FUZZ_ARGS adds libFuzzer flags.
fuzz() {
    local secs=${1:-60}
    case "$secs" in
        ''|*[!0-9]*) echo "build.sh: fuzz: seconds expected, got '$secs'" >&2
                     exit 2 ;;
    esac
    need gcc libjansson-dev
    fuzz_replay
    [ "$secs" -gt 0 ] || return 0
    # shellcheck disable=SC2086
    need $FUZZ_DEPS
    local out="$BUILD/fuzz" t jobs=${FUZZ_JOBS:-$(nproc)} failed=
    for t in $FUZZ_TARGETS; do
        clang -g -O1 $SAN_FLAGS -fsanitize=fuzzer -fno-sanitize-recover=all \
            -I "$REPO/ngx_deepseek_guard_module" \
            "$REPO/t/fuzz/fuzz_$t.c" \
            "$REPO/ngx_deepseek_guard_module/dsg_$t.c" -ljansson -llmdb \
            -o "$out/fuzz_$t.tmp"
        # a new inode: a fuzzer still running keeps its executable
        mv -f "$out/fuzz_$t.tmp" "$out/fuzz_$t"
    done
    for t in $FUZZ_TARGETS; do
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
            wait -n || true
        done
        mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
        local dict=()
        [ -f "$REPO/t/fuzz/$t.dict" ] && dict=(-dict="$REPO/t/fuzz/$t.dict")
        echo "build.sh: fuzzing $t for $secs s"
        # shellcheck disable=SC2086
        ( "$out/fuzz_$t" -max_total_time="$secs" -print_final_stats=1 \
              -artifact_prefix="$out/artifacts/$t/" "${dict[@]}" \
              ${FUZZ_ARGS:-} "$out/corpus/$t" "$REPO/t/fuzz/corpus/$t" \
              >"$out/$t.log" 2>&1
          echo $? >"$out/$t.rc" ) &
    done
    wait
    for t in $FUZZ_TARGETS; do
        local runs rate
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$t.log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out/$t.log")
        if [ "$(cat "$out/$t.rc")" = 0 ]; then
            echo "build.sh: fuzz $t: ok, ${runs:-?} runs, ${rate:-?} exec/s"
        else
            failed="$failed $t"
            echo "build.sh: fuzz $t: FAILED, log in ${out#"$REPO"/}/$t.log:"
            grep -E -A30 'ERROR|invariant failed|runtime error' "$out/$t.log" \
                | head -60
            ls "$out/artifacts/$t/"
            echo "build.sh: keep the input: cp it into t/fuzz/regress/$t/"
        fi
    done
    [ -z "$failed" ] || exit 1
}

integration() {
    cd "$REPO"
    prove ${PROVE_ARGS:-} t/*.t
}

# The Debian package: debian/ built by dpkg-buildpackage from a copy of the
# tree in build/deb-src (the checkout stays clean; build/, .git and
# node_modules are not copied), so the .deb, its -dbgsym package, .buildinfo
# and .changes land in build/.  The package build is offline, as Debian's
# are: what build() generates from npm (build/status/, the status page
# with uPlot inlined) is generated here first and copied in.  lintian's
# report on the .deb is printed in full; any error (E:) fails, the accepted
# warnings are listed in README.md.
deb() {
    build
    # shellcheck disable=SC2086
    need $DEB_DEPS
    local src="$BUILD/deb-src" name=libnginx-mod-http-deepseek-guard
    local version arch pkg rc=0
    version=$(dpkg-parsechangelog -l "$REPO/debian/changelog" -S Version)
    arch=$(dpkg-architecture -q DEB_HOST_ARCH)
    pkg="$BUILD/${name}_${version}_$arch.deb"
    mkdir -p "$BUILD"
    rm -rf "$src"
    rm -f "$BUILD/${name}_${version}_$arch".{deb,buildinfo,changes} \
          "$BUILD/${name}-dbgsym_${version}_$arch.deb"
    mkdir -p "$src"
    tar -C "$REPO" --exclude=./build --exclude=./.git --exclude=node_modules \
        --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
    if [ -d "$BUILD/status" ]; then
        mkdir -p "$src/build"
        tar -C "$BUILD" --exclude=node_modules -cf - status \
            | tar -C "$src/build" -xf -
    fi
    echo "build.sh: dpkg-buildpackage in ${src#"$REPO"/}"
    (cd "$src" && dpkg-buildpackage -us -uc -b) >"$BUILD/deb.log" 2>&1 || {
        tail -60 "$BUILD/deb.log"; exit 1; }
    [ -f "$pkg" ] || { echo "build.sh: $pkg not built" >&2; exit 1; }
    echo "build.sh: package at ${pkg#"$REPO"/}"
    dpkg-deb -f "$pkg" Package Version Depends
    dpkg-deb -c "$pkg" | awk '{ print "  " $6 $7 $8 }'
    echo "build.sh: lintian ${pkg#"$REPO"/}"
    lintian "$pkg" >"$BUILD/lintian.log" 2>&1 || rc=$?
    cat "$BUILD/lintian.log"
    if [ $rc -ne 0 ] || grep -q '^E: ' "$BUILD/lintian.log"; then
        echo "build.sh: lintian failed (exit status $rc)" >&2
        exit 1
    fi
    echo "build.sh: lintian: no errors"
}

# What CI runs (.ci/run): the prove suite against the plain build, a
# libFuzzer smoke of every target (FUZZ_SMOKE seconds each, default 5),
# the prove suite again against the ASan/UBSan build (DSG_NO_ASAN=1 skips
# it, for a quicker local run) and the valgrind subset (seconds).  Each
# part runs even if one before it failed; the summary names what failed.
# About 10 minutes on 2 cores.
# nginx's own test suite with the module applied everywhere, diffed against
# stock nginx; the allowed differences are listed in t/peer-expected.txt
peer() {
    local dir=${PEER_DIR:-$REPO/../shared/peer}
    # somewhere the unprivileged test user (nobody) can reach, whatever the
    # permissions above the checkout
    local out=${PEER_OUT:-/tmp/dsg-peer}
    local variants=${PEER_VARIANTS:-"guard cache cache_valid"}
    if [ ! -x "$dir/run.sh" ] || [ ! -d "$dir/nginx-tests" ]; then
        echo "build.sh: peer suite not found at $dir (set PEER_DIR): skipped"
        return 0
    fi
    # shellcheck disable=SC2086
    need $PEER_DEPS
    # a copy the test user can read, not replaced by a rebuild
    rm -rf "$out"
    mkdir -p "$out"
    cp "$SO" "$out/module.so"
    chmod 755 "$out" "$out/module.so"
    MODULE="$out/module.so" OUT="$out/all" JOBS="${JOBS:-2}" \
        VARIANTS="baseline $variants" "$dir/run.sh" >"$out/run.log" 2>&1
    sed -n '1,/^$/p' "$out/all/summary.md"
    # shellcheck disable=SC2086
    perl "$REPO/t/peer-check.pl" "$REPO/t/peer-expected.txt" \
        "$out/all/summary.md" $variants >"$out/check.log" || true
    tail -1 "$out/check.log"
    grep '^peer: listed' "$out/check.log" || true
    local again
    again=$(sed -n 's/^peer: NOT ALLOWED: [^ ]* \([^:]*\):.*/\1/p' \
                "$out/check.log" | sort -u | tr '\n' ' ')
    [ -z "$again" ] && return 0
    grep '^peer: NOT ALLOWED' "$out/check.log"
    # nginx's tests time things on a loaded machine: a difference counts
    # only if it comes back when the file runs again, stock and with the
    # module side by side
    echo "build.sh: peer: running again: $again"
    MODULE="$out/module.so" OUT="$out/again" JOBS="${JOBS:-2}" TESTS="$again" \
        VARIANTS="baseline $variants" "$dir/run.sh" >>"$out/run.log" 2>&1
    local rc=0
    # shellcheck disable=SC2086
    perl "$REPO/t/peer-check.pl" "$REPO/t/peer-expected.txt" \
        "$out/again/summary.md" $variants >"$out/check-again.log" || rc=$?
    grep -v '^peer: allowed\|^peer: listed' "$out/check-again.log" || true
    return $rc
}

test_all() {
    local failed= start=$SECONDS
    echo "build.sh: === prove suite, plain build"
    ( integration ) || failed="$failed prove"
    echo "build.sh: === fuzz smoke, ${FUZZ_SMOKE:-5} s per target"
    ( fuzz "${FUZZ_SMOKE:-5}" ) || failed="$failed fuzz"
    if [ -z "${DSG_NO_ASAN:-}" ]; then
        echo "build.sh: === prove suite, ASan/UBSan build"
        ( test_asan ) || failed="$failed test-asan"
    fi
    echo "build.sh: === valgrind subset"
    ( test_valgrind ) || failed="$failed test-valgrind"
    echo "build.sh: === nginx's own tests, stock and with the module"
    ( peer ) || failed="$failed peer"
    echo "build.sh: test took $((SECONDS - start)) s${failed:+, FAILED:$failed}"
    [ -z "$failed" ]
}

case "${1:-build}" in
    build)
        build
        ;;
    test)
        build
        # shellcheck disable=SC2086
        need $BROWSER_DEPS
        unit
        fuzz_replay
        if [ $# -gt 1 ]; then
            shift
            cd "$REPO" && prove -v "$@"
        else
            test_all
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
    test-asan)
        shift
        test_asan "$@"
        ;;
    test-valgrind)
        test_valgrind
        ;;
    fuzz)
        fuzz "${2:-60}"
        ;;
    peer)
        build
        peer
        ;;
    deb)
        deb
        ;;
    *)
        echo "usage: $0 [build|test [t/file.t ...]|unit|run|bench|test-asan [t/file.t ...]|test-valgrind|fuzz [seconds]|peer|deb]" >&2
        exit 2
        ;;
esac
