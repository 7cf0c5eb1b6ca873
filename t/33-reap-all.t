#!/usr/bin/perl
# kill -9 of one worker of eight while it holds, at the same time, every
# kind of shared state a worker can leave behind: in-flight leases (N
# slow streams admitted to zone llm, inflight=N), queue places (requests
# parked behind them) and cache fill locks (two misses of a cached,
# coalescing location, their upstream slow, one of them with a waiter in
# another worker).  Everything must come back within 2 s of the kill:
#
#   - the zone's gauges (deepseek_guard_inflight, deepseek_guard_queue_depth)
#     are 0 and deepseek_guard_zone_reaped_total grew by exactly the N
#     leases and the queue places;
#   - the waiter that coalesced behind the dead filler's lock goes upstream
#     and is answered (MISS), and so is a new request for the other dead
#     filler's key sent right after the kill: neither waits for the
#     lock_timeout (60 s here);
#   - then N new requests are admitted at once, none queued, and one more
#     queues: the cap is N again, not less (a leak) nor more.
#
# Why 2 s: every worker runs the zone reaper (leases and queue places of
# pids that kill(pid, 0) says are gone) once a second, so one of the three
# survivors gets to it within about a second of the master collecting the
# dead worker; the cache sweep (fill locks of dead pids) runs once a
# second in every worker too, and 10 ms after a worker starts, so the
# respawned worker usually clears them at once.  2 s is a full period of
# slack on a loaded machine.  The time is measured from the kill to the
# moment the test saw each thing released (the end of the scrape or of
# the response that showed it): an upper bound.
#
# Where things are held does not depend on the kernel: everything held is
# placed on the victim with DSG::Test::place (the reuseport listener, a
# request sent again until the victim's own socket has it, checked in
# /proc), and the waiter on another worker the same way.  After the kill
# the test talks to a second listener without reuseport, which any live
# worker accepts at once (a connection hashed to the dead worker's
# reuseport socket would wait for its replacement).

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use Digest::SHA qw(sha256_hex);
use lib 't/lib';
use DSG::Test;

my $N = 3;          # in-flight cap of zone llm: all of it held by the victim
my $Q = 2;          # queue places the victim holds
my $BOUND = 2;      # seconds from the kill to everything released
my $HOLD = 60000;   # upstream delay of what the victim holds (ms): it dies first

my $W = 8;          # workers: the reaper must cover every one of them
my $t = DSG::Test->new(workers => $W);

# the kill -9 is the point of this test: the master reports it as an alert
$t->allow_log(qr/worker process \d+ exited on signal 9/);
# ... and force-unlocks a zone's mutex if the victim happened to hold it
$t->allow_log(qr/shared memory zone "(?:llm|cache)" was locked by \d+/);

my $mport = $t->mock_start(capacity => 0, first_token_ms => 0,
                           token_ms => 0, tokens => 3);

# /v1/: guarded by zone llm (inflight=N, a queue): the leases and the
#       queue places.
# /c/:  cached, coalescing, not guarded: the fill locks (kept out of zone
#       llm, so that the reaper's count is exactly the leases and places).
(my $conf = <<'EOF') =~ s/%%N%%/$N/g;
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'wait=$deepseek_guard_wait_ms status=$status '
                   'cache=$deepseek_guard_cache_status';

    deepseek_guard_class normal queue=64 queue_timeout=60s;
    deepseek_guard_zone llm:1m key=global inflight=%%N%%;
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=cache:1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        listen 127.0.0.1:%%PORT_1%%;
        access_log %%PREFIX%%/logs/dsg.log dsg;
        add_header X-Pid $pid always;
        deepseek_guard_cache_status_header X-Cache-Status;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_read_timeout 120s;

        location /v1/ {
            deepseek_guard llm;
            proxy_pass http://%%MOCK%%;
        }

        location /c/ {
            deepseek_guard_cache cache;
            deepseek_guard_cache_valid 200 10m;
            deepseek_guard_cache_lock_timeout 60s;
            proxy_pass http://%%MOCK%%/;
        }

        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
        }
    }
EOF
$t->write_config($conf);
$t->start;

# ------------------------------------------------------------ helpers

my $LOG = $t->prefix . '/logs/dsg.log';
my $P1 = $t->port(1);

# a streamed chat tagged $tag on /v1/ (guarded); %o as tagged_req
sub req {
    my ($tag, %o) = @_;
    return $t->tagged_req($tag, timeout => 120, %o);
}

# a streamed chat on /c/ (cached) whose body, hence cache key, is $key's
sub fill_req {
    my ($tag, $key, %o) = @_;
    return $t->tagged_req($tag, uri => '/c/v1/chat/completions',
                          content => "fill $key", timeout => 120, %o);
}

# the mock counts chat requests by sha256 of their body
sub upstream_calls {
    my ($key) = @_;
    my $sha = sha256_hex(fill_req('x', $key)->{body});
    return $t->mock_stats->{bodies}{$sha} // 0;
}

# the metrics of the second listener as { 'name{labels}' => value }, or
# undef when the scrape fails
sub scrape { $t->scrape($P1) }

# zone llm's gauges summed over the classes, and its reaped counter
sub zone_sum { DSG::Test::zone_sum($_[0], $_[1], 'llm') }
sub reaped { DSG::Test::reaped($_[0], 'llm') }

sub xcs { $_[0]{headers}{'x-cache-status'} // '-' }

# one request from a child process of its own, once worker $accept->(pid)
# has it: in flight at the mock ($admitted) or not (queued, waiting)
sub place {
    my ($req, $admitted, $accept) = @_;
    my ($bg) = $t->place($req, mock_port => $mport, admitted => $admitted,
                         accept => $accept, timeout => 120);
    return $bg;
}

# ------------------------------------------------ the victim's load

my @workers = sort { $a <=> $b } $t->worker_pids;
is(scalar @workers, $W, "$W workers");
my $wa = $workers[0];
my $on_a = sub { $_[0] == $wa };
my $off_a = sub { $_[0] != $wa };
my %bg;

# N long streams take every slot of zone llm
$bg{"h$_"} = place(req("h$_", h => { 'X-Mock-Delay-Ms' => $HOLD }), 1, $on_a)
    for 1 .. $N;
# two misses of the cached location: A holds their fill locks
$bg{"f$_"} = place(fill_req("f$_", $_, h => { 'X-Mock-Delay-Ms' => $HOLD }),
                   1, $on_a)
    for 1 .. 2;
# Q requests parked in the queue behind the N
$bg{"q$_"} = place(req("q$_", h => { 'X-Mock-Delay-Ms' => $HOLD }), 0, $on_a)
    for 1 .. $Q;

# from here the mock counts what goes upstream anew
$t->mock_reset;

# a waiter on another worker coalesces behind A's fill lock of key 1: it
# must not go upstream while A fills
$bg{w} = place(fill_req('w', 1, h => { 'X-Mock-Delay-Ms' => 0 },
                        timeout => 30), 0, $off_a);

my $m0;
ok($t->wait_until(sub {
    $m0 = scrape() or return 0;
    zone_sum($m0, 'deepseek_guard_inflight') == $N
        && zone_sum($m0, 'deepseek_guard_queue_depth') == $Q;
}, 10), "before the kill: $N in flight and $Q queued in zone llm")
    or diag explain $m0;

my %c;
ok($t->wait_until(sub {
    %c = $t->worker_conns($mport);
    $c{$wa}[0] == $N + 2 && $c{$wa}[1] == $N + 2 + $Q
        && (grep { $_ != $wa && $c{$_}[1] == 1 } keys %c) == 1
        && !grep { $_ != $wa && $c{$_}[0] } keys %c;
}, 10), "... worker A holds them: $N streams and 2 fills upstream, "
        . "$Q waiters; the coalescing waiter is on another worker")
    or diag explain \%c;
ok($t->wait_until(sub { $t->mock_stats->{inflight} == $N + 2 }, 10),
   '... ' . ($N + 2) . ' in flight at the mock');
# the waiter's request has had time to reach its cache lookup: with the
# mock answering at once, a waiter that did not wait would be done
sleep 0.5;
is(upstream_calls(1) . (-e $bg{w}{file} ? ' answered' : ' waiting'),
   '0 waiting',
   "... the waiter of key 1 waits for A's fill lock: not sent upstream");

# ------------------------------------------------ kill -9

my $reaped0 = reaped($m0);
my $off = length $t->error_log;
kill 'KILL', $wa;
my $t0 = time;

# a new request for the other dead filler's key, at once
my $bgk = $t->bg_parallel([fill_req('k2', 2, h => { 'X-Mock-Delay-Ms' => 0 },
                                    port => $P1, timeout => 30)],
                          timeout => 40);

# poll until every part is seen released (or 10 s, to tell how late)
my (%at, $m);
while (time < $t0 + 10) {
    $m = scrape();
    my $now = time - $t0;
    if ($m) {
        $at{gauges} //= $now
            if zone_sum($m, 'deepseek_guard_inflight') == 0
               && zone_sum($m, 'deepseek_guard_queue_depth') == 0;
        $at{reaped} //= $now if reaped($m) - $reaped0 >= $N + $Q;
    }
    $at{notice} //= $now if substr($t->error_log, $off)
        =~ /zone "llm": released the in-flight slots and queue places of 1 dead worker\(s\)/;
    last if keys %at == 3;
    sleep 0.02;
}

my $w = $t->bg_wait($bg{w})->[0];
my $k = $t->bg_wait($bgk)->[0];
$at{waiter_answered} = $w->{end} - $t0 if $w->{end};
$at{new_request_answered} = $k->{end} - $t0 if $k->{end};
note sprintf 'seen released after the kill: %s',
     join ', ', map { sprintf '%s %.2f s', $_, $at{$_} } sort keys %at;

cmp_ok($at{gauges} // 99, '<', $BOUND,
       "in flight 0 and queue depth 0 in zone llm within $BOUND s of the kill")
    or diag explain [map { $_ => $m->{$_} }
                     grep { /zone="llm"/ } sort keys %{ $m || {} }];
cmp_ok($at{reaped} // 99, '<', $BOUND,
       "... zone_reaped_total counted the dead worker's leases and places "
       . "within $BOUND s");
is(reaped($m) - $reaped0, $N + $Q,
   "... exactly $N in-flight slots and $Q queue places");
cmp_ok($at{notice} // 99, '<', $BOUND, '... and the reaper said so');

is(($w->{status} // 0) . ' ' . xcs($w), '200 MISS',
   "the waiter of the dead filler's key 1 went upstream itself");
cmp_ok($at{waiter_answered} // 99, '<', $BOUND,
       "... and had its answer within $BOUND s of the kill");
is(($k->{status} // 0) . ' ' . xcs($k), '200 MISS',
   "a new request for the dead filler's key 2 went upstream");
cmp_ok($at{new_request_answered} // 99, '<', $BOUND,
       "... and had its answer within $BOUND s of the kill");
is(upstream_calls(1) . ' ' . upstream_calls(2), '1 1',
   '... one upstream request each');
unlike(substr($t->error_log, $off), qr/lock timeout/,
       '... neither waited for the lock timeout');

ok($t->wait_until(sub {
    my @w = $t->worker_pids;
    @w == $W && !grep { $_ == $wa } @w;
}, 10), 'the master respawned the worker');

my %res = map { $_ => $t->bg_wait($bg{$_})->[0] }
          grep { $_ ne 'w' } keys %bg;
is(scalar(grep { !$res{$_}{status} } keys %res), scalar keys %res,
   "the dead worker's clients lost their connection")
    or diag explain { map { $_ => $res{$_}{error} || $res{$_}{status} }
                      keys %res };

# the leak detector (DSG::Test::capacity_is_free, as in t/30, t/32, t/70):
# exactly N slow requests at once are all admitted at once and reach the
# mock together, one more queues
$t->capacity_is_free('after the kill', n => $N, log => $LOG, zone => 'llm',
                     req => sub { req(@_, port => $P1) },
                     timeout => 20, settle => 20, wait => 30);

# the keys of the dead fills were filled by the requests after the kill
is(join(' ', map { xcs($t->http(%{ fill_req("again$_", $_, port => $P1,
                                            timeout => 10) })) } 1 .. 2),
   'HIT HIT', 'the dead fills\' keys were stored by the requests after it');

$t->done;
