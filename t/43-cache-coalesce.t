#!/usr/bin/perl
# deepseek_guard_cache coalescing: concurrent misses for one key, from both
# workers, send ONE request upstream and all get its answer (MISS once,
# COALESCED for the rest); a filler that fails (error status, forced 503,
# its client leaving) hands over to one waiter, with no stampede and no
# hang; a short lock_timeout lets waiters go upstream after it.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use List::Util qw(max min);
use POSIX ();

my $t = DSG::Test->new(workers => 2);

# every answer takes 500 ms: the window in which the 50 requests pile up
# behind the first one
$t->mock_start(first_token_ms => 500, token_ms => 20, tokens => 4);

# reuseport: the kernel spreads the connections over both workers, so the
# waiters sit in both, while the fill lock lives in the keys zone
$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;
    log_format co '$pid $status "$deepseek_guard_cache_status" tag=$http_x_tag';

    server {
        listen 127.0.0.1:%%PORT%% reuseport backlog=1024;
        access_log %%PREFIX%%/logs/access.log co;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 1m;
        proxy_http_version 1.1;
        proxy_buffering off;

        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }

        location /short/ {
            deepseek_guard_cache_lock_timeout 300ms;
            proxy_pass http://%%MOCK%%/v1/;
        }
    }
EOF
$t->start;

my $run = 0;

# requests of one run, tagged "<run>-<i>"
sub reqs {
    my ($n, %o) = @_;
    my $h = delete $o{headers} || [];
    $run++;
    return map { $t->chat_req(timeout => 20, %o,
                              headers => [@$h, 'X-Tag' => "$run-$_"]) } 1 .. $n;
}

# cache statuses of run $r, from the access log: { status => count }
sub logged {
    my ($r, $n) = @_;
    my $re = qr/^(\d+) (\d+) "([A-Z]*)" tag=\Q$r\E-\d+$/m;
    $t->wait_until(sub { (() = $t->access_log =~ /$re/g) / 3 >= $n }, 5);
    my (%st, %pid);
    for (split /\n/, $t->access_log) {
        next unless /^(\d+) (\d+) "([A-Z]*)" tag=\Q$r\E-\d+$/;
        $st{"$2 $3"}++;
        $pid{$1}++;
    }
    return (\%st, scalar keys %pid);
}

sub calls { $t->mock_stats->{chat_requests} }

# ------------------------------------------------ 50 at once, one call

{
    $t->mock_reset;
    my @res = $t->parallel([reqs(50, content => 'coalesce me')], timeout => 30);
    my @ok = grep { $_->{status} == 200 } @res;
    is(scalar @ok, 50, '50 concurrent identical requests: 50 complete 200s')
        or diag explain [map { $_->{error} // $_->{status} } @res];
    is(scalar(grep { $_->{body} eq $res[0]{body} } @res), 50, '... identical answers');
    like($res[0]{body}, qr/"content":"tok0-/, '... a chat completion');
    is(calls(), 1, '... exactly ONE upstream call');

    my ($st, $npid) = logged($run, 50);
    is_deeply($st, { '200 MISS' => 1, '200 COALESCED' => 49 },
              '... access log: MISS x1, COALESCED x49');
    is($npid, 2, '... served by both workers');
    my %hdr;
    $hdr{ $_->{headers}{'x-cache-status'} // '' }++ for @res;
    is_deeply(\%hdr, { MISS => 1, COALESCED => 49 }, '... X-Cache-Status agrees');

    # the waiters are answered as the filler finishes, not on a slow poll
    cmp_ok(max(map { $_->{ms} } @res), '<', 1500,
           '... all done within ' . int(max(map { $_->{ms} } @res)) . ' ms');

    # afterwards: plain hits
    my $h = $t->chat(content => 'coalesce me');
    is($h->{headers}{'x-cache-status'}, 'HIT', '... then a HIT');
    is(calls(), 1, '... still one upstream call');
}

# ------------------------------------------------ streams coalesce too

{
    $t->mock_reset;
    my @res = $t->parallel([reqs(30, content => 'coalesce stream', stream => 1)],
                           timeout => 30);
    is(scalar(grep { $_->{status} == 200 } @res), 30, '30 concurrent streams: 30 x 200');
    is(scalar(grep { $_->{body} eq $res[0]{body} } @res), 30, '... identical bytes');
    is((DSG::Test::sse_data($res[0]{body}))[-1], '[DONE]', '... complete streams');
    is(calls(), 1, '... ONE upstream call');
    my ($st) = logged($run, 30);
    is_deeply($st, { '200 MISS' => 1, '200 COALESCED' => 29 },
              '... MISS x1, COALESCED x29');
}

# ------------------------------------------------ the filler fails: 500

{
    $t->mock_reset;

    # the first request (the filler) is answered 500 after 500 ms; the 39
    # others, 100 ms later, wait for it.  Its failure must hand the fill
    # over to ONE waiter, whose 200 answers everyone else.
    my @r = reqs(40, content => 'filler fails');
    $r[0] = $t->chat_req(content => 'filler fails', timeout => 20,
                         headers => ['X-Mock-Status' => 500, 'X-Tag' => "$run-1"]);
    $_->{at_ms} = 100 for @r[1 .. $#r];
    my @res = $t->parallel(\@r, timeout => 30);

    is($res[0]{status}, 500, 'filler answered 500: its client gets the 500');
    is(scalar(grep { $_->{status} == 200 } @res[1 .. $#res]), 39,
       '... the 39 waiters all get a 200');
    is(scalar(grep { defined $_->{error} } @res), 0, '... nobody hangs or errors');
    is(calls(), 2, '... two upstream calls: the filler and ONE takeover');
    my ($st) = logged($run, 40);
    is($st->{'200 MISS'}, 1, '... one waiter became the filler (MISS)');
    is($st->{'200 COALESCED'}, 38, '... 38 COALESCED');
    cmp_ok(max(map { $_->{ms} } @res), '<', 2500, '... no waiter waited for long');
}

# ------------------------------------------------ forced 503 for the first

{
    $t->mock_reset;

    # force_status 503 is read when a chat arrives: the filler (t=0) gets
    # it; the mock is switched back at t=200 ms, by a request in the same
    # parallel run; the waiters reach the mock only after the filler failed
    $t->mock_config({ force_status => 503 });
    my @r = reqs(30, content => 'forced 503');
    $_->{at_ms} = 100 for @r[1 .. $#r];
    push @r, { method => 'POST', uri => '/admin/config', port => $t->mock_port,
               body => '{"force_status":0}', at_ms => 200,
               headers => ['Content-Type' => 'application/json'] };
    my @res = $t->parallel(\@r, timeout => 30);
    my $admin = pop @res;
    is($admin->{status}, 200, 'force_status reset during the run');

    is($res[0]{status}, 503, 'the filler got the forced 503');
    is(scalar(grep { $_->{status} == 200 } @res[1 .. $#res]), 29, '... 29 waiters get 200');
    is(scalar(grep { defined $_->{error} } @res), 0, '... nobody hangs');
    cmp_ok(calls(), '<=', 2, '... no stampede: ' . calls() . ' upstream calls');
    is($t->mock_stats->{forced_errors}, 1, '... one forced error');
}

# ------------------------------------------------ the filler's client leaves

{
    $t->mock_reset;

    # the filler's client hangs up after 200 ms, mid-fill: nginx drops the
    # upstream request, the lock is released, one waiter takes over
    my @r = reqs(20, content => 'filler leaves');
    $r[0]{abort_after_ms} = 200;
    $_->{at_ms} = 100 for @r[1 .. $#r];
    my @res = $t->parallel(\@r, timeout => 30);
    ok($res[0]{aborted}, 'the filler\'s client hung up');
    is(scalar(grep { $_->{status} == 200 } @res[1 .. $#res]), 19, '... 19 waiters get 200');
    is(scalar(grep { defined $_->{error} } @res), 0, '... nobody hangs');
    is(calls(), 2, '... two upstream calls');
}

# ------------------------------------------------ a reload while waiting

{
    $t->mock_reset;

    # The filler takes 1.5 s; 20 waiters park behind it, in both workers;
    # at 400 ms nginx reloads.  The old workers shut down gracefully: one
    # holds the filler's upstream connection, the other only parked
    # waiters, which must still be answered, not dropped when their worker
    # exits.
    my @r = reqs(21, content => 'reload while waiting');
    push @{ $r[0]{headers} }, ['X-Mock-Delay-Ms', 1500];
    $_->{at_ms} = 100 for @r[1 .. $#r];
    my $master = $t->master_pid;
    my $k = fork();
    die "fork: $!" unless defined $k;
    if (!$k) {
        select(undef, undef, undef, 0.4);
        kill 'HUP', $master;
        POSIX::_exit(0);
    }
    my @res = $t->parallel(\@r, timeout => 30);
    waitpid($k, 0);

    is(scalar(grep { $_->{status} == 200 } @res), 21,
       'reload while 20 requests wait for the filler: all 21 answered 200')
        or diag explain [map { $_->{error} // $_->{status} } @res];
    is(scalar(grep { $_->{body} eq $res[0]{body} } @res), 21, '... identical answers');
    is(calls(), 1, '... one upstream call');
    ok($t->wait_until(sub { $t->worker_pids == 2 }, 10), '... the new workers run');
}

# ------------------------------------------------ short lock_timeout

{
    $t->mock_reset;

    # the filler takes 3 s; the lock times out after 300 ms: the waiters
    # may not sit there for the whole 3 s, they go upstream (at normal
    # speed) once it passed
    my @r = reqs(10, uri => '/short/chat/completions', content => 'lock timeout');
    push @{ $r[0]{headers} }, ['X-Mock-Delay-Ms', 3000];
    $_->{at_ms} = 50 for @r[1 .. $#r];
    my @res = $t->parallel(\@r, timeout => 30);
    my @w = @res[1 .. $#res];

    is(scalar(grep { $_->{status} == 200 } @res), 10, 'lock_timeout 300ms: all 200');
    cmp_ok($res[0]{ms}, '>=', 2900, '... the filler took its 3 s');
    cmp_ok(max(map { $_->{ms} } @w), '<', 1500,
           '... the waiters did not wait for it (max ' . int(max(map { $_->{ms} } @w)) . ' ms)');
    cmp_ok(min(map { $_->{ms} } @w), '>=', 200,
           '... but waited for the lock timeout first (min ' . int(min(map { $_->{ms} } @w)) . ' ms)');
    cmp_ok(calls(), '>=', 2, '... went upstream after the timeout (' . calls() . ' calls)');
    cmp_ok(calls(), '<=', 10, '... at most once each');
    like($t->error_log, qr/lock timeout, going upstream/, '... logged (warn)');
}

$t->done;
