#!/usr/bin/perl
# A zone whose shared memory is full of busy keys, 2 workers.  Zone tiny
# (32k, the smallest size the directive accepts, key=$http_x_user,
# inflight=1) is filled with keys that cannot be evicted: slow streams of
# distinct users, in flight, hold them.  A request of a new user then finds
# no room for its key in tiny:
#
#   1. it is refused at once with tiny's status (503), not queued and
#      never sent upstream: 150 such requests at 50 req/s on a location
#      guarded by zone llm (key=global, inflight=1, a queue) and tiny;
#   2. the "could not allocate a key in zone" alert is logged at most once
#      per second per zone, by the timestamps of error.log, and the counts
#      of its ", N time(s) since the last alert" add up to the number of
#      requests tiny refused (the access log, and the zone's rejected_503
#      counter), once a last failure a second later has flushed the count;
#   3. a request queued in llm (behind a slot held by another worker),
#      whose key in tiny cannot be allocated when its turn comes, is
#      refused at once when the slot frees, not retried on every tick of
#      the park timer until its queue_timeout (10 s).
#
# Before the fix every failure logged its own alert, and the queued
# request of 3 logged one every 3 ms (about 300 a second) for its whole
# queue_timeout before it was refused.
#
# Nothing depends on which worker accepts a connection: the failures come
# from zone state that all workers share; the holder of llm's slot and the
# waiter of 3 are put on two different workers with DSG::Test::place (the
# reuseport listener, a request sent again until the worker wanted has it,
# checked in /proc), so the waiter's turn comes from a release in another
# worker.  Every wait is a wait_until on the metrics or the logs.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $FILL = 150;     # fill requests: more than tiny holds (about 64)
my $RATE = 50;      # req/s of the requests of new users
my $SECS = 3;       # ... for this long
my $QT = 10;        # queue_timeout of the class, seconds
my $FAST = 2;       # "at once": answered within this many seconds

my $t = DSG::Test->new(workers => 2);

# the one alert this test expects, in the format of the fix (the count)
$t->allow_log(qr/\[alert\]\ .*deepseek_guard:\ could\ not\ allocate\ a\ key\ in
                \ zone\ "tiny",\ \d+\ time\(s\)\ since\ the\ last\ alert/x);

my $mport = $t->mock_start(capacity => 0, first_token_ms => 0,
                           token_ms => 0, tokens => 3);

# /fill/: tiny only, the busy keys.  /hold/: llm only, the holder of
# llm's one slot.  /v1/: llm, then tiny.
(my $conf = <<'EOF') =~ s/%%QT%%/$QT/g;
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'wait=$deepseek_guard_wait_ms status=$status '
                   'zone=$deepseek_guard_zone';

    deepseek_guard_class normal queue=8 queue_timeout=%%QT%%s;
    deepseek_guard_zone llm:1m key=global inflight=1;
    deepseek_guard_zone tiny:32k key=$http_x_user inflight=1;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/dsg.log dsg;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_read_timeout 300s;

        location /fill/ {
            deepseek_guard tiny;
            proxy_pass http://%%MOCK%%/;
        }

        location /hold/ {
            deepseek_guard llm;
            proxy_pass http://%%MOCK%%/;
        }

        location /v1/ {
            deepseek_guard llm;
            deepseek_guard tiny;
            proxy_pass http://%%MOCK%%;
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

# a streamed chat of user $user tagged $tag; %o as tagged_req
sub req {
    my ($tag, $user, %o) = @_;
    my $h = delete $o{h} || {};
    return $t->tagged_req($tag, h => { 'X-User' => $user, %$h },
                          timeout => 60, %o);
}

sub gauge {
    my ($m, $name, $zone) = @_;
    return $m->{"$name\{zone=\"$zone\",class=\"normal\"}"} // 0;
}

# requests refused by zone $zone (its status=503)
sub rejected {
    my ($m, $zone) = @_;
    return $m->{"deepseek_guard_requests_total{zone=\"$zone\",class=\"normal\","
                . "decision=\"rejected_503\"}"} // 0;
}

# the alerts "could not allocate a key": [second, zone, count or undef]
sub nomem_alerts {
    my @a;
    for (split /\n/, $t->error_log) {
        next unless m{^(\d{4}/\d\d/\d\d\ \d\d:\d\d:\d\d)\ \[alert\]\ .*
                      could\ not\ allocate\ a\ key\ in\ zone\ "([^"]+)"
                      (?:,\ (\d+)\ time\(s\)\ since\ the\ last\ alert)?}x;
        push @a, [$1, $2, $3];
    }
    return @a;
}

# the access log lines of requests refused by zone tiny
sub tiny_refusals {
    my $n = 0;
    open(my $fh, '<', $LOG) or return 0;
    while (<$fh>) {
        $n++ if /\bstatus=503\b/ && /\bzone=tiny\b/;
    }
    return $n;
}

# ------------------------------------------------ fill tiny with busy keys

my $t1 = time;

# $FILL slow streams of distinct users at once: those that find room hold
# their key (in flight for 200 s), the others are refused at once
my $fill = $t->bg_parallel([map { req("f$_", "fill-$_",
                                      uri => '/fill/v1/chat/completions',
                                      h => { 'X-Mock-Delay-Ms' => 200000 },
                                      timeout => 250) } 1 .. $FILL],
                           timeout => 250);
my $m;
ok($t->wait_until(sub {
    $m = eval { $t->metrics } or return 0;
    gauge($m, 'deepseek_guard_inflight', 'tiny') + rejected($m, 'tiny')
        == $FILL;
}, 30), "fill: each of the $FILL requests is in flight or refused by tiny")
    or diag explain { map { $_ => $m->{$_} } grep { /zone="tiny"/ }
                      keys %{ $m || {} } };
my $held = gauge($m, 'deepseek_guard_inflight', 'tiny');
note "tiny holds $held busy keys";
cmp_ok($held, '>=', 16, '... tiny holds the keys of the ones in flight');
cmp_ok($held, '<', $FILL, '... and had no room for the others: tiny is full');
# (a refused request may leave its key behind, idle: the next new key
# evicts it)
cmp_ok($m->{'deepseek_guard_zone_keys{zone="tiny"}'}, '>=', $held,
       '... a key per request in flight');
ok($t->wait_until(sub { $t->mock_stats->{inflight} == $held }, 10),
   "... $held streams in flight at the mock");

# ------------------------------------------------ 1. refused at once

my $chats0 = $t->mock_stats->{chat_requests};
my @res = $t->parallel([map { { %{ req("n$_", "new-$_") },
                                at_ms => int(1000 * ($_ - 1) / $RATE) } }
                        1 .. $RATE * $SECS], timeout => 60);
my $n1 = @res;
is(scalar(grep { $_->{status} == 503 } @res), $n1,
   "$n1 requests of new users at $RATE req/s while tiny is full: all 503")
    or diag explain [map { $_->{status} . ' ' . ($_->{error} // '') } @res];
my @slow = grep { $_->{ms} > $FAST * 1000 } @res;
is(scalar @slow, 0,
   "... each answered within $FAST s (the queue_timeout is $QT s): refused "
   . "at once, not queued")
    or diag explain [map { int $_->{ms} } @slow];
my $log = $t->log_by_tag($LOG, map { "n$_" } 1 .. $n1);
is(scalar(grep { ($log->{"n$_"}{zone} // '') eq 'tiny'
                 && ($log->{"n$_"}{st} // '') eq 'REJECTED' } 1 .. $n1), $n1,
   '... refused by zone tiny (the access log)');
is($t->mock_stats->{chat_requests}, $chats0, '... none went upstream');

# ------------------------------------------------ 3. queued, then no key

# llm's one slot is held on worker A, a request of a new user waits for it
# in llm's queue on worker B; its key in tiny is looked up when its turn
# comes, and then there is no room for it
my ($hold, $wa) = $t->place(req('hold', 'holder',
                                uri => '/hold/v1/chat/completions',
                                h => { 'X-Mock-Delay-Ms' => 200000 },
                                timeout => 250),
                            mock_port => $mport, admitted => 1, timeout => 250);
my ($wait, $wb) = $t->place(req('w', 'waiter-new', timeout => 60),
                            mock_port => $mport, admitted => 0,
                            accept => sub { $_[0] != $wa }, timeout => 60);
ok($t->wait_until(sub {
    $m = eval { $t->metrics } or return 0;
    gauge($m, 'deepseek_guard_queue_depth', 'llm') == 1
        && gauge($m, 'deepseek_guard_inflight', 'llm') == 1;
}, 10), "queued: llm's slot held on worker $wa, a request of a new user "
        . "queued in llm on worker $wb")
    or diag explain $m;

my $before = () = nomem_alerts();
my $t0 = time;
kill 'KILL', $hold->{pid};
waitpid($hold->{pid}, 0);
my $w = $t->bg_wait($wait)->[0];
my $took = ($w->{end} // time) - $t0;
note sprintf 'the waiter was answered %.3f s after the holder left', $took;
is($w->{status} // 0, 503,
   "... the holder leaves: the waiter's key in tiny cannot be allocated, "
   . "503")
    or diag explain $w;
cmp_ok($took, '<', $FAST, "... at once (within $FAST s, the queue_timeout "
       . "is $QT s), not retried until its queue_timeout");
$log = $t->log_by_tag($LOG, 'w');
is(join(' ', map { $log->{w}{$_} // '-' } qw(st zone status)),
   'REJECTED tiny 503', '... refused by zone tiny (the access log)');
ok($t->wait_until(sub {
    $m = eval { $t->metrics } or return 0;
    gauge($m, 'deepseek_guard_queue_depth', 'llm') == 0
        && gauge($m, 'deepseek_guard_inflight', 'llm') == 0;
}, 10), '... llm has nothing queued nor in flight left')
    or diag explain $m;
# the waiter would have logged an alert every tick of its worker's park
# timer: a second is 300 of them
sleep 1.2;
my $after = () = nomem_alerts();
cmp_ok($after - $before, '<=', 2,
       '... and the waiter logged at most one alert (at most 2 lines from '
       . 'the release to 1.2 s after its answer)');

# ------------------------------------------------ 2. the alerts

# a last failure, more than a second after the last alert, logs the
# count of every failure since that alert
my $pre = () = nomem_alerts();
my $f = $t->http(%{ req('flush', 'flush-new') });
is($f->{status}, 503, 'a last request of a new user, a second later: 503');
ok($t->wait_until(sub { scalar(() = nomem_alerts()) > $pre }, 10),
   '... and its alert is logged');

my @alerts = nomem_alerts();
my (%per, $sum, @nocount);
for my $a (@alerts) {
    $per{"$a->[0] $a->[1]"}++;
    push @nocount, $a unless defined $a->[2];
    $sum += $a->[2] // 0;
}
my @twice = grep { $per{$_} > 1 } sort keys %per;
note scalar(@alerts) . ' alerts: '
     . join(', ', map { "$_->[0] $_->[1] " . ($_->[2] // '?') } @alerts);
ok(@alerts >= 2, 'the alerts were logged');
is(scalar(@twice), 0, '... at most one per second and zone (error.log '
   . 'timestamps)')
    or diag explain { map { $_ => $per{$_} } @twice };
is(join(' ', sort keys %{{ map { $_->[1] => 1 } @alerts }}), 'tiny',
   '... all of zone tiny');
is(scalar @nocount, 0, '... each says how many failures since the last one')
    or diag scalar(@nocount) . ' without a count, e.g. '
            . join(' ', map { $_ // '-' } @{ $nocount[0] });
$t->log_by_tag($LOG, 'flush');     # its line is written after the answer
my $refused = tiny_refusals();
$m = $t->metrics;
is($refused, rejected($m, 'tiny'),
   "tiny refused $refused requests (the access log and the zone's counter)");
is($sum, $refused, '... and the counts of the alerts add up to them');
cmp_ok(scalar @alerts, '<=', int(time - $t1) + 3,
       '... with at most one alert per second of the test');

# ------------------------------------------------ end

kill 'KILL', $fill->{pid};
waitpid($fill->{pid}, 0);
ok($t->wait_until(sub { $t->mock_stats->{inflight} == 0 }, 20),
   'the fill streams are gone');

$t->done;
