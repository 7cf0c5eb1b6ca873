#!/usr/bin/perl
# The in-flight cap of a deepseek_guard_zone (inflight=4, one global key)
# with 2 workers: the mock upstream never sees more than 4 concurrent
# streams under 5x load, queued requests do not occupy a worker, and no
# way of ending a request leaks a slot: after client aborts mid-stream,
# an upstream dying mid-stream, upstream errors (500, 502 with the mock
# stopped), a proxy_read_timeout (504) and clients leaving the queue, the
# full capacity is available again.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $N = 4;      # the zone's in-flight cap

my $t = DSG::Test->new(workers => 2);

# an unlimited mock (capacity 0): any concurrency above $N that reaches it
# is visible in its max_inflight, never hidden by its own 503s
my $mport = $t->mock_start(capacity => 0, first_token_ms => 100,
                           token_ms => 50, tokens => 10);

# reuseport: the kernel spreads the test's connections over both workers,
# so the cap is shown to hold across workers, not inside one
$t->write_config(<<'EOF');
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'cls=$deepseek_guard_class wait=$deepseek_guard_wait_ms '
                   'status=$status zone=$deepseek_guard_zone';

    deepseek_guard_class normal queue=64 queue_timeout=30s;
    deepseek_guard_zone llm:1m key=global inflight=4;

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

        # the same zone, with a read timeout that a slow upstream hits
        location /short/ {
            deepseek_guard llm;
            proxy_pass http://%%MOCK%%/;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_read_timeout 500ms;
        }

        # not guarded: must answer at once even when the zone is saturated
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

# a chat request tagged with X-Tag (logged), streaming unless stream => 0
sub req { $t->tagged_req(@_) }

# The leak detector (DSG::Test::capacity_is_free): N slow requests at
# once all admitted without queueing, one more sent a little later queues
# until one of them ends.  With capacity lost, every later step would
# only wait for timeouts: stop there.
sub capacity_is_free_or_stop {
    my ($label) = @_;
    # short client timeouts: with a slot leaked, the requests would wait
    # for the queue timeout
    $t->capacity_is_free($label, n => $N, log => $LOG, zone => 'llm',
                         timeout => 12,
                         hold => { 'X-Mock-Delay-Ms' => 1500,
                                   'X-Mock-Token-Ms' => 0 },
                         extra => { 'X-Mock-Delay-Ms' => 100 },
                         extra_wait_ms => 300, or_stop => 1);
}

# ------------------------------------------------ 5x load of streams

{
    # 20 streams of ~1 s at once, 5 times the cap: the cap must hold for
    # the whole run and every request must still be served (queued, not
    # rejected: queue=64, queue_timeout=30s)
    $t->mock_reset;
    my @tags = map { "load-$_" } 1 .. 5 * $N;
    my @res = $t->parallel([map { req($_, h => { 'X-Mock-Delay-Ms' => 500 }) }
                            @tags], timeout => 60);

    is(scalar(grep { $_->{status} == 200 } @res), 5 * $N,
       '5x load: every stream served')
        or diag explain [map { $_->{error} || $_->{status} } @res];
    is(scalar(grep { $_->{body} =~ /data: \[DONE\]\n\n\z/ } @res), 5 * $N,
       '... each one complete, up to data: [DONE]');
    ok(!(grep { $_->{first_body_ms} && $_->{first_body_ms} >= $_->{ms} - 100 }
         @res), '... streamed (first body byte long before the end)');

    my $st = $t->mock_stats;
    cmp_ok($st->{max_inflight}, '<=', $N, "mock max_inflight <= $N");
    is($st->{max_inflight}, $N, "... and the cap was reached");
    is($st->{completed}, 5 * $N, '... the mock completed them all');

    my $log = $t->log_by_tag($LOG, @tags);
    my %pids = map { $log->{$_}{pid} => 1 } @tags;
    is(scalar keys %pids, 2, '... served through both workers')
        or diag explain \%pids;
    cmp_ok(scalar(grep { $log->{$_}{st} eq 'QUEUED' } @tags), '>=', 3 * $N,
           '... most of them waited in the queue');
    cmp_ok(scalar(grep { $log->{$_}{st} eq 'ADMITTED' } @tags), '<=', $N + 1,
           '... only the first wave was admitted without waiting');
}

# ------------------------------------------------ queued requests park

{
    # 2N slow requests (N in flight for 3 s, N queued behind them) and,
    # meanwhile, pings to an unguarded location: a waiter that blocked its
    # worker would hold the ping for seconds
    my @tags = map { "park-$_" } 1 .. 2 * $N;
    my @reqs = map { req($_, h => { 'X-Mock-Delay-Ms' => 3000,
                                    'X-Mock-Token-Ms' => 0 }) } @tags;
    my @pings = map { { method => 'GET', uri => '/ping', timeout => 10,
                        at_ms => 400 + 150 * $_ } } 0 .. 11;
    my @res = $t->parallel([@reqs, @pings], timeout => 40);
    my @pr = @res[2 * $N .. $#res];

    is(scalar(grep { $_->{status} == 200 && $_->{body} eq "pong\n" } @pr),
       scalar @pings, 'pings answered while the zone is saturated');
    my @ms = sort { $a <=> $b } map { $_->{ms} } @pr;
    cmp_ok($ms[$#ms / 2], '<', 100, '... median ping time under 100 ms')
        or diag "ping times (ms): @ms";
    cmp_ok($ms[-1], '<', 1000, '... none anywhere near the 3 s queue wait')
        or diag "ping times (ms): @ms";

    # the pings really ran while N requests waited: those N waited for
    # the first N (3 s), longer than the last ping was sent
    my $log = $t->log_by_tag($LOG, @tags);
    is(scalar(grep { $log->{$_}{st} eq 'QUEUED' && $log->{$_}{wait} >= 2400 }
              @tags), $N, "... while $N requests were queued for ~3 s")
        or diag explain [map { $log->{$_} } @tags];
    is(scalar(grep { $_->{status} == 200 } @res[0 .. 2 * $N - 1]), 2 * $N,
       '... and all of them were served afterwards');
}

capacity_is_free_or_stop('after the load');

# ------------------------------------------------ (a) client aborts mid-stream

{
    # 2N streams whose clients close after the first body bytes: N abort
    # in flight, their released slots admit the N waiters, which abort too
    my @res = $t->parallel([map { req("abort-$_", abort_after_bytes => 1) }
                            1 .. 2 * $N], timeout => 30);
    is(scalar(grep { $_->{aborted} && $_->{status} == 200 } @res), 2 * $N,
       'client aborts: every client closed mid-stream');
    $t->settle('client aborts');
    cmp_ok($t->mock_stats->{client_aborts}, '>=', 1,
           '... seen by the mock as aborted streams');
}

capacity_is_free_or_stop('after client aborts');

# ------------------------------------------------ (b) upstream dies mid-stream

{
    # the mock drops the connection after 2 tokens: the client gets a
    # truncated stream, the slot must come back all the same
    my @res = $t->parallel([map { req("updie-$_",
                                      h => { 'X-Mock-Abort-After' => 2 }) }
                            1 .. 2 * $N], timeout => 30);
    is(scalar(grep { $_->{error} && ($_->{got_status} // 0) == 200
                     && $_->{body} =~ /tok1-/ && $_->{body} !~ /tok2-/ } @res),
       2 * $N, 'upstream dies mid-stream: 2 tokens, then a truncated stream');
    is($t->mock_stats->{aborted_by_mock}, 2 * $N,
       '... the mock dropped every one of them');
}

capacity_is_free_or_stop('after the upstream died mid-stream');

# ------------------------------------------------ (c) upstream errors

{
    # an upstream error answer (500) ends the request early
    my @res = $t->parallel([map { req("e500-$_",
                                      h => { 'X-Mock-Status' => 500,
                                             'X-Mock-Delay-Ms' => 200 }) }
                            1 .. 2 * $N], timeout => 30);
    is(scalar(grep { $_->{status} == 500 } @res), 2 * $N,
       'upstream error: 500 passed on');
}

capacity_is_free_or_stop('after upstream 500s');

{
    # the mock is gone: connect() is refused, 502 at once
    $t->mock_stop;
    my @res = $t->parallel([map { req("e502-$_") } 1 .. 2 * $N],
                           timeout => 30);
    is(scalar(grep { $_->{status} == 502 } @res), 2 * $N,
       'mock stopped: 502');
    my @et = map { "e502-$_" } 1 .. 2 * $N;
    my $log = $t->log_by_tag($LOG, @et);
    is(scalar(grep { $log->{$_}{st} =~ /^(?:ADMITTED|QUEUED)$/ } @et),
       2 * $N, '... admitted by the guard, refused upstream');

    # the same port again: nginx's config still points there
    $t->mock_start(capacity => 0, first_token_ms => 100, token_ms => 50,
                   tokens => 10, args => ['--listen', "127.0.0.1:$mport"]);
    is($t->mock_port, $mport, '... mock restarted on its port');
}

capacity_is_free_or_stop('after 502s');

# ------------------------------------------------ (d) proxy_read_timeout

{
    # a non-streamed answer 3 s away through a 500 ms proxy_read_timeout:
    # 504 for the N in flight, then for the N that waited for them
    my @res = $t->parallel([map { req("t504-$_", stream => 0,
                                      uri => '/short/v1/chat/completions',
                                      h => { 'X-Mock-Delay-Ms' => 3000 }) }
                            1 .. 2 * $N], timeout => 30);
    is(scalar(grep { $_->{status} == 504 } @res), 2 * $N,
       'proxy_read_timeout: 504');
    ok($t->error_log =~ /upstream timed out/, '... "upstream timed out" logged');
}

capacity_is_free_or_stop('after read timeouts');

# ------------------------------------------------ (e) clients leave the queue

{
    # N slow requests hold every slot for 2 s; 2N more queue behind them
    # and hang up after 700 ms, long before a slot frees
    $t->mock_reset;
    my @hold = map { req("hold-$_", h => { 'X-Mock-Delay-Ms' => 2000,
                                           'X-Mock-Token-Ms' => 0 }) } 1 .. $N;
    my @gone = map { { %{ req("gone-$_") }, at_ms => 200,
                       abort_after_ms => 700 } } 1 .. 2 * $N;
    my @res = $t->parallel([@hold, @gone], timeout => 30);

    is(scalar(grep { $_->{status} == 200 } @res[0 .. $N - 1]), $N,
       'queue leavers: the N holders are served');
    is(scalar(grep { $_->{aborted} && !$_->{status} } @res[$N .. $#res]),
       2 * $N, '... the waiters hung up before any answer');
    my @gt = map { "gone-$_" } 1 .. 2 * $N;
    my $log = $t->log_by_tag($LOG, @gt);
    is(scalar(grep { $log->{$_}{st} eq 'QUEUED' && $log->{$_}{status} eq '499' }
              @gt), 2 * $N, '... logged as queued, then 499')
        or diag explain [map { $log->{$_} } @gt];
    $t->settle('queue leavers');
    # a waiter that left must never be admitted later on
    is($t->mock_stats->{chat_requests}, $N,
       '... none of the waiters that left reached the mock');
}

capacity_is_free_or_stop('after clients left the queue');

$t->done;
