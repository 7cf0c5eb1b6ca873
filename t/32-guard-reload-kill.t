#!/usr/bin/perl
# The admission controller's shared state across a reload and across a
# worker killed with SIGKILL, 2 workers: a reload keeps the token buckets
# (1r/m: still 429 after it) and the queue and in-flight accounting (the
# old workers finish their in-flight and queued requests, the cap holds
# across both generations, nothing leaks); a kill -9 under load (streams
# in flight, requests queued) leaves no deadlock: the worker is respawned,
# new requests are served and, once the reaper has run, the dead worker's
# slots and queue places are free again.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $N = 4;      # in-flight cap of zone llm

my $t = DSG::Test->new(workers => 2);

# a kill -9 is the point of this test: the master reports it as an alert
$t->allow_log(qr/worker process \d+ exited on signal 9/);
# ... and force-unlocks the zone's mutex if the victim happened to hold it
$t->allow_log(qr/shared memory zone "llm" was locked by \d+/);

my $mport = $t->mock_start(capacity => 0, first_token_ms => 100,
                           token_ms => 0, tokens => 3);

$t->write_config(<<'EOF');
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'cls=$deepseek_guard_class wait=$deepseek_guard_wait_ms '
                   'status=$status zone=$deepseek_guard_zone';

    deepseek_guard_class normal queue=64 queue_timeout=30s;
    deepseek_guard_zone llm:1m key=global inflight=4;
    deepseek_guard_zone quota:1m key=$http_x_user rate=1r/m status=429;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/dsg.log dsg;

        location /v1/ {
            deepseek_guard llm;
            proxy_pass http://%%MOCK%%;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_read_timeout 20s;
        }

        # one request per minute and user
        location /q/ {
            deepseek_guard quota;
            proxy_pass http://%%MOCK%%/;
            proxy_http_version 1.1;
        }

        location = /ping {
            return 200 "pong\n";
        }

        # the leak detector waits for the zone's gauges to be 0
        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
        }
    }
EOF
$t->start;

# ------------------------------------------------------------ helpers

my $LOG = $t->prefix . '/logs/dsg.log';

sub req {
    my ($tag, %o) = @_;
    return $t->tagged_req($tag, timeout => 40, %o);
}

# Places the holders (long streams, in flight) and then the waiters
# (queued behind them) on the workers that $plan picks, and returns the
# background clients by tag and the plan's roles.  Each request is sent
# from a child process of its own (DSG::Test::place) and sent again until
# a worker the plan accepts has it; that waiters stayed queued, the
# callers check on the counts.  The holders must still have 2 s to go
# once everything is in place: on a slow machine the placement may take
# long, then every client is dropped and it starts over.  $plan->()
# returns ([holder tags], [waiter tags], accept(tag, pid), roles): accept
# says whether a worker may take that request and records it.
sub setup {
    my ($plan, $hold_ms, $wait_ms) = @_;
    for my $attempt (1 .. 3) {
        my ($htags, $qtags, $accept, $roles) = $plan->();
        my (%bg, $first);
        for my $tag (@$htags) {
            ($bg{$tag}) = $t->place(
                req($tag, h => { 'X-Mock-Delay-Ms' => $hold_ms }),
                mock_port => $mport, accept => sub { $accept->($tag, $_[0]) },
                admitted => 1, timeout => 40);
            $bg{$tag}{h} = 1;
            $first //= time;
        }
        for my $tag (@$qtags) {
            ($bg{$tag}) = $t->place(
                req($tag, h => { 'X-Mock-Delay-Ms' => $wait_ms }),
                mock_port => $mport, accept => sub { $accept->($tag, $_[0]) },
                admitted => 0, timeout => 40);
        }
        my $left = $hold_ms / 1000 - (time - $first);
        if ($left >= 2) {
            # the mock's max_inflight counts from here: the clients dropped
            # while placing may have been counted a moment too long (a
            # slot freed by a dropped client is taken by the next request
            # before the mock has seen the old connection close)
            $t->mock_reset;
            return (\%bg, $roles);
        }

        diag sprintf "setup attempt %d: placing took too long (%.1f s "
                     . "left), again", $attempt, $left;
        # waiters first: a waiter must not take a slot a holder frees
        for my $tag ((grep { !$bg{$_}{h} } keys %bg),
                     (grep { $bg{$_}{h} } keys %bg))
        {
            kill 'KILL', $bg{$tag}{pid};
            waitpid($bg{$tag}{pid}, 0);
        }
        $t->wait_until(sub {
            my %c = $t->worker_conns($mport);
            return !grep { $_->[0] || $_->[1] } values %c;
        }, 20, 0.01);
        $t->wait_until(sub { $t->mock_stats->{inflight} == 0 }, 20);
    }
    die "setup: could not place the requests in time";
}

# the leak detector (DSG::Test::capacity_is_free, as in t/30): exactly N
# slow requests at once are all admitted without queueing and reach the
# mock together, one more queues; with capacity lost, every later step
# would only wait for timeouts: stop there
sub capacity_is_free_or_stop {
    my ($label) = @_;
    # short client timeouts: with a slot leaked, the requests would wait
    # for the queue timeout
    $t->capacity_is_free($label, n => $N, log => $LOG, zone => 'llm',
                         req => \&req,
                         timeout => 12, settle => 20, or_stop => 1);
}

# ------------------------------------------------ a reload keeps the buckets

{
    # user A spends the one request of the minute; a second one is 429
    my $q = sub {
        my ($user) = @_;
        return $t->chat(uri => '/q/v1/chat/completions', content => 'quota',
                        headers => { 'X-User' => $user });
    };
    is($q->('alice')->{status}, 200, '1r/m: the first request is admitted');
    is($q->('alice')->{status}, 429, '... the second is not');

    my @old = sort $t->worker_pids;
    ok($t->reload, 'reload');
    my @new = sort $t->worker_pids;
    ok(!(grep { my $p = $_; grep { $_ == $p } @old } @new),
       '... new workers are serving');

    # the bucket lives in shared memory that the reload kept: still empty
    my $r = $q->('alice');
    is($r->{status}, 429, '1r/m after the reload: still 429');
    cmp_ok($r->{headers}{'retry-after'} // 0, '>=', 50,
           '... Retry-After: the rest of the minute');
    is($q->('bob')->{status}, 200, '... while another user is admitted');
}

# ------------------------------------------------ queue and in-flight across a reload

{
    # The old worker that has nothing in flight but requests queued is
    # the case that matters: it must not exit at the reload (dropping its
    # waiters), but admit them once slots free up and exit after that.
    # So all N slots are held by long streams on one worker, A, and both
    # A and B have 2 requests waiting behind them when the reload comes.
    my ($bg, $roles) = setup(sub {
        my %r = (q => {});
        my $accept = sub {
            my ($tag, $pid) = @_;
            if ($tag =~ /^rh/) {
                $r{A} //= $pid;
                return $pid == $r{A};
            }
            return 0 if ($r{q}{$pid} || 0) >= 2;
            $r{q}{$pid}++;
            push @{ $r{qtags}{$pid} }, $tag;
            return 1;
        };
        return ([map { "rh-$_" } 1 .. $N], [map { "rq-$_" } 1 .. 4],
                $accept, \%r);
    }, 6000, 1000);
    my $wa = $roles->{A};
    my ($wb) = grep { $_ != $wa } $t->worker_pids;
    my @tags = sort keys %$bg;

    is_deeply($t->settled_conns($mport, [$N, $N + 2, 0, 2], $wa, $wb),
              [$N, $N + 2, 0, 2],
              "reload under load: worker A holds the $N slots and has 2 "
              . "queued, worker B has 2 queued and nothing in flight");
    is($t->mock_stats->{inflight}, $N, "... $N in flight at the mock");

    # requests for the new workers, sent during the reload: they queue
    # behind the old workers' waiters, under the same cap
    my @ntags = map { "rn-$_" } 1 .. $N;
    my $bg2 = $t->bg_parallel([map { { %{ req("rn-$_",
                                              h => { 'X-Mock-Delay-Ms' => 500 }) },
                                       at_ms => 300 + 200 * $_ } } 1 .. $N],
                              timeout => 40);
    ok($t->reload(timeout => 40),
       '... reload: the old workers exit once their requests are done');

    my %res = map { $_ => $t->bg_wait($bg->{$_})->[0] } @tags;
    my $res2 = $t->bg_wait($bg2);
    is(scalar(grep { ($res{$_}{status} // 0) == 200
                     && $res{$_}{body} =~ /\[DONE\]/ } @tags),
       $N + 4, '... every request queued or in flight at the reload was served')
        or diag explain { map { $_ => $res{$_}{error} || $res{$_}{status} } @tags };
    is(scalar(grep { $_->{status} == 200 } @$res2), $N,
       '... and so was every request sent during the reload');

    my $log = $t->log_by_tag($LOG, @tags, @ntags);
    # where each request was placed: the log says which pid served it
    my %where = (map({ $_ => $wa } grep { /^rh/ } @tags),
                 map({ my $p = $_; map { $_ => $p } @{ $roles->{qtags}{$p} } }
                     $wa, $wb));
    is_deeply({ map { $_ => $log->{$_}{pid} // '-' } @tags }, \%where,
              '... each old worker served its own requests');
    is(join(' ', map { $log->{$_}{st} // '-' } grep { /^rq/ } @tags),
       'QUEUED QUEUED QUEUED QUEUED', '... the waiters after waiting');
    is(scalar(grep { $log->{$_} && $log->{$_}{pid} != $wa
                     && $log->{$_}{pid} != $wb } @ntags), $N,
       '... the new workers served the new ones');
    is($t->mock_stats->{max_inflight}, $N,
       '... one cap for old and new workers: never more than N in flight');
}

capacity_is_free_or_stop('after the reload');

# ------------------------------------------------ kill -9 under load

{
    # Streams in flight and requests queued on both workers: 2 long
    # streams and 2 waiters each.  Worker A is killed: its in-flight
    # slots are leases in shared memory nobody will release, and its
    # queue places come before some of B's waiters, which would wait
    # behind them for ever.
    my ($bg, $roles) = setup(sub {
        my %r;
        my $accept = sub {
            my ($tag, $pid) = @_;
            my $kind = $tag =~ /^kh/ ? 'h' : 'q';
            return 0 if ($r{$kind}{$pid} || 0) >= 2;
            $r{$kind}{$pid}++;
            push @{ $r{tags}{$pid} }, $tag;
            return 1;
        };
        return ([map { "kh-$_" } 1 .. $N], [map { "kq-$_" } 1 .. 4],
                $accept, \%r);
    }, 6000, 1000);
    my ($wa, $wb) = sort { $a <=> $b } $t->worker_pids;
    my @ta = @{ $roles->{tags}{$wa} };
    my @tb = @{ $roles->{tags}{$wb} };

    is_deeply($t->settled_conns($mport, [2, 4, 2, 4], $wa, $wb),
              [2, 4, 2, 4],
              'kill -9 under load: 2 streams in flight and 2 queued on '
              . 'each worker');

    my $off = length $t->error_log;
    kill 'KILL', $wa;
    my $killed = time;

    ok($t->wait_until(sub {
        my @w = $t->worker_pids;
        @w == 2 && !grep { $_ == $wa } @w;
    }, 10), '... the master respawned the worker');

    my $ping = $t->get('/ping');
    is($ping->{status}, 200, '... an unguarded location answers');

    ok($t->wait_until(sub {
        substr($t->error_log, $off)
            =~ /zone "llm": released the in-flight slots and queue places of 1 dead worker\(s\)/
    }, 5), "... the reaper released the dead worker's slots and queue places");
    my $reaped = time - $killed;
    cmp_ok($reaped, '<', 3, '... within 3 s of the kill')
        or diag "reaped after $reaped s";

    # new requests are served: not stuck behind the dead worker's queue
    # places nor short of its in-flight slots
    my @new = $t->parallel([map { req("kn-$_", h => { 'X-Mock-Delay-Ms' => 200 }) }
                            1 .. $N], timeout => 40);
    is(scalar(grep { $_->{status} == 200 } @new), $N,
       '... new requests are served after the kill');

    my %res = map { $_ => $t->bg_wait($bg->{$_})->[0] } keys %$bg;
    is(scalar(grep { ($res{$_}{status} // 0) == 200 } @tb), scalar @tb,
       "... the surviving worker's requests, in flight and queued, are served")
        or diag explain { map { $_ => $res{$_}{error} || $res{$_}{status} } @tb };
    is(scalar(grep { !$res{$_}{status} } @ta), scalar @ta,
       "... the dead worker's clients lost their connection")
        or diag explain { map { $_ => $res{$_}{error} || $res{$_}{status} } @ta };
    my $log = $t->log_by_tag($LOG, @tb);
    is(join(' ', map { $log->{$_}{st} // '-' } grep { /kq/ } @tb),
       'QUEUED QUEUED',
       "... the surviving worker's waiters were admitted after the reaper ran")
        or diag explain { map { $_ => $log->{$_} } @tb };
}

capacity_is_free_or_stop('after the kill');

$t->done;
