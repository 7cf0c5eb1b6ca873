#!/usr/bin/perl
# Priority classes of the admission controller, 2 workers, one global key
# with inflight=10 and classes critical (reserve=20%), high, normal, low
# picked from the API key.  A critical request that arrives after normal
# ones are queued is admitted before them; queued normal requests are
# admitted in arrival order; under sustained overload the critical traffic
# within its reserved share is served while normal (and low) traffic is
# shed with 503 and Retry-After.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# capacity 20 >= the zone's cap of 10: the mock never answers 503, every
# 503 seen by a client comes from the guard
$t->mock_start(capacity => 20, first_token_ms => 100, token_ms => 0,
               tokens => 3);

$t->write_config(<<'EOF');
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'cls=$deepseek_guard_class wait=$deepseek_guard_wait_ms '
                   'status=$status zone=$deepseek_guard_zone';

    # the API key map idiom: the key decides the class
    map $http_authorization $dsg_class {
        "Bearer crit-key"  critical;
        "Bearer high-key"  high;
        "Bearer low-key"   low;
        default            normal;
    }

    deepseek_guard_class critical reserve=20% queue=8 queue_timeout=10s;
    deepseek_guard_class high queue=8 queue_timeout=10s;
    deepseek_guard_class normal queue=6 queue_timeout=6s;
    deepseek_guard_class low;
    deepseek_guard_zone llm:1m key=global inflight=10;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/dsg.log dsg;

        location /v1/ {
            deepseek_guard llm;
            deepseek_guard_classify $dsg_class;
            proxy_pass http://%%MOCK%%;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_read_timeout 20s;
        }
    }
EOF
$t->start;

my %KEY = (critical => 'crit-key', high => 'high-key', low => 'low-key',
           normal => 'some-customer-key');

# ------------------------------------------------------------ helpers

my $LOG = $t->prefix . '/logs/dsg.log';

# a streamed chat request of a class, tagged (X-Tag, logged), lasting
# about $ms at the mock; at_ms schedules it within a parallel() run
sub req {
    my ($cls, $tag, $ms, %o) = @_;
    return $t->tagged_req($tag, key => $KEY{$cls},
                          h => { 'X-Mock-Delay-Ms' => $ms }, %o);
}

# when the guard let a request through, seen from the client: the mock
# sends the response head at once, so the first byte follows admission
sub admitted_at {
    my ($r) = @_;
    return $r->{start} + ($r->{ttfb_ms} // 1e6) / 1000;
}

# ------------------------------------------------ the keys pick the class

{
    my @res = $t->parallel([map { req($_, "cls-$_", 0) }
                            qw(critical high normal low)], timeout => 20);
    is(scalar(grep { $_->{status} == 200 } @res), 4, 'one request per class');
    my $log = $t->log_by_tag($LOG,
                             map { "cls-$_" } qw(critical high normal low));
    is_deeply([map { $log->{"cls-$_"}{cls} } qw(critical high normal low)],
              [qw(critical high normal low)],
              '... classified by the API key map');
}

# ------------------------------------------------ who is admitted first

{
    # Every slot is taken: 8 normal blockers (the most the 80% share gives
    # normal traffic) ending one every 300 ms from t=2.0 s, and 2 critical
    # blockers holding the reserved 20% until t=4.5 s.  Five normal
    # requests queue at t=0.5..0.9 s, then a critical one at t=1.2 s.
    # Each blocker's end frees exactly one slot, so admissions are 300 ms
    # apart and their order is the queue's order: the critical request
    # first (at ~2.0 s) although it came last, then the normal ones in
    # arrival order (~2.3, 2.6, 2.9, 3.2, 3.5 s).  The waiters last 3 s,
    # so none of them frees a slot while the order is being decided.
    $t->mock_reset;
    my @reqs;
    push @reqs, req('normal', "blk-$_", 2000 + 300 * $_) for 0 .. 7;
    push @reqs, req('critical', "cblk-$_", 4500) for 0 .. 1;
    push @reqs, { %{ req('normal', "nq-$_", 3000) }, at_ms => 400 + 100 * $_ }
        for 1 .. 5;
    push @reqs, { %{ req('critical', 'cq', 3000) }, at_ms => 1200 };
    my @res = $t->parallel(\@reqs, timeout => 40);

    is(scalar(grep { $_->{status} == 200 } @res), scalar @reqs,
       'ordering: every request served')
        or diag explain [map { $_->{error} || $_->{status} } @res];
    is($t->mock_stats->{max_inflight}, 10, '... 10 in flight at the mock, no more');

    my @nq = @res[10 .. 14];
    my $cq = $res[15];
    my @ntags = map { "nq-$_" } 1 .. 5;
    my $log = $t->log_by_tag($LOG, @ntags, 'cq', map { "blk-$_" } 0 .. 7);

    is(scalar(grep { $log->{"blk-$_"}{st} eq 'ADMITTED' } 0 .. 7), 8,
       '... the 8 normal blockers were admitted at once');
    is(join(' ', map { $log->{$_}{st} } 'cq', @ntags),
       join(' ', ('QUEUED') x 6), '... the late ones all waited in the queue');

    my $c_at = admitted_at($cq);
    ok(!(grep { admitted_at($_) <= $c_at } @nq),
       'critical arriving after queued normal requests is admitted before them')
        or diag sprintf "critical at %.3f, normal at %s", $c_at - $res[0]{start},
                join(' ', map { sprintf '%.3f', admitted_at($_) - $res[0]{start} } @nq);
    ok(!(grep { $log->{cq}{wait} >= $log->{$_}{wait} } @ntags),
       '... its wait_ms is below that of each earlier queued normal request')
        or diag explain [map { "$_: $log->{$_}{wait}" } 'cq', @ntags];

    my @at = map { admitted_at($_) } @nq;
    ok(!(grep { $at[$_] <= $at[$_ - 1] } 1 .. $#at),
       'FIFO within a class: queued normal requests admitted in arrival order')
        or diag join ' ', map { sprintf '%.3f', $_ - $res[0]{start} } @at;
}

ok($t->wait_until(sub { $t->mock_stats->{inflight} == 0 }, 15),
   'nothing in flight before the overload');

# ------------------------------------------------ sustained overload

{
    # 6 s of overload.  Normal traffic: 10 requests/s of 1.5 s, twice
    # what its 8 slots serve; high: 2/s of 1.5 s, which the queue serves
    # before normal; low (never queues): 1.7/s.  Critical: one 200 ms
    # request every 300 ms, about one in flight at a time, well within
    # its reserved 2 slots.
    $t->mock_reset;
    my (@reqs, %cls_of);
    my $add = sub {
        my ($cls, $n, $every, $from, $ms) = @_;
        for my $i (1 .. $n) {
            my $tag = "ov-$cls-$i";
            push @reqs, { %{ req($cls, $tag, $ms) },
                          at_ms => $from + $every * ($i - 1) };
            $cls_of{ $#reqs } = $cls;
        }
    };
    $add->('normal',   60, 100,    0, 1500);
    $add->('high',     12, 500,   50, 1500);
    $add->('low',      10, 500, 1000, 1500);
    $add->('critical', 20, 300,  150,  200);
    my @res = $t->parallel(\@reqs, timeout => 60);

    my (%ok, %busy, %n, %retry_ok);
    for my $i (0 .. $#res) {
        my ($c, $r) = ($cls_of{$i}, $res[$i]);
        $n{$c}++;
        $ok{$c}++ if $r->{status} == 200;
        next unless $r->{status} == 503;
        $busy{$c}++;
        # an overload answer: Retry-After in whole seconds, the error JSON
        $retry_ok{$c}++
            if ($r->{headers}{'retry-after'} // '') =~ /^[1-9]\d*$/
               && ($r->{headers}{'retry-after-ms'} // '') =~ /^\d+$/
               && $r->{body} =~ /"code":"server_overloaded"/;
    }
    $ok{$_} ||= 0, $busy{$_} ||= 0, $retry_ok{$_} ||= 0
        for qw(critical high normal low);
    diag sprintf "overload: %s",
        join ', ', map { "$_ $ok{$_}/$n{$_} ok, $busy{$_} busy" }
                   qw(critical high normal low);

    is($ok{$_} + $busy{$_}, $n{$_}, "overload: $_ answers are 200 or 503")
        for qw(critical high normal low);

    cmp_ok($ok{critical}, '>=', 0.95 * $n{critical},
           'critical traffic within its reserve: >= 95% served');
    my $log = $t->log_by_tag($LOG, map { "ov-critical-$_" } 1 .. $n{critical});
    cmp_ok(scalar(grep { $log->{"ov-critical-$_"}{st} eq 'ADMITTED' }
                  1 .. $n{critical}), '>=', 0.9 * $n{critical},
           '... nearly all of it without even queueing (the reserved share)');

    cmp_ok($busy{normal}, '>=', 15, 'normal traffic is shed: many 503');
    is($retry_ok{normal}, $busy{normal},
       '... each with Retry-After, retry-after-ms and the error JSON');
    cmp_ok($ok{normal}, '>=', 10, '... while part of it is still served');

    cmp_ok($ok{high}, '>=', 0.9 * $n{high},
           'high traffic, queued ahead of normal, is nearly all served');
    cmp_ok($busy{low}, '>=', 0.8 * $n{low},
           'low traffic, which never queues, is shed');

    my $st = $t->mock_stats;
    is($st->{rejected_503}, 0, 'the mock itself never answered 503');
    cmp_ok($st->{max_inflight}, '<=', 10, '... and never had more than 10 in flight');

    $log = $t->log_by_tag($LOG, map { "ov-normal-$_" } 1 .. $n{normal});
    is(scalar(grep { $log->{$_}{status} eq '503' && $log->{$_}{st} eq 'REJECTED'
                     && $log->{$_}{zone} eq 'llm' } keys %$log),
       $busy{normal} + $busy{low} + $busy{high} + $busy{critical},
       'every 503 was the guard rejecting in zone llm');
}

$t->done;
