#!/usr/bin/perl
# deepseek_guard_malloc_trim: each worker hands the free pages of its
# malloc heap back to the kernel every interval.
#
#   A  configuration: "off" or a time over 0, in the http block only, once;
#      a mistake fails nginx -t naming the directive and file:line
#   B  the effect.  A burst of 240 slow requests with 48 KB bodies raises
#      the workers' heap by several megabytes; a few long requests sent at
#      the burst's peak stay in flight after it, and their allocations
#      pin every free page of the heap under them (glibc gives memory
#      back on free() only from the top of the heap).  With
#      deepseek_guard_malloc_trim off, the workers keep most of the
#      burst's memory for as long as the long requests run; with 1s, it
#      is back within a few seconds, while the long requests are still in
#      flight and are then answered whole.
#
# Part B measures RssAnon of the workers, so it is skipped under a
# sanitizer (LD_PRELOAD of libasan replaces malloc).

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use List::Util qw(sum);
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);
$t->mock_start(capacity => 0, first_token_ms => 50, token_ms => 0,
               tokens => 4);

sub conf {
    my (%o) = @_;
    my $trim = $o{trim} // '';
    my $srv  = $o{srv} // '';
    return <<"EOF";
    $trim
    client_body_buffer_size 64k;
    client_max_body_size 1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        $srv
        proxy_http_version 1.1;

        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }
    }
EOF
}

# ------------------------------------------------------------ A: config

sub bad {
    my ($name, $msg, $line_re, %o) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $t->config_fails($name, conf(%o), $msg, $line_re);
}

for my $good ('off', '1s', '500ms', '10s') {
    $t->write_config(conf(trim => "deepseek_guard_malloc_trim $good;"));
    my ($ok, $out) = $t->test_config;
    ok($ok, "deepseek_guard_malloc_trim $good: nginx -t passes")
        or diag $out;
}

bad('zero', qr/invalid interval "0"/, qr/malloc_trim 0;/,
    trim => 'deepseek_guard_malloc_trim 0;');
bad('not a time', qr/invalid interval "often"/, qr/malloc_trim often;/,
    trim => 'deepseek_guard_malloc_trim often;');
bad('server block',
    qr/"deepseek_guard_malloc_trim" directive is not allowed here/,
    qr/malloc_trim 1s;/, srv => 'deepseek_guard_malloc_trim 1s;');
bad('duplicate', qr/"deepseek_guard_malloc_trim" directive is duplicate/,
    qr/malloc_trim 2s;/,
    trim => "deepseek_guard_malloc_trim 1s;\n    "
            . "deepseek_guard_malloc_trim 2s;");
bad('two values', qr/invalid number of arguments in "deepseek_guard_malloc_trim"/,
    qr/malloc_trim 1s 2s;/, trim => 'deepseek_guard_malloc_trim 1s 2s;');

# ------------------------------------------------------------ B: effect

SKIP: {
    skip 'RssAnon is the sanitizer allocator\'s under ASan', 12
        if DSG::Test::sanitized();

    my $body_pad = 'x' x (48 * 1024);

    # RssAnon of every worker, kB
    my $anon = sub {
        my %kb;
        for my $w ($t->worker_pids) {
            open(my $fh, '<', "/proc/$w/status") or next;
            while (<$fh>) {
                $kb{$w} = $1 if /^RssAnon:\s+(\d+)/;
            }
        }
        return \%kb;
    };

    for my $mode ('off', '1s') {
        $t->write_config(conf(trim => "deepseek_guard_malloc_trim $mode;"));
        $t->start;

        # warm the workers up: a few rounds of small requests
        $t->parallel([map { $t->chat_req(content => "warm $_") } 1 .. 40]);
        sleep 2;
        my $base = $anon->();

        $t->mock_reset;
        my @burst = map {
            $t->chat_req(content => "burst $_ $body_pad", timeout => 40,
                         headers => ['X-Mock-Delay-Ms' => 2000])
        } 1 .. 240;
        # at the burst's peak: long requests that outlive it
        my @long = map {
            $t->chat_req(content => "long $_ $body_pad", timeout => 40,
                         at_ms => 1000,
                         headers => ['X-Mock-Delay-Ms' => 15000])
        } 1 .. 8;
        my $bg = $t->bg_parallel([@burst, @long], timeout => 45);

        # the peak: all 248 at the mock
        ok($t->wait_until(sub { $t->mock_stats->{inflight} >= 248 }, 15,
                          0.1),
           "$mode: the burst and the long requests in flight at once");
        my $peak = $anon->();

        # the burst is over, the long requests run on; a second and a
        # half for a trim tick of 1s
        ok($t->wait_until(sub {
               my $s = $t->mock_stats;
               $s->{completed} >= 240 && $s->{inflight} <= 8
           }, 20, 0.1), "$mode: the burst is answered");
        sleep 1.5;
        my $after = $anon->();
        cmp_ok($t->mock_stats->{inflight}, '==', 8,
               "$mode: the long requests still in flight");

        my $res = $t->bg_wait($bg);
        my $ok = grep { ($_->{status} // 0) == 200 } @$res;
        is($ok, 248, "$mode: every request answered 200, the long ones too");

        my ($b, $p, $a) = map { sum(values %$_) // 0 } $base, $peak, $after;
        diag sprintf("malloc_trim %s: RssAnon of the workers %d kB before, "
                     . "%d kB at the peak, %d kB after the burst",
                     $mode, $b, $p, $a);
        my $rise = $p - $b;
        ok($rise >= 4096, "$mode: the burst raised the workers' RssAnon "
                          . "by 4 MB or more ($rise kB)");
        if ($mode eq 'off') {
            # the control: the long requests pin the heap, glibc keeps it
            cmp_ok($a - $b, '>=', $rise / 2,
                   "off: more than half of it still resident "
                   . "1.5 s after the burst");
        } else {
            cmp_ok($a - $b, '<=', $rise / 4,
                   "1s: three quarters of it given back within "
                   . "1.5 s after the burst");
        }
        $t->stop;
    }
}

$t->check_log;
done_testing;
