#!/usr/bin/perl
# An in-flight lease is released by the record of what it charged, not by
# the configuration of the worker that releases it.  A lease taken under
# one configuration may be released under another: when its worker is
# killed with SIGKILL after a reload, the reaper of a new worker frees it
# with the new configuration loaded.  Before the fix that release went by
# the new configuration's view of the lease's class: a class the reload
# removed released nothing, a class whose tier the reload changed released
# the tiers of its new tier, a zone whose inflight= the reload dropped
# released nothing.  The capacity was lost for good while the in-flight
# gauges said 0.
#
# Each part runs in an nginx of its own (2 workers, zone llm with
# key=global, so every request is on one key): the victim, one worker,
# holds slow streams (60 s upstream) in flight; nginx reloads with the
# changed configuration, and the victim, which still has requests in
# flight, keeps running as an old worker while the other old worker exits
# and two new workers start; then the victim is killed with SIGKILL.  Once
# the reaper of a new worker has said so in error.log, the gauges of the
# zone are 0 and zone_reaped_total grew by exactly the victim's leases;
# then the leak detector (DSG::Test::capacity_is_free, as in t/30, t/32,
# t/33): exactly N slow requests at once are all admitted without queueing
# and reach the mock together, one more queues.
#
#   (a) classes removed: a, b, c, inflight=2, one class c request held (c
#       is the lowest class, where unclassified requests go); the reload
#       leaves classes a and b.  Then 2 at once.  (Before the fix: class
#       index 2 >= 2 classes, nothing released, 1 at once.)
#   (b) reserves changed: critical reserve=20%, normal; inflight=10; three
#       normal requests held, each charged in 2 tiers (100% and 80%).  The
#       reload drops the reserve (one tier).  Then 10 at once.  A config
#       with one tier cannot see a leak in the second one, so nginx reloads
#       once more, back to the reserve: normal may again use 8 slots, all
#       8 at once.  (Before the fix: only tier 0 was released, 3 slots of
#       tier 1 stayed taken, 5 at once.)
#   (c) inflight= changed: inflight=2, both slots held; the reload raises
#       it to 3.  Then 3 at once and a 4th queues.  Then, the same again
#       with the cap dropped instead: 2 of inflight=3 held, the reload
#       leaves the zone with a rate only (no in-flight cap), the victim is
#       killed, and a third reload brings inflight=3 back: 3 at once.
#       (Before the fix the first half passed, the release found the cap
#       it expected; in the second it found none, released nothing and
#       left 1 at once.)
#
# Placement does not depend on the kernel: the held requests are placed
# on the victim with DSG::Test::place (the reuseport listener, a request
# sent again until the victim's own socket has it, checked in /proc).
# After the kill the test talks to a second listener without reuseport,
# which any live worker accepts at once.  Every wait is a wait_until on
# what it waits for (error.log, /proc, the gauges), with generous bounds.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $HOLD = 60000;       # upstream delay of the victim's requests (ms): it dies first
my $REAP_NOTICE = qr/zone "llm": released the in-flight slots and queue places of 1 dead worker\(s\)/;

# ------------------------------------------------------------ helpers

# a new nginx (not started yet) and its mock
sub instance {
    my $t = DSG::Test->new(workers => 2);
    # the kill -9 is the point of this test: the master reports it as an alert
    $t->allow_log(qr/worker process \d+ exited on signal 9/);
    # ... and force-unlocks the zone's mutex if the victim happened to hold it
    $t->allow_log(qr/shared memory zone "llm" was locked by \d+/);
    $t->mock_start(capacity => 0, first_token_ms => 0, token_ms => 0,
                   tokens => 3);
    return $t;
}

# the configuration: $classes (deepseek_guard_class lines) and the
# parameters of zone llm after its key
sub config {
    my ($t, $classes, $zone) = @_;
    $t->write_config(<<"EOF");
    log_format dsg 'tag=\$http_x_tag pid=\$pid st=\$deepseek_guard_status '
                   'cls=\$deepseek_guard_class wait=\$deepseek_guard_wait_ms '
                   'status=\$status';

    $classes
    deepseek_guard_zone llm:1m key=global $zone;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        listen 127.0.0.1:%%PORT_1%%;
        access_log %%PREFIX%%/logs/dsg.log dsg;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_read_timeout 120s;

        location /v1/ {
            deepseek_guard llm;
            proxy_pass http://%%MOCK%%;
        }

        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
        }
    }
EOF
}

# the metrics of the second listener as { 'name{labels}' => value }, or
# undef when the scrape fails
sub scrape { $_[0]->scrape($_[0]->port(1)) }

# zone llm's gauges summed over the classes, and its reaped counter
sub zone_sum { DSG::Test::zone_sum($_[0], $_[1], 'llm') }
sub reaped { DSG::Test::reaped($_[0], 'llm') }

# A reload that keeps the victim: SIGHUP, then wait until two new workers
# run and, of the old ones, only the victim is left (it has requests in
# flight; the other old worker had none and exits).  The other old worker
# must be gone before the kill: it would reap with the old configuration.
sub reload_keeping {
    my ($t, $victim, $label) = @_;
    my %old = map { $_ => 1 } $t->worker_pids;
    kill 'HUP', $t->master_pid;
    my @w;
    ok($t->wait_until(sub {
        @w = $t->worker_pids;
        my @new = grep { !$old{$_} } @w;
        my @left = grep { $old{$_} } @w;
        return @new == 2 && "@left" eq "$victim";
    }, 20), "$label: reload: 2 new workers, the victim is the one old worker "
            . 'left (its streams are in flight)')
        or diag explain { old => [sort keys %old], now => \@w,
                          log => DSG::Test::_tail($t->error_log, 10) };
}

# Places $n slow streams on the victim (the lowest pid), checks that zone
# llm counts them in class $cls, writes the configuration $next, reloads
# keeping the victim, kills it and waits until the reaper of a new worker
# has released its leases: the notice, gauges 0, zone_reaped_total + $n.
sub hold_reload_kill {
    my ($t, $label, %o) = @_;
    my ($n, $cls) = @o{qw(n cls)};
    my $mport = $t->mock_port;
    my ($victim) = sort { $a <=> $b } $t->worker_pids;

    my @bg;
    for my $i (1 .. $n) {
        my ($bg) = $t->place(
            $t->tagged_req("$label-h$i", h => { 'X-Mock-Delay-Ms' => $HOLD },
                           timeout => 120),
            mock_port => $mport, accept => sub { $_[0] == $victim },
            admitted => 1, timeout => 120);
        push @bg, $bg;
    }

    my ($m, %c);
    ok($t->wait_until(sub {
        %c = $t->worker_conns($mport);
        $m = scrape($t) or return 0;
        return $c{$victim}[0] == $n && $c{$victim}[1] == $n
            && ($m->{"deepseek_guard_inflight{zone=\"llm\",class=\"$cls\"}"}
                // -1) == $n
            && zone_sum($m, 'deepseek_guard_inflight') == $n;
    }, 10), "$label: the victim holds $n stream(s) in flight, class $cls")
        or diag explain [\%c, map { $_ => $m->{$_} }
                               grep { /inflight\{zone="llm"/ } keys %$m];
    my $reaped0 = reaped($m);

    $o{config}->();
    reload_keeping($t, $victim, $label);

    my $off = length $t->error_log;
    kill 'KILL', $victim;
    my $t0 = time;

    ok($t->wait_until(sub {
        my @w = $t->worker_pids;
        @w == 2 && !grep { $_ == $victim } @w;
    }, 10), "$label: kill -9 of the victim, the master respawned it");

    # the reaper runs once a second in every worker: 10 s is slack
    my $seen = $t->wait_until(sub { substr($t->error_log, $off) =~ $REAP_NOTICE },
                              10);
    ok($seen, "$label: the reaper of a new worker released the dead "
              . "worker's slots");
    note sprintf '%s: reaper notice %.2f s after the kill', $label, time - $t0;

    ok($t->wait_until(sub {
        $m = scrape($t) or return 0;
        zone_sum($m, 'deepseek_guard_inflight') == 0
            && zone_sum($m, 'deepseek_guard_queue_depth') == 0;
    }, 10), "$label: the gauges say 0 in flight, 0 queued")
        or diag explain [map { $_ => $m->{$_} }
                         grep { /zone="llm"/ } sort keys %{ $m || {} }];
    is(reaped($m) - $reaped0, $n,
       "$label: zone_reaped_total counted the $n lease(s)");

    my @res = map { $t->bg_wait($_)->[0] } @bg;
    is(scalar(grep { !$_->{status} } @res), $n,
       "$label: the victim's clients lost their connection")
        or diag explain \@res;
}

# the leak detector: $n at once, none queued, one more queues
sub cap_is {
    my ($t, $label, $n) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $t->capacity_is_free($label, n => $n, log => $t->prefix . '/logs/dsg.log',
                         zone => 'llm',
                         req => sub { $t->tagged_req(@_, port => $t->port(1)) },
                         timeout => 20, settle => 20, wait => 30);
}

my $Q = 'queue=64 queue_timeout=30s';

# ------------------------------------------------ (a) classes removed

{
    my $t = instance();
    config($t, "deepseek_guard_class a $Q;\n"
             . "    deepseek_guard_class b $Q;\n"
             . "    deepseek_guard_class c $Q;", 'inflight=2');
    $t->start;

    hold_reload_kill($t, 'a', n => 1, cls => 'c', config => sub {
        config($t, "deepseek_guard_class a $Q;\n"
                 . "    deepseek_guard_class b $Q;", 'inflight=2');
    });
    cap_is($t, 'a: class c removed, its lease reaped', 2);
    $t->check_log;
}

# ------------------------------------------------ (b) reserves changed

{
    my $t = instance();
    my $reserve = "deepseek_guard_class critical reserve=20% $Q;\n"
                . "    deepseek_guard_class normal $Q;";
    config($t, $reserve, 'inflight=10');
    $t->start;

    hold_reload_kill($t, 'b', n => 3, cls => 'normal', config => sub {
        config($t, "deepseek_guard_class critical $Q;\n"
                 . "    deepseek_guard_class normal $Q;", 'inflight=10');
    });
    cap_is($t, 'b: reserve dropped, 2-tier leases reaped', 10);

    # the reserve back: tier 1 (80%) is seen again, it must be empty
    config($t, $reserve, 'inflight=10');
    ok($t->reload, 'b: reload with the reserve back');
    cap_is($t, 'b: reserve back, normal has its 8 slots', 8);
    $t->check_log;
}

# ------------------------------------------------ (c) inflight= changed

{
    my $t = instance();
    my $normal = "deepseek_guard_class normal $Q;";
    my $rate = 'rate=1000r/s burst=1000';
    config($t, $normal, "$rate inflight=2");
    $t->start;

    hold_reload_kill($t, 'c1', n => 2, cls => 'normal', config => sub {
        config($t, $normal, "$rate inflight=3");
    });
    cap_is($t, 'c1: inflight=2 raised to 3, its leases reaped', 3);

    hold_reload_kill($t, 'c2', n => 2, cls => 'normal', config => sub {
        config($t, $normal, $rate);
    });
    config($t, $normal, "$rate inflight=3");
    ok($t->reload, 'c2: reload with inflight=3 back');
    cap_is($t, 'c2: inflight=3 dropped and back, its leases reaped', 3);
    $t->check_log;
}

done_testing;
