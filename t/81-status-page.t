#!/usr/bin/perl
# deepseek_guard_status, the live status page, in a real browser: Debian's
# headless chromium, driven by playwright-core (status/test-status-page.js,
# pinned in status/package-lock.json), loads the page of a 2-worker nginx
# while a known load runs (bench/loadgen.py: over the backend's capacity,
# over some keys' quota, and repeated prompts the cache answers), and
# checks that the numbers shown are those of the metrics endpoint within
# one poll, that the rates agree with the counters, that the charts grow
# and are redrawn, and that the page has no JavaScript error and requests
# nothing from another origin.  It saves docs/status-page.png (the README
# shows it).  Here, without a browser: the page's headers, GET/HEAD/POST,
# ?format=json and ?format=prometheus, access restriction, and the
# Retry-After numbers against what the clients were told.
#
# ./build.sh test installs chromium and runs `npm ci` in status/; without
# them this file skips.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use File::Path qw(make_path);
use POSIX qw(WNOHANG);
use Time::HiRes qw(sleep time);

my $CHROMIUM = $ENV{DSG_CHROMIUM} || '/usr/bin/chromium';
my $NODE = $ENV{DSG_NODE} || 'node';

my $t = DSG::Test->new(workers => 2);
my $repo = $t->repo;
my $script = "$repo/status/test-status-page.js";

my $have_node = !system("$NODE --version >/dev/null 2>&1");
plan skip_all => "$CHROMIUM, node or status/node_modules/playwright-core "
               . 'missing (./build.sh test installs them)'
    unless -x $CHROMIUM && $have_node
           && -d "$repo/status/node_modules/playwright-core";

# The backend takes 250 ms an answer and 4 requests at once: 16 requests
# a second.  The load offers about 21 to it: critical and normal queue,
# low never queues and is turned away with 503.  The quota lets a key 4
# requests a second: the critical and low keys send 6 and get 429 too.
# A second load repeats one prompt: the cache answers it before admission.
$t->mock_start(first_token_ms => 250, token_ms => 0, tokens => 4);
$t->write_config(<<'EOF');
    map $http_authorization $cls {
        "~^Bearer c"    critical;
        "~^Bearer l"    low;
        default         normal;
    }

    deepseek_guard_class critical queue=16 queue_timeout=5s;
    deepseek_guard_class normal   queue=8  queue_timeout=2s;
    deepseek_guard_class low;

    deepseek_guard_zone quota:1m   key=$http_authorization rate=4r/s burst=2
                                   status=429;
    deepseek_guard_zone backend:1m key=backend inflight=4;

    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        deepseek_guard_classify $cls;

        location /v1/ {
            deepseek_guard quota;
            deepseek_guard backend;
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 10m;
            proxy_pass http://%%MOCK%%;
        }

        location = /status {
            access_log off;
            deepseek_guard_status;
            allow 127.0.0.1;
            deny all;
        }

        location = /status-closed {
            deepseek_guard_status;
            deny all;
        }

        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
            allow 127.0.0.1;
            deny all;
        }
    }
EOF
$t->start;

# ------------------------------------------------------------ the handler

my $r = $t->get('/status');
is($r->{status}, 200, 'GET /status');
is($r->{headers}{'content-type'}, 'text/html; charset=utf-8',
   '... Content-Type: text/html; charset=utf-8');
like($r->{headers}{'content-security-policy'} // '',
     qr/default-src 'none';.*connect-src 'self'/,
     '... a Content-Security-Policy: nothing but its own origin');
is($r->{headers}{'content-length'}, length $r->{body},
   '... Content-Length of the body');
my $html = $r->{body};
like($html, qr/^<!DOCTYPE html>/, '... an HTML page');
like($html, qr/uPlot=function/, '... with uPlot inlined');
like($html, qr/The MIT License.*Leon Sorokin/s, '... and its license');
my @ext = $html =~ /\b(?:src|href)\s*=\s*["']?((?:https?:)?\/\/[^"' >]+)/gi;
is("@ext", '', '... no src= or href= to another host');
unlike($html, qr/<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=/i,
       '... no external script, style sheet, image or frame');

my $h = $t->http(method => 'HEAD', uri => '/status');
is($h->{status}, 200, 'HEAD /status');
is($h->{headers}{'content-length'}, length $html, '... the same length');
is($h->{body}, '', '... no body');
is($t->http(method => 'POST', uri => '/status', body => 'x')->{status}, 405,
   'POST /status: 405');
is($t->get('/status-closed')->{status}, 403,
   'restricted like /metrics: deny all gives 403');

my $j = $t->get('/status?format=json');
like($j->{headers}{'content-type'}, qr{^application/json},
     '/status?format=json: the JSON of the metrics');
my $d = DSG::Test::json_decode($j->{body});
is_deeply([map { $_->{zone} } @{ $d->{zones} }], [qw(quota backend)],
          '... the zones');
is_deeply([map { $_->{class} } @{ $d->{zones}[1]{classes} }],
          [qw(critical normal low)], '... the classes');
is_deeply($d->{zones}[1]{classes}[0]{retry_after},
          { count => 0, sum_seconds => 0, last_seconds => 0 },
          '... retry_after of a class never rejected');
like($t->get('/status?format=prometheus')->{body},
     qr/^# HELP deepseek_guard_requests_total /m,
     '/status?format=prometheus: the text exposition');

# ------------------------------------------------------------ the load

my $python  = $ENV{DSG_PYTHON} || '/usr/bin/python3';
my $loadgen = "$repo/bench/loadgen.py";
my $p = $t->prefix;

sub spawn {
    my ($out, @cmd) = @_;
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if (!$pid) {
        delete $ENV{LD_PRELOAD};
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>', $out) or POSIX::_exit(126);
        open(STDERR, '>>', "$out.err") or POSIX::_exit(126);
        exec { $cmd[0] } @cmd or POSIX::_exit(127);
    }
    return $pid;
}

# its exit code, or -1 when it had to be stopped after $secs
sub reap {
    my ($pid, $secs) = @_;
    my $deadline = time() + $secs;
    while (time() < $deadline) {
        return $? >> 8 if waitpid($pid, WNOHANG) == $pid;
        sleep 0.1;
    }
    kill 'TERM', $pid;
    waitpid($pid, 0);
    return -1;
}

my @classes = ('--class', 'critical:3:c1', '--class', 'normal:4:n1,n2,n3',
               '--class', 'low:3:l1');
my @lg = ($python, $loadgen, '--port', $t->port, '--quiet', '--timeout', 30);

# the load of the browser test: stopped when the browser is done, at the
# latest after 150 s
my $load = spawn("$p/load.json", @lg, '--duration', 150, '--rate', 20,
                 @classes);
my $hits = spawn("$p/hits.json", @lg, '--duration', 150, '--rate', 5,
                 '--same-body', '--class', 'critical:1:c-cache',
                 '--prompt', 'the same question');

# ------------------------------------------------------------ the browser

my $shot = "$repo/docs/status-page.png";
make_path("$repo/docs");
my $start = time();
my $node = spawn("$p/browser.out", $NODE, $script,
                 '--base', 'http://127.0.0.1:' . $t->port,
                 '--page', '/status', '--metrics', '/metrics?format=json',
                 '--screenshot', $shot, '--profile', "$p/chromium-profile",
                 '--chromium', $CHROMIUM, '--polls-for-screenshot', 30);
my $rc = reap($node, 300);
my $took = time() - $start;

ok(waitpid($load, WNOHANG) == 0 && waitpid($hits, WNOHANG) == 0,
   'the load ran as long as the browser test');
kill 'TERM', $load, $hits;
reap($_, 10) for $load, $hits;

my $done;
open(my $fh, '<', "$p/browser.out") or die "browser.out: $!";
while (my $l = <$fh>) {
    my $c = eval { DSG::Test::json_decode($l) };
    if (!$c) {
        diag("browser: $l");
        next;
    }
    if ($c->{done}) {
        $done = $c;
        next;
    }
    ok($c->{ok}, "browser: $c->{name}") or diag($c->{diag} // '');
}
close $fh;
ok($done && $rc == 0, sprintf('the browser test ran to its end (exit %d, '
                              . '%.0f s, %s polls)', $rc, $took,
                              $done ? $done->{polls} : '?'))
    or diag(`tail -c 3000 $p/browser.out.err 2>/dev/null`);
ok(-s $shot, 'docs/status-page.png saved');

# ------------------------------------------------------------ Retry-After

# Every client the guard rejects is told a wait: a burst of 90 requests
# after the load has drained, and the metrics' retry_after has each of its
# rejections (counted in the log phase) with a mean within the second that
# Retry-After rounds up to.

sub retry_totals {
    my $m = DSG::Test::json_decode($t->get('/metrics?format=json')->{body});
    my ($count, $sum) = (0, 0);
    for my $z (@{ $m->{zones} }) {
        for my $c (@{ $z->{classes} }) {
            $count += $c->{retry_after}{count};
            $sum += $c->{retry_after}{sum_seconds};
        }
    }
    return ($count, $sum);
}

# the stopped load's queued requests leave (queue_timeout= is 5 s at most)
my @before = (-1, 0);
ok($t->wait_until(sub {
       return 0 unless $t->zone_idle('backend') && $t->zone_idle('quota');
       my @now = retry_totals();
       my $same = $now[0] == $before[0];
       @before = @now;
       sleep 0.5;
       return $same;
   }, 20), 'the load has drained');

is(reap(spawn("$p/burst.json", @lg, '--count', 90, '--rate', 60,
              '--out', "$p/burst.jsonl", @classes), 60), 0,
   'a burst of 90 requests');

my (@told, %status);
open(my $in, '<', "$p/burst.jsonl") or die "burst.jsonl: $!";
while (my $l = <$in>) {
    my $rec = DSG::Test::json_decode($l);
    $status{ $rec->{status} }++;
    push @told, $rec->{retry_after}
        if $rec->{status} == 429 || $rec->{status} == 503;
}
close $in;
diag('burst: ' . join(' ', map { "$_: $status{$_}" } sort keys %status));
cmp_ok(scalar @told, '>=', 5, 'clients were rejected with Retry-After');
is(scalar(grep { !defined || !/^\d+$/ } @told), 0,
   '... every one with a Retry-After in seconds');

my ($count, $sum);
$t->wait_until(sub {
    ($count, $sum) = retry_totals();
    $count - $before[0] >= @told;
}, 10);
$count -= $before[0];
$sum -= $before[1];
is($count, scalar @told,
   'retry_after count: every rejection the clients saw');
my $told = 0;
$told += $_ for @told;
$told /= @told if @told;
my $mean = $count ? $sum / $count : 0;
ok($mean > 0 && $mean <= $told + 0.0005 && $mean > $told - 1,
   sprintf('retry_after mean %.3f s, the Retry-After clients saw %.3f s',
           $mean, $told));

$t->done;
