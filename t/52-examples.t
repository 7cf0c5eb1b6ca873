#!/usr/bin/perl
# The examples work as documented: every examples/*.conf, its placeholders
# substituted, passes `nginx -t` with the module loaded; examples/run.sh
# (what ./build.sh run starts) brings up the gateway with 2 workers and
# the mock LLM, serves a JSON chat (cached when deterministic) and an SSE
# chat, the curl commands it prints work as printed, the access log shows
# the guard's decisions, and a SIGTERM stops nginx and the mock and
# removes the temporary prefix.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use POSIX qw(WNOHANG);
use Time::HiRes qw(sleep time);

my $t = DSG::Test->new(workers => 2);
my $repo = $t->repo;
my $nginx = $ENV{NGINX_BIN} || '/usr/sbin/nginx';
my $module = $ENV{DSG_MODULE} || "$repo/build/ngx_http_deepseek_guard_module.so";
$module = "$repo/$module" unless $module =~ m{^/};

sub slurp {
    my ($f) = @_;
    open(my $fh, '<', $f) or return '';
    local $/;
    return scalar <$fh>;
}

sub children {
    my ($ppid) = @_;
    my @kids;
    for my $stat (glob '/proc/[0-9]*/stat') {
        my $s = slurp($stat);
        push @kids, $1 if $s =~ /^(\d+) \(.*\) \S (\d+) / && $2 == $ppid;
    }
    return @kids;
}

sub listening {
    my ($port) = @_;
    my $r = $t->http(port => $port, uri => '/', timeout => 2);
    return !($r->{error} && $r->{error} =~ /connect/i);
}

# ------------------------------------------------------------ nginx -t

my @confs = sort glob "$repo/examples/*.conf";
cmp_ok(scalar @confs, '>=', 2, 'example configurations: '
       . join(' ', map { m{([^/]+)$} } @confs));

my $n = 0;
for my $conf (@confs) {
    my ($name) = $conf =~ m{([^/]+)$};
    my $p = $t->prefix . '/ex' . ++$n;
    mkdir $p;
    mkdir "$p/logs";
    chmod 0755, $p;

    my $text = slurp($conf);
    like($text, qr/^load_module \@MODULE\@;$/m,
         "$name: load_module with the \@MODULE\@ placeholder");
    like($text, qr/^worker_processes 2;$/m, "$name: 2 workers");
    like($text, qr/deepseek_guard_metrics;/, "$name: a metrics location");
    unlike($text, qr/\$http_x_priority/i,
           "$name: no class from a client-chosen priority header");

    $text =~ s/\@MODULE\@/$module/g;
    $text =~ s/\@PREFIX\@/$p/g;
    $text =~ s/\@UPSTREAM\@/127.0.0.1:1/g;
    $text =~ s/\@PORT\@/$t->port/ge;
    unlike($text, qr/\@[A-Z]+\@/, "$name: no other placeholder");

    open(my $fh, '>', "$p/nginx.conf") or die $!;
    print {$fh} $text;
    close $fh;

    # an ASan build of the module needs its runtime preloaded in nginx
    local $ENV{LD_PRELOAD} = $ENV{DSG_NGINX_PRELOAD}
        if $ENV{DSG_NGINX_PRELOAD};
    my $out = `$nginx -p $p/ -c $p/nginx.conf -e $p/logs/error.log -t 2>&1`;
    is($?, 0, "$name: nginx -t") or diag $out;
    like($out, qr/test is successful/, "$name: ... test is successful");
}

# ------------------------------------------------------------ run.sh

my $port = $t->port(1);
my $out_file = $t->prefix . '/run.out';
my $pid = fork();
die "fork: $!" unless defined $pid;
if (!$pid) {
    open(STDIN, '<', '/dev/null');
    open(STDOUT, '>', $out_file) or POSIX::_exit(126);
    open(STDERR, '>&', \*STDOUT) or POSIX::_exit(126);
    $ENV{PORT} = $port;
    $ENV{DSG_MODULE} = $module;
    $ENV{NGINX_BIN} = $nginx;
    delete $ENV{DSG_KEEP};
    exec('/bin/bash', "$repo/examples/run.sh") or POSIX::_exit(127);
}

sub run_stop {
    my ($sig) = @_;
    return undef unless $pid;
    kill $sig, $pid;
    my $deadline = time() + 15;
    while (time() < $deadline) {
        if (waitpid($pid, WNOHANG) == $pid) {
            my $st = $?;
            undef $pid;
            return $st;
        }
        sleep 0.05;
    }
    kill 'KILL', $pid;
    waitpid($pid, 0);
    undef $pid;
    return -1;
}
END { local $?; run_stop('TERM') if $pid }

my $out = '';
$t->wait_until(sub { $out = slurp($out_file); $out =~ /^Ctrl-C stops both/m
                     || waitpid($pid, WNOHANG) == $pid }, 30, 0.1);
like($out, qr{^run\.sh: gateway on http://127\.0\.0\.1:$port \(nginx pid \d+\)}m,
     'run.sh: prints the gateway URL')
    or BAIL_OUT("run.sh did not start:\n$out");

my ($master) = $out =~ /nginx pid (\d+)/;
my ($mock_port, $mock_pid) = $out =~ /mock LLM on 127\.0\.0\.1:(\d+) \(pid (\d+)\)/;
my ($prefix) = $out =~ /^run\.sh: prefix (\S+)/m;
ok($mock_port && $mock_pid, "... and the mock LLM's port ($mock_port)");
ok($prefix && -d $prefix, "... and its prefix ($prefix)");

my @workers = grep { slurp("/proc/$_/cmdline") =~ /worker process/ }
              children($master);
is(scalar @workers, 2, 'nginx runs 2 workers');

# a JSON chat, deterministic: a miss, then the same from the cache
my @h = ('Authorization' => 'Bearer sk-normal-demo',
         'X-Deterministic' => '1');
my %json = (port => $port, key => undef, headers => \@h,
            extra => { temperature => 0 }, content => 'Hello');
my $r = $t->chat(%json);
is($r->{status}, 200, 'JSON chat: 200');
like($r->{headers}{'content-type'}, qr{^application/json}, '... JSON');
my $d = DSG::Test::json_decode($r->{body});
ok($d && $d->{choices}[0]{message}{content}, '... with an answer')
    or diag $r->{body};
is($r->{headers}{'x-cache-status'}, 'MISS', '... a cache miss');
my $r2 = $t->chat(%json);
is($r2->{headers}{'x-cache-status'}, 'HIT', 'the same again: a cache HIT');
is($r2->{body}, $r->{body}, '... the same answer');

# without X-Deterministic the cache is bypassed
$r2 = $t->chat(%json, headers => ['Authorization' => 'Bearer sk-normal-demo']);
is($r2->{headers}{'x-cache-status'}, 'BYPASS',
   'without X-Deterministic: BYPASS');

# an SSE chat
$r = $t->chat(port => $port, stream => 1, content => 'Hello',
              headers => ['Authorization' => 'Bearer sk-critical-demo']);
is($r->{status}, 200, 'SSE chat: 200');
like($r->{headers}{'content-type'}, qr{^text/event-stream}, '... an event stream');
my @ev = DSG::Test::sse_data($r->{body});
cmp_ok(scalar @ev, '>', 2, '... of ' . scalar(@ev) . ' events');
is($ev[-1], '[DONE]', '... ending with [DONE]');
is(scalar(grep { !DSG::Test::json_decode($_) } @ev[0 .. $#ev - 1]), 0,
   '... every chunk is JSON');

# the curl commands run.sh prints work as printed
my @cmds;
{
    my $cur;
    for my $l (split /\n/, $out) {
        if ($l =~ /^\s+(curl .*)$/) {
            $cur = $1;
        } elsif (defined $cur) {
            $l =~ s/^\s+//;
            $cur .= " $l";
        }
        next unless defined $cur;
        if ($cur =~ s/\s*\\$//) {
            next;
        }
        push @cmds, $cur;
        undef $cur;
    }
}
is(scalar @cmds, 2, 'run.sh prints 2 curl commands');
SKIP: {
    skip 'curl not installed', 2 unless -x '/usr/bin/curl';
    my $o = `$cmds[0] 2>&1`;
    my $dj = DSG::Test::json_decode($o);
    ok($dj && $dj->{choices}[0]{message}{content},
       'the printed JSON chat command works') or diag "$cmds[0]\n$o";
    $o = `$cmds[1] 2>&1`;
    like($o, qr/data: \[DONE\]\s*\z/, 'the printed SSE chat command works')
        or diag "$cmds[1]\n$o";
}

# the metrics location and the access log of the example
my $m = $t->http(port => $port, uri => '/metrics');
like($m->{body},
     qr/^deepseek_guard_requests_total\{zone="backend",class="critical",decision="admitted"\} 2$/m,
     'metrics: the 2 SSE chats admitted as critical');
# the printed JSON command sends the same prompt with its keys in another
# order: deepseek_guard_cache_json_canonical makes it the same entry
like($m->{body},
     qr/^deepseek_guard_cache_requests_total\{cache="llm",status="hit"\} 2$/m,
     'metrics: 2 cache hits (the printed command\'s JSON is canonicalized)');
my $alog = '';
$t->wait_until(sub { $alog = slurp("$prefix/logs/access.log");
                     scalar(() = $alog =~ /\n/g) >= 6 }, 5);
like($alog, qr/ 200 \d+ rt=\S+ urt=\S+ class=normal decision=ADMITTED wait_ms=0 retry_ms=- zone=- cache=MISS$/m,
     'access log: class, decision, wait, cache of a miss');
like($alog, qr/class=- decision=CACHED .* cache=HIT$/m,
     'access log: a hit, decided by the cache');

my @bad = grep { /\[(?:alert|crit|emerg)\]|exited on signal
                  |ERROR:\ AddressSanitizer|runtime\ error:/x }
          split /\n/, slurp("$prefix/logs/error.log");
is("@bad", '', "the gateway's error.log has no alerts");

# SIGTERM stops everything
my $st = run_stop('TERM');
ok(defined $st && $st != -1, 'run.sh exits on SIGTERM');
like(slurp($out_file), qr/^run\.sh: stopped$/m, '... after stopping both');
ok(!kill(0, $master), '... nginx master is gone');
ok(!(grep { kill 0, $_ } @workers), '... and its workers');
ok(!kill(0, $mock_pid), '... the mock is gone');
ok(!listening($port), '... nothing listens on the gateway port');
ok(!-d $prefix, '... the temporary prefix is removed');

$t->done;
