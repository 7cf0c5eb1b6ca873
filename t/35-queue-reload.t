#!/usr/bin/perl
# The admission queue of a zone across reloads that change the queue sizes
# (the sum of the classes' queue=), 2 workers.  Zone llm has one global
# key and inflight=1; classes hi and lo queue.  Each zone has one pool of
# queue places in shared memory for every generation of workers, and the
# waiters of a key are in one order, whichever generation queued them:
#
#   A. one order across a reload: waiters of both classes queued by the
#      old workers, the queue sizes changed by a reload, more waiters of
#      both classes queued by the new workers; then the slot is freed and
#      each waiter runs alone (inflight=1) for 200 ms: the admissions are
#      every hi waiter, then every lo waiter, first in first out within a
#      class, old and new generation interleaved by arrival (the access
#      log's $msec, one request at a time: the mock never has 2 in
#      flight);
#   B. the reaper frees an old worker's places: an old worker that still
#      has 3 waiters (the slot is held by a waiter of the new generation
#      admitted before them, class hi) is killed with SIGKILL; within 2 s
#      the queue depth gauge is the 2 waiters of the new workers still
#      alive, deepseek_guard_zone_reaped_total grew by 3, and the 2 are
#      then admitted in their order; after it the cap is 1 again, no
#      place and no slot leaked (DSG::Test::capacity_is_free);
#   C. memory stays flat: 20 reloads going back and forth between 64 and
#      4096 places (no waiters) leave zone mem (400k, 100 pages, where
#      4096 places take more than half) with as many keys as before them:
#      the number of keys it holds when filled with new users (the
#      deepseek_guard_zone_keys gauge once it evicts).  There is no gauge
#      of a zone's memory; a zone that lost 4096 places' worth to a
#      reload would already refuse the next one ("is too small for its
#      4096 queue places"), and one that lost less holds fewer keys (a
#      slab page is 32 of them).
#
# Before the fix a reload that changed the total allocated a new array of
# places and left the old one allocated: the old and new workers had two
# orders that raced for the slot (A), the new workers never reaped the old
# workers' places (B), and every reload took more of the zone (C).
#
# Placement does not depend on the kernel: every request is put on the
# worker the plan says with DSG::Test::place (the reuseport listener, sent
# again until that worker has it, checked in /proc), and the next one is
# sent only once the zone's queue depth gauge shows it queued, so the
# arrival order is the plan's.  The slot is freed by killing the holder's
# client (nginx ends the request at once), not by a timer.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $WAIT_MS = 200;      # upstream time of each waiter once admitted
my $HOLD_MS = 200000;   # upstream time of a holder: its client ends it
my $BOUND = 2;          # seconds from the kill to the places released
my $MEM = '400k';       # zone mem: room for 4096 places once, not twice
my ($SMALL, $BIG) = (32, 2048);     # queue= of each class in part C

my $t = DSG::Test->new(workers => 2);

# the kill -9 of part B: the master reports it as an alert
$t->allow_log(qr/worker process \d+ exited on signal 9/);
# ... and force-unlocks a zone's mutex if the victim happened to hold it
$t->allow_log(qr/shared memory zone "(?:llm|mem)" was locked by \d+/);

my $mport = $t->mock_start(capacity => 0, first_token_ms => 0,
                           token_ms => 0, tokens => 3);

# the configuration with queue=$hi and queue=$lo
sub conf {
    my %v = (HI => $_[0], LO => $_[1], MEM => $MEM);
    (my $c = <<'EOF') =~ s/%%(HI|LO|MEM)%%/$v{$1}/g;
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'cls=$deepseek_guard_class wait=$deepseek_guard_wait_ms '
                   'status=$status zone=$deepseek_guard_zone msec=$msec';

    deepseek_guard_class hi queue=%%HI%% queue_timeout=120s;
    deepseek_guard_class lo queue=%%LO%% queue_timeout=120s;
    deepseek_guard_zone llm:1m key=global inflight=1;
    deepseek_guard_zone mem:%%MEM%% key=$http_x_user inflight=100;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        listen 127.0.0.1:%%PORT_1%%;
        access_log %%PREFIX%%/logs/dsg.log dsg;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_read_timeout 300s;
        deepseek_guard_classify $http_x_class default=lo;

        location /v1/ {
            deepseek_guard llm;
            proxy_pass http://%%MOCK%%;
        }

        # a key per user, answered by nginx itself
        location /m/ {
            access_log off;
            deepseek_guard mem;
            empty_gif;
        }

        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
        }
    }
EOF
    return $c;
}

$t->write_config(conf(4, 4));
$t->start;

# ------------------------------------------------------------ helpers

my $LOG = $t->prefix . '/logs/dsg.log';
my $P1 = $t->port(1);

# a streamed chat of class $cls tagged $tag, $ms upstream
sub req {
    my ($tag, $cls, $ms, %o) = @_;
    return $t->tagged_req($tag, h => { 'X-Class' => $cls,
                                       'X-Mock-Delay-Ms' => $ms },
                          timeout => 120, %o);
}

# the metrics of the second listener (no reuseport: any worker answers),
# or undef when the scrape fails
sub scrape { $t->scrape($P1) }

sub cm {
    my ($m, $name, $zone, $cls) = @_;
    return $m->{"$name\{zone=\"$zone\",class=\"$cls\"}"} // 0;
}
sub depth { cm($_[0], 'deepseek_guard_queue_depth', 'llm', $_[1]) }
sub inflight {
    cm($_[0], 'deepseek_guard_inflight', 'llm', 'hi')
        + cm($_[0], 'deepseek_guard_inflight', 'llm', 'lo');
}
sub reaped { DSG::Test::reaped($_[0], 'llm') }

# zone llm's gauges and reaped counter, for a diagnostic
sub gauges {
    my ($m) = @_;
    return { map { $_ => $m->{$_} }
             grep { /^deepseek_guard_(?:inflight|queue_depth|zone_reaped_total)
                     \{zone="llm"/x } keys %{ $m || {} } };
}

# waits until the queue depth of each class is as %want says
sub depth_is {
    my (%want) = @_;
    my $m;
    my $ok = $t->wait_until(sub {
        $m = scrape() or return 0;
        return !grep { depth($m, $_) != $want{$_} } keys %want;
    }, 10);
    diag explain { map { $_ => depth($m || {}, $_) } keys %want } unless $ok;
    return $ok;
}

# Puts request $tag of class $cls on worker $pid, queued behind the slot
# held: sent (again, until $pid has it), then waited for in the depth
# gauge, so that the next one arrives after it.  $depth: the class's depth
# expected, this one included.
my %bg;
sub queue_on {
    my ($tag, $cls, $pid, $depth, $ms) = @_;
    ($bg{$tag}) = $t->place(req($tag, $cls, $ms // $WAIT_MS),
                            mock_port => $mport, admitted => 0,
                            accept => sub { $_[0] == $pid }, timeout => 120);
    return depth_is($cls => $depth)
        || diag "$tag ($cls) on $pid: not queued";
}

# the slot's holder: admitted on worker $pid, in flight until its client
# is killed
sub hold_on {
    my ($tag, $pid) = @_;
    ($bg{$tag}) = $t->place(req($tag, 'lo', $HOLD_MS), mock_port => $mport,
                            admitted => 1, accept => sub { $_[0] == $pid },
                            timeout => 250);
}

sub kill_client {
    my ($tag) = @_;
    kill 'KILL', $bg{$tag}{pid};
    return $t->bg_wait($bg{$tag});
}

sub result { $t->bg_wait($bg{ $_[0] })->[0] || {} }

# A reload while old workers still have requests: they stay until those
# end.  Returns the new workers' pids (none if the reload failed).
sub reload_keep {
    my ($conf) = @_;
    my %old = map { $_ => 1 } $t->worker_pids;
    my $off = length $t->error_log;
    $t->write_config($conf);
    kill 'HUP', $t->master_pid;
    my @new;
    my $r = $t->wait_until(sub {
        return 'emerg' if substr($t->error_log, $off) =~ /\[emerg\]/;
        @new = grep { !$old{$_} } $t->worker_pids;
        return @new == 2 ? 'ok' : 0;
    }, 20) // 'timeout';
    diag "reload: $r\n" . substr($t->error_log, $off) if $r ne 'ok';
    return $r eq 'ok' ? sort { $a <=> $b } @new : ();
}

sub alive { DSG::Test::_alive($_[0]) }

# ------------------------------------------------ A. one order across a reload

my ($wa, $wb) = sort { $a <=> $b } $t->worker_pids;
my ($wc, $wd);
{
    hold_on('h1', $wa);
    ok(queue_on('o1', 'lo', $wa, 1) && queue_on('o2', 'hi', $wb, 1)
       && queue_on('o3', 'lo', $wb, 2) && queue_on('o4', 'hi', $wa, 2),
       'A: the slot held on worker A; queued on the old workers: '
       . 'o1 lo (A), o2 hi (B), o3 lo (B), o4 hi (A)');

    ($wc, $wd) = reload_keep(conf(8, 8));
    ok($wc && $wd, '... reload: queue=4+4 -> 8+8 places, new workers C, D');
    ok(alive($wa) && alive($wb),
       '... the old workers stay for their requests');

    ok(queue_on('n1', 'lo', $wc, 3) && queue_on('n2', 'hi', $wd, 3)
       && queue_on('n3', 'hi', $wc, 4) && queue_on('n4', 'lo', $wd, 4),
       '... queued on the new workers: n1 lo (C), n2 hi (D), n3 hi (C), '
       . 'n4 lo (D)');
    my $m = scrape();
    is(inflight($m), 1, '... the holder in flight, nobody else');

    $t->mock_reset;
    kill_client('h1');

    my @tags = qw(o1 o2 o3 o4 n1 n2 n3 n4);
    my %res = map { $_ => result($_) } @tags;
    is(scalar(grep { ($res{$_}{status} // 0) == 200
                     && ($res{$_}{body} // '') =~ /\[DONE\]/ } @tags),
       scalar @tags, 'A: the holder leaves: every waiter is served')
        or diag explain { map { $_ => $res{$_}{error} || $res{$_}{status} }
                          @tags };
    my $log = $t->log_by_tag($LOG, @tags);
    my @order = sort { ($log->{$a}{msec} // 9e9) <=> ($log->{$b}{msec} // 9e9) }
                @tags;
    is("@order", 'o2 o4 n2 n3 o1 o3 n1 n4',
       '... in one order: hi before lo, first in first out, old and new '
       . 'workers\' waiters together')
        or diag explain { map { $_ => $log->{$_}{msec} } @tags };
    is(join(' ', map { $log->{$_}{st} // '-' } @tags),
       join(' ', ('QUEUED') x @tags), '... each after waiting');
    is_deeply({ map { $_ => $log->{$_}{pid} // '-' } @tags },
              { o1 => $wa, o2 => $wb, o3 => $wb, o4 => $wa,
                n1 => $wc, n2 => $wd, n3 => $wc, n4 => $wd },
              '... each admitted by the worker that queued it');
    is($t->mock_stats->{max_inflight}, 1,
       '... one at a time: the cap held across both generations');
    ok($t->wait_until(sub { !alive($wa) && !alive($wb) }, 20),
       '... and the old workers are gone');
}

# ------------------------------------------------ B. kill -9 of an old worker

{
    # the slot held on D, 3 lo waiters on C; after the reload C and D are
    # old workers, and a hi waiter of the new workers (E) is the head: it
    # takes the slot when D's holder leaves, D has nothing left and exits,
    # C still has its 3 waiters, queued ahead of 2 lo waiters of E and F
    hold_on('h2', $wd);
    ok(queue_on('k1', 'lo', $wc, 1) && queue_on('k2', 'lo', $wc, 2)
       && queue_on('k3', 'lo', $wc, 3),
       'B: the slot held on worker D, 3 lo waiters on worker C');

    my ($we, $wf) = reload_keep(conf(16, 16));
    ok($we && $wf, '... reload: 8+8 -> 16+16 places, new workers E, F');

    ok(queue_on('nh', 'hi', $we, 1, $HOLD_MS) && queue_on('q1', 'lo', $we, 4)
       && queue_on('q2', 'lo', $wf, 5),
       '... queued on the new workers: nh hi (E), q1 lo (E), q2 lo (F)');

    kill_client('h2');
    my $m;
    ok($t->wait_until(sub {
        $m = scrape() or return 0;
        my %c = $t->worker_conns($mport);
        return depth($m, 'hi') == 0 && depth($m, 'lo') == 5
            && inflight($m) == 1 && ($c{$we}[0] // 0) == 1;
    }, 10), "... the holder leaves: nh (the head, class hi) takes the slot, "
            . "5 lo waiters left")
        or diag explain gauges($m);
    ok($t->wait_until(sub { !alive($wd) }, 10),
       '... old worker D, done, exits; old worker C stays for its waiters');

    my $reaped0 = reaped($m);
    my $off = length $t->error_log;
    kill 'KILL', $wc;
    my $t0 = time;

    my (%at, $m2);
    while (time < $t0 + 10) {
        $m2 = scrape();
        my $now = time - $t0;
        if ($m2) {
            $at{depth} //= $now if depth($m2, 'lo') == 2;
            $at{reaped} //= $now if reaped($m2) - $reaped0 >= 3;
        }
        $at{notice} //= $now if substr($t->error_log, $off)
            =~ /zone "llm": released the in-flight slots and queue places of 1 dead worker\(s\)/;
        last if keys %at == 3;
        sleep 0.02;
    }
    note sprintf 'seen released after the kill: %s',
         join ', ', map { sprintf '%s %.2f s', $_, $at{$_} } sort keys %at;
    cmp_ok($at{depth} // 99, '<', $BOUND,
           "B: kill -9 of C: within $BOUND s the lo queue depth is 2, the "
           . "waiters of E and F")
        or diag explain gauges($m2);
    cmp_ok($at{reaped} // 99, '<', $BOUND,
           "... zone_reaped_total counted C's places within $BOUND s");
    is(reaped($m2) - $reaped0, 3, '... exactly its 3 places');
    cmp_ok($at{notice} // 99, '<', $BOUND, '... and the reaper said so');
    is(inflight($m2), 1, '... nh still holds the slot');
    is(join(' ', sort { $a <=> $b } $t->worker_pids),
       join(' ', sort { $a <=> $b } $we, $wf),
       '... an old worker is not respawned');

    $t->mock_reset;
    kill_client('nh');
    my %res = map { $_ => result($_) } qw(k1 k2 k3 q1 q2);
    is(join(' ', map { $res{$_}{status} // 0 } qw(q1 q2)), '200 200',
       '... nh leaves: the waiters of E and F are served')
        or diag explain { map { $_ => $res{$_}{error} } qw(q1 q2) };
    my $log = $t->log_by_tag($LOG, qw(q1 q2));
    ok(($log->{q1}{msec} // 9e9) < ($log->{q2}{msec} // 0)
       && ($log->{q1}{st} // '') eq 'QUEUED'
       && ($log->{q2}{st} // '') eq 'QUEUED',
       '... q1, then q2, after waiting')
        or diag explain $log;
    is(join(' ', map { $res{$_}{status} // 0 } qw(k1 k2 k3)), '0 0 0',
       "... C's clients lost their connection");
    is($t->mock_stats->{max_inflight}, 1, '... one at a time');

    # the leak detector: 1 slow request is admitted at once, one more
    # queues behind it
    $t->capacity_is_free('B: after the kill', n => 1, log => $LOG,
                         zone => 'llm', timeout => 30, settle => 20,
                         wait => 30);
}

# ------------------------------------------------ C. memory stays flat

# the keys zone mem holds: new users, one at a time, until it evicts
my $user = 0;
sub mem_capacity {
    my ($label) = @_;
    my ($m, $sent) = (scrape(), 0);
    my $ev0 = $m->{'deepseek_guard_zone_evictions_total{zone="mem"}'} // 0;
    while ($sent < 6000) {
        my @r = $t->parallel([map { +{ uri => '/m/x', port => $P1,
                                       headers => { 'X-User' => 'u' . ++$user } } }
                              1 .. 500], concurrency => 1, timeout => 60);
        $sent += @r;
        my $bad = grep { $_->{status} != 200 } @r;
        if ($bad) {
            diag "$label: $bad of 500 requests to /m/ failed";
            return undef;
        }
        $m = scrape() or return undef;
        last if ($m->{'deepseek_guard_zone_evictions_total{zone="mem"}'} // 0)
                > $ev0 + 100;
    }
    # A request's lease (a chunk of a key's size) is freed when it ends,
    # which may be a moment after its client has the answer: a request
    # sent meanwhile to the other worker found one chunk fewer and evicted
    # one key more.  A few more requests, each sent once nothing is in
    # flight, each take back the room of such a key.
    for (1 .. 4) {
        $t->wait_until(sub {
            $m = scrape() or return 0;
            return cm($m, 'deepseek_guard_inflight', 'mem', 'hi')
                 + cm($m, 'deepseek_guard_inflight', 'mem', 'lo') == 0;
        }, 10) or return undef;
        my $r = $t->http(uri => '/m/x', port => $P1,
                         headers => { 'X-User' => 'u' . ++$user });
        return undef unless $r->{status} == 200;
        $sent++;
    }
    $t->wait_until(sub {
        $m = scrape() or return 0;
        return cm($m, 'deepseek_guard_inflight', 'mem', 'hi')
             + cm($m, 'deepseek_guard_inflight', 'mem', 'lo') == 0;
    }, 10) or return undef;
    note "$label: $sent new users, "
         . $m->{'deepseek_guard_zone_keys{zone="mem"}'} . ' keys';
    return $m->{'deepseek_guard_zone_keys{zone="mem"}'};
}

sub capacity_gauges {
    my $m = scrape() or return '-';
    return join '+', map { cm($m, 'deepseek_guard_queue_capacity', 'mem', $_) }
                     qw(hi lo);
}

{
    $t->write_config(conf($BIG, $BIG));
    ok($t->reload, "C: reload to ${BIG}+$BIG places");
    is(capacity_gauges(), "$BIG+$BIG", '... in force');
    my $c0 = mem_capacity('before');
    ok($c0, "... zone mem ($MEM) then holds $c0 keys");

    my ($ok, $in_force) = (0, 0);
    for my $i (1 .. 20) {
        my $q = $i % 2 ? $SMALL : $BIG;
        $t->write_config(conf($q, $q));
        if (!$t->reload) {
            diag "reload $i to $q+$q places failed:\n"
                 . join("\n", grep { /\[emerg\]/ } split /\n/, $t->error_log);
            last;
        }
        $ok++;
        $in_force++ if capacity_gauges() eq "$q+$q";
    }
    is($ok, 20, "... 20 reloads between $SMALL+$SMALL and $BIG+$BIG places "
       . 'succeed');
    is($in_force, 20, '... each in force');
    my $c1 = mem_capacity('after');
    is($c1, $c0, "... and zone mem holds as many keys as before them")
        if $ok == 20;

    # the queue still works after them
    hold_on('h3', ($t->worker_pids)[0]);
    ok(queue_on('c1', 'lo', ($t->worker_pids)[1], 1),
       '... a request queues behind a holder');
    kill_client('h3');
    my $r = result('c1');
    is($r->{status} // 0, 200, '... and is served when it leaves');
}

$t->done;
