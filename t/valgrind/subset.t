#!/usr/bin/perl
# The module under valgrind (./build.sh test-valgrind; not part of the
# prove t/*.t suite: it takes a few minutes).
#
# nginx runs as ONE process (master_process off; daemon off;) under
#
#   valgrind --error-exitcode=1 --leak-check=full
#            --errors-for-leak-kinds=definite --suppressions=nginx.supp
#
# so valgrind's exit status is the verdict on everything the module did:
# a representative subset of the integration suite (admission: rate,
# burst, rejections with Retry-After, an in-flight cap with a priority
# queue; cache: miss, store, hit, canonical JSON keys, a body spilled to a
# temporary file, bypass, coalesced misses; SSE: a stream stored and
# replayed; clients that leave mid-stream or while queued) and then a graceful exit.  No reload: nginx stops serving
# after a SIGHUP in single-process mode, module or not (reloads run under
# ASan in ./build.sh test-asan).  Any invalid read or
# write, use of uninitialised memory or definitely lost block fails;
# t/valgrind/nginx.supp documents what is suppressed (nginx's and its
# libraries' own, never the module's).
#
# Environment: VALGRIND (default valgrind), VALGRIND_ARGS (extra flags),
# DSG_KEEP=1 keeps the prefix with logs/valgrind.log.

use strict;
use warnings;
use Test::More;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $valgrind = $ENV{VALGRIND} || 'valgrind';
plan skip_all => "$valgrind not found"
    unless $valgrind =~ m{/} ? -x $valgrind
                             : grep { -x "$_/$valgrind" } split /:/, $ENV{PATH};

my $t = DSG::Test->new(workers => 1);
my $p = $t->prefix;
$t->mock_start(first_token_ms => 20, token_ms => 20, tokens => 4);

$t->write_config(<<'EOF');
    map $http_authorization $api_key {
        "~^Bearer\s+(?<k>\S+)$"  $k;
        default                  "";
    }
    map $api_key $dsg_class {
        crit     critical;
        default  normal;
    }
    map $http_x_no_cache $no_cache { "" ""; default 1; }

    deepseek_guard_class critical reserve=20% queue=8 queue_timeout=30s;
    deepseek_guard_class normal queue=8 queue_timeout=30s;
    deepseek_guard_zone per_key:1m key=$api_key rate=5r/s burst=2 status=429;
    deepseek_guard_zone backend:1m key=backend inflight=2;
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m max_size=64m;

    log_format vg '$status $deepseek_guard_status '
                  '"$deepseek_guard_cache_status" $uri';

    server {
        listen 127.0.0.1:%%PORT%%;
        access_log %%PREFIX%%/logs/access.log vg;
        client_body_buffer_size 1k;
        deepseek_guard_cache_status_header X-Cache-Status;
        proxy_http_version 1.1;
        proxy_read_timeout 60s;

        location = /ping { return 200 "pong"; }

        # admission only
        location /limited/ {
            deepseek_guard per_key;
            deepseek_guard backend;
            deepseek_guard_classify $dsg_class default=normal;
            deepseek_guard_ratelimit_headers on;
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering off;
        }

        # admission and cache, SSE streamed through
        location /v1/ {
            deepseek_guard backend;
            deepseek_guard_classify $dsg_class default=normal;
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 10m;
            deepseek_guard_cache_json_canonical on;
            deepseek_guard_cache_bypass $no_cache;
            deepseek_guard_cache_use_stale overload updating;
            proxy_pass http://%%MOCK%%;
            proxy_buffering off;
        }
    }
EOF

# one process: valgrind's exit status is nginx's
my $conf = do {
    open(my $fh, '<', $t->conf_file) or die $!;
    local $/;
    <$fh>;
};
$conf =~ s/^master_process on;$/master_process off;/m or die 'no master_process';
$conf =~ s/^daemon on;$/daemon off;/m or die 'no daemon';
$conf =~ s/^user root;\n//m;
{
    open(my $fh, '>', $t->conf_file) or die $!;
    print {$fh} $conf;
    close $fh;
}

my $vlog = "$p/logs/valgrind.log";
my @cmd = ($valgrind, '--error-exitcode=1', '--leak-check=full',
           '--errors-for-leak-kinds=definite', '--show-leak-kinds=definite',
           '--num-callers=40',
           '--suppressions=' . $t->repo . '/t/valgrind/nginx.supp',
           "--log-file=$vlog",
           split(' ', $ENV{VALGRIND_ARGS} || ''),
           $ENV{NGINX_BIN} || '/usr/sbin/nginx', '-p', "$p/", '-c',
           $t->conf_file);

my $t0 = time();
my $pid = fork();
die "fork: $!" unless defined $pid;
if (!$pid) {
    delete $ENV{LD_PRELOAD};
    open(STDIN, '<', '/dev/null');
    open(STDOUT, '>>', "$p/logs/stderr.log") or POSIX::_exit(126);
    open(STDERR, '>&', \*STDOUT) or POSIX::_exit(126);
    exec { $cmd[0] } @cmd or POSIX::_exit(127);
}

sub vg_log {
    open(my $fh, '<', $vlog) or return '';
    local $/;
    my $s = <$fh>;
    return defined $s ? $s : '';
}

my $up = $t->wait_until(sub {
    die "nginx under valgrind exited early:\n" . vg_log() . $t->error_log
        if waitpid($pid, WNOHANG) == $pid;
    $t->http(uri => '/ping', timeout => 2)->{status} == 200;
}, 120, 0.2);
ok($up, sprintf('nginx is up under valgrind (%.1f s)', time() - $t0))
    or BAIL_OUT('nginx did not start under valgrind');

# ------------------------------------------------ admission

my @res = map { $t->chat(key => 'k1', uri => '/limited/chat/completions',
                         max_tokens => 2, timeout => 60) } 1 .. 6;
my @st = map { $_->{status} } @res;
ok((grep { $_ == 200 } @st) >= 1, 'rate: some admitted') or diag "@st";
ok((grep { $_ == 429 } @st) >= 1, 'rate: some rejected') or diag "@st";
my ($rej) = grep { $_->{status} == 429 } @res;
ok($rej && $rej->{headers}{'retry-after'}, 'a rejection has Retry-After');

# in-flight cap 2, streams of 4 tokens: the others wait in the queue
@res = $t->parallel([map {
    $t->chat_req(key => $_ == 1 ? 'crit' : "q$_", stream => 1,
                 uri => '/limited/chat/completions',
                 content => "queue $_")
} 1 .. 5], timeout => 120);
is(scalar(grep { $_->{status} == 200 } @res), 5, 'queue: all five served')
    or diag join ' ', map { $_->{status} . ($_->{error} || '') } @res;
like($t->access_log, qr/^200 QUEUED /m, '... some after waiting');

# ------------------------------------------------ cache

my $body = '{"model":"deepseek-chat","messages":[{"role":"user",'
         . '"content":"cache me"}]}';
my $same = '{ "messages" : [ { "content" : "cache me", "role" : "user" } ],'
         . ' "model" : "deepseek-chat" }';
my @h = ('Content-Type' => 'application/json');

sub post {
    my ($b, @extra) = @_;
    return $t->http(method => 'POST', uri => '/v1/chat/completions',
                    body => $b, headers => [@h, @extra], timeout => 60);
}

my $r1 = post($body);
is($r1->{status}, 200, 'cache: miss answered');
my $r2 = post($body);
is($r2->{headers}{'x-cache-status'}, 'HIT', 'cache: hit');
is($r2->{body}, $r1->{body}, '... same body');
is(post($same)->{headers}{'x-cache-status'}, 'HIT',
   'cache: canonical JSON key hit');
is(post($body, 'X-No-Cache' => 1)->{headers}{'x-cache-status'}, 'BYPASS',
   'cache: bypass');

# a body larger than client_body_buffer_size goes to a temporary file
my $big = '{"model":"deepseek-chat","messages":[{"role":"user","content":"'
        . ('x' x 5000) . '"}]}';
is(post($big)->{status}, 200, 'cache: miss of a body in a temporary file');
is(post($big)->{headers}{'x-cache-status'}, 'HIT', '... then a hit');

# concurrent misses for one key: one goes upstream
@res = $t->parallel([map {
    { method => 'POST', uri => '/v1/chat/completions', headers => [@h],
      body => '{"messages":[{"role":"user","content":"together"}]}' }
} 1 .. 3], timeout => 120);
is(scalar(grep { $_->{status} == 200 } @res), 3, 'coalesced misses served')
    or diag join ' ', map { $_->{status} . ($_->{error} || '') } @res;

# ------------------------------------------------ SSE

my $s1 = $t->chat(stream => 1, content => 'stream me', timeout => 60);
is($s1->{status}, 200, 'SSE: miss streamed');
like($s1->{body}, qr/data: \[DONE\]/, '... to [DONE]');
my $s2 = $t->chat(stream => 1, content => 'stream me', timeout => 60);
is($s2->{headers}{'x-cache-status'}, 'HIT', 'SSE: replayed from the cache');
is($s2->{body}, $s1->{body}, '... identically');

# ------------------------------------------------ clients that go away

# mid-stream: the partial capture is dropped, nothing is stored
my $ab = $t->http(%{ $t->chat_req(stream => 1, content => 'abort me') },
                  abort_after_bytes => 10, timeout => 60);
ok($ab->{aborted}, 'SSE: client gone mid-stream');
is($t->chat(stream => 1, content => 'abort me', timeout => 60)
       ->{headers}{'x-cache-status'}, 'MISS', '... nothing was stored');

# while queued: two streams hold the in-flight cap, a third waits and leaves
@res = $t->parallel([
    (map { $t->chat_req(key => "hold$_", stream => 1, content => "hold $_",
                        uri => '/limited/chat/completions') } 1 .. 2),
    { %{ $t->chat_req(key => 'gone', uri => '/limited/chat/completions') },
      at_ms => 20, abort_after_ms => 40 },
], timeout => 120);
is("$res[0]{status} $res[1]{status}", '200 200', 'queue: the holders served');
ok($res[2]{aborted}, '... the waiter left while queued');
is($t->chat(key => 'after', uri => '/limited/chat/completions',
            timeout => 60)->{status}, 200, '... and its slot is free again');

# ------------------------------------------------ exit and verdict

kill 'QUIT', $pid;
my $rc;
$t->wait_until(sub {
    return 0 unless waitpid($pid, WNOHANG) == $pid;
    $rc = $?;
    1;
}, 120, 0.1);
if (!defined $rc) {
    kill 'KILL', $pid;
    waitpid($pid, 0);
}
my $log = vg_log();
my ($summary) = $log =~ /(ERROR SUMMARY: .*)/;
diag sprintf('valgrind run: %.0f s, %s', time() - $t0, $summary || '?');
ok(defined $rc, 'nginx exited on QUIT');
is($rc, 0, 'valgrind found no error (exit status 0)') or diag $log;
my @bad = grep {
    /Invalid (?:read|write|free)|Mismatched free|uninitialised|overlap/
        || /are definitely lost/
} split /\n/, $log;
ok(!@bad, 'no invalid access, uninitialised use or definite leak')
    or diag join "\n", @bad;

$t->done;
