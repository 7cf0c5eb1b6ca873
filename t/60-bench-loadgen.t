#!/usr/bin/perl
# bench/loadgen.py, the open-loop load generator of the overload benchmark:
# it keeps its configured arrival rate whatever the server does (slow
# answers, refusals, no answer at all), interleaves classes exactly by
# weight and records status and Retry-After per request.  And
# bench/hitclient.c, the C client of the stall scenario: the same records,
# the same schedule, every answer read whole.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 1);
my $python  = $ENV{DSG_PYTHON} || '/usr/bin/python3';
my $loadgen = $t->repo . '/bench/loadgen.py';
ok(-f $loadgen, 'bench/loadgen.py exists');

# every answer takes a second: an open-loop generator at 100 req/s has
# about 100 requests in flight, a closed-loop one would slow down
$t->mock_start(capacity => 0, first_token_ms => 1000, token_ms => 0, tokens => 1);
$t->write_config(<<'EOF');
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ { proxy_pass http://%%MOCK%%; }
        location = /busy {
            add_header Retry-After 7 always;
            return 503;
        }
        location = /hello {
            add_header X-Cache-Status HIT;
            return 200 "hello, 16 bytes\n";
        }
    }
EOF
$t->start;

my $n = 0;

sub loadgen {
    my (@args) = @_;
    my $out = $t->prefix . '/loadgen-' . ++$n . '.jsonl';
    my @cmd = ($python, $loadgen, '--port', $t->port, '--out', $out, '--quiet', @args);
    open(my $fh, '-|', @cmd) or die "cannot run @cmd: $!";
    local $/;
    my $stdout = <$fh>;
    close $fh;
    is($?, 0, "loadgen @args: exit 0") or diag $stdout;
    my ($line) = grep { /^\{/ } split /\n/, $stdout // '';
    my $sum = DSG::Test->json_decode($line // '{}');
    open(my $rf, '<', $out) or return ($sum, []);
    my @recs = map { DSG::Test->json_decode($_) } grep { length } split /\n/, <$rf>;
    close $rf;
    return ($sum, \@recs);
}

sub pct {
    my ($p, @v) = @_;
    return undef unless @v;
    @v = sort { $a <=> $b } @v;
    my $k = int($p * @v / 100 + 0.999999) - 1;
    $k = 0 if $k < 0;
    return $v[$k];
}

# ------------------------------------------------ 100 req/s for 3 s, slow answers

{
    my ($s, $r) = loadgen('--path', '/v1/chat/completions', '--rate', 100,
                          '--duration', 3, '--timeout', 20);
    is($s->{scheduled}, 300, '100 req/s for 3 s: 300 scheduled');
    my $sent = $s->{sent} // 0;
    ok(abs($sent - 300) <= 9, "300 +- 3% sent ($sent)");
    is(scalar @$r, 300, '... 300 records');
    my $rate = $s->{achieved_rate} // 0;
    ok(abs($rate - 100) <= 3, sprintf('... launched at 100 +- 3%% req/s (%.2f)', $rate));

    my @starts = sort { $a <=> $b } map { $_->{start} } @$r;
    my @gaps = map { ($starts[$_] - $starts[$_ - 1]) * 1000 } 1 .. $#starts;
    my $mgap = pct(50, @gaps);
    ok(defined $mgap && abs($mgap - 10) <= 1,
       sprintf('... median inter-arrival 10 +- 1 ms (%.2f)', $mgap // -1));
    my @late = map { ($_->{start} - $_->{sched}) * 1000 } @$r;
    my $p99 = pct(99, @late);
    # an ASan nginx takes CPU the generator needs on a 2-core machine
    # (25 ms failed at 36-38 ms on a 2-vCPU VM under the suite's own load;
    # a closed-loop generator would be late by whole response times)
    my $lmax = DSG::Test::sanitized() ? 100 : 60;
    cmp_ok($p99, '<', $lmax,
           sprintf('... p99 lateness against the schedule < %d ms (%.2f)', $lmax, $p99));
    cmp_ok(pct(100, @late), '<', 150, '... no arrival 150 ms late');

    my @ok = grep { $_->{status} == 200 } @$r;
    is(scalar @ok, 300, '... all answered 200');
    ok(!(grep { $_->{lat_ms} < 1000 } @ok), '... none faster than the 1 s answer');
    cmp_ok($s->{max_inflight}, '>=', 90,
           "... ~100 in flight: arrivals did not wait for answers ($s->{max_inflight})");
    my ($first_end) = sort { $a <=> $b } map { $_->{end} } @$r;
    my $before = grep { $_->{start} < $first_end } @$r;
    cmp_ok($before, '>=', 95, "... $before requests sent before the first answer came back");
    is($t->mock_stats->{chat_requests}, 300, '... the upstream saw 300 requests');
}

# ------------------------------------------------ classes, refusals, Retry-After

{
    my ($s, $r) = loadgen('--path', '/busy', '--method', 'GET', '--rate', 200,
                          '--count', 200, '--class', 'crit:1:ka',
                          '--class', 'norm:4:kb1,kb2');
    is($s->{scheduled}, 200, '--count 200: 200 scheduled');
    my %by;
    $by{$_->{cls}}++ for @$r;
    is_deeply(\%by, { crit => 40, norm => 160 }, '... weights 1:4 give exactly 20% / 80%');
    my @w = map { $_->{cls} } sort { $a->{i} <=> $b->{i} } @$r;
    my $even = 1;
    for (my $i = 0; $i + 5 <= @w; $i += 5) {
        $even = 0 unless (grep { $_ eq 'crit' } @w[$i .. $i + 4]) == 1;
    }
    ok($even, '... one critical in every window of five');
    is(scalar(grep { $_->{status} == 503 } @$r), 200, '... every answer 503');
    is(scalar(grep { ($_->{retry_after} // '') eq '7' } @$r), 200,
       '... every Retry-After recorded');
    my $rate = $s->{achieved_rate} // 0;
    ok(abs($rate - 200) <= 6, sprintf('... launched at 200 +- 3%% req/s (%.2f)', $rate));
    like($t->access_log, qr/Bearer|GET \/busy/, '... the requests reached nginx');
}

# ------------------------------------------------ no answer within the timeout

{
    $t->mock_config({ first_token_ms => 3000 });
    my ($s, $r) = loadgen('--path', '/v1/chat/completions', '--rate', 50,
                          '--duration', 1, '--timeout', 0.5);
    is($s->{sent}, 50, 'answers never come: still 50 sent in 1 s at 50 req/s');
    is(scalar(grep { ($_->{err} // '') eq 'timeout' && $_->{status} == 0 } @$r), 50,
       '... each recorded as a timeout');
    my $rate = $s->{achieved_rate} // 0;
    ok(abs($rate - 50) <= 1.5, sprintf('... launched at 50 +- 3%% req/s (%.2f)', $rate));
    my @lat = map { $_->{lat_ms} } @$r;
    ok(!(grep { $_ < 490 || $_ > 800 } @lat), '... each given up after its 0.5 s timeout');
}

# ------------------------------------------------ bench/hitclient.c

SKIP: {
    my $cc = (grep { -x "$_/cc" } split /:/, $ENV{PATH})[0];
    skip 'no cc', 9 unless $cc;
    my $exe = $t->prefix . '/hitclient';
    is(system('cc', '-O2', '-Wall', '-Werror', '-o', $exe,
              $t->repo . '/bench/hitclient.c'), 0, 'bench/hitclient.c builds');

    my $hc = sub {
        my ($path, $rate, $secs) = @_;
        my $out = $t->prefix . '/hitclient-' . ++$n . '.jsonl';
        open(my $fh, '-|', $exe, $t->port, $path, $rate, $secs, $out)
            or die "hitclient: $!";
        local $/;
        my $so = <$fh>;
        close $fh;
        open(my $rf, '<', $out) or die "$out: $!";
        my @r = map { DSG::Test->json_decode($_) } grep { /\S/ } split /\n/, <$rf>;
        return (DSG::Test->json_decode((split /\n/, $so)[-1]), \@r);
    };

    my ($s, $r) = $hc->('/hello', 100, 2);
    is($s->{scheduled}, 200, 'hitclient: 200 scheduled in 2 s at 100 req/s');
    is(scalar(grep { $_->{status} == 200 && $_->{bytes} == 16
                     && ($_->{cache} // '') eq 'HIT' && !defined $_->{err} } @$r),
       200, '... every answer 200, its 16 bytes and X-Cache-Status read');
    my $rate = $s->{achieved_rate} // 0;
    ok(abs($rate - 100) <= 3, sprintf('... launched at 100 +- 3%% req/s (%.2f)', $rate));
    # a local "return 200": milliseconds, seconds only on a starved machine
    ok(!(grep { $_->{lat_ms} <= 0 || $_->{lat_ms} > 5000 } @$r),
       '... each latency measured from its schedule');

    ($s, $r) = $hc->('/busy', 100, 1);
    is(scalar(grep { $_->{status} == 503 } @$r), 100, 'hitclient: 503s recorded as such');
    is($s->{errors}, 100, '... and counted as errors');
    is($s->{completed}, 0, '... none completed as a 200');
    like($t->access_log, qr/GET \/hello/, '... the requests reached nginx');
}

$t->done;
