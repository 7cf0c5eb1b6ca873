#!/usr/bin/perl
# Fault injection: kill -9 of a worker while it has requests queued, in
# flight (slow SSE streams) and storing to the cache (a slow cacheable
# stream being captured), while the other worker keeps serving and cache
# stores run on both.  The master respawns the worker; the zone is not
# deadlocked (new requests served); the reaper gives back exactly the dead
# worker's in-flight slots and queue places (zone_reaped_total), so the
# in-flight gauge falls to what the surviving requests hold and N slow
# requests are admitted at once afterwards; the cache opens in the new
# worker and serves every entry committed before the kill, while the
# entry being filled by the dead worker is never served half-written.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $N = 4;      # in-flight cap of zone llm

my $t = DSG::Test->new(workers => 2);

# the kill -9 is the point of this test: the master reports it as an alert
$t->allow_log(qr/worker process \d+ exited on signal 9/);
# ... and force-unlocks a zone's mutex if the victim happened to hold it
$t->allow_log(qr/shared memory zone "(?:llm|cache)" was locked by \d+/);

my $mport = $t->mock_start(capacity => 0, first_token_ms => 50,
                           token_ms => 0, tokens => 3);

# /v1/: guarded (inflight 4, a queue) and cached: the requests that the
#       kill hits.
# /c/:  cached, not guarded: the store traffic during the kill, kept out
#       of zone llm so that the reaper's count is exactly the planned one.
# X-Pid tells a client which worker answered it.
$t->write_config(<<'EOF');
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'wait=$deepseek_guard_wait_ms status=$status '
                   'cache=$deepseek_guard_cache_status';

    deepseek_guard_class normal queue=64 queue_timeout=30s;
    deepseek_guard_zone llm:1m key=global inflight=4;
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=cache:1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/dsg.log dsg;
        add_header X-Pid $pid always;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache_valid 200 10m;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_read_timeout 30s;

        location /v1/ {
            deepseek_guard llm;
            deepseek_guard_cache cache;
            proxy_pass http://%%MOCK%%;
        }

        location /c/ {
            deepseek_guard_cache cache;
            proxy_pass http://%%MOCK%%/;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }

        location = /ping {
            return 200 "pong\n";
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

sub inflight_gauge { $t->metrics->{'deepseek_guard_inflight{zone="llm",class="normal"}'} // 0 }
sub reaped { $t->metrics->{'deepseek_guard_zone_reaped_total{zone="llm"}'} // 0 }

# Sends one request from a child process of its own and returns it once
# worker $want has it (in flight at the mock if $admitted, else parked in
# the queue); sent again while it lands on the other worker
# (DSG::Test::place)
sub place {
    my ($req, $want, $admitted) = @_;
    my ($bg) = $t->place($req, mock_port => $mport, admitted => $admitted,
                         accept => sub { $_[0] == $want }, timeout => 45);
    return $bg;
}

# the leak detector (DSG::Test::capacity_is_free, as in t/30, t/32):
# exactly N slow requests at once are all admitted without queueing and
# reach the mock together
sub capacity_is_free {
    my ($label) = @_;
    $t->capacity_is_free($label, n => $N, log => $LOG, zone => 'llm',
                         req => \&req,
                         settle => 30, wait => 30);
}

sub xcs { $_[0]{headers}{'x-cache-status'} // '-' }

# ------------------------------------------------ committed entries

# Five answers stored (and read back: HIT) before anything goes wrong:
# these are "committed" and must survive the kill, in every worker.
my %committed;
for my $i (1 .. 5) {
    my $c = "committed $i";
    my $a = $t->chat(content => $c, stream => 0);
    my $b = $t->chat(content => $c, stream => 0);
    $committed{$c} = $a->{body};
    is(xcs($a) . ' ' . xcs($b), 'MISS HIT', "entry '$c' stored before the kill");
}

# ------------------------------------------------ kill -9 under load

my ($wa, $wb) = sort { $a <=> $b } $t->worker_pids;
my $reaped0 = reaped();
my %bg;
my $store_prompt = 'being stored when its worker dies';

# Worker A (the victim) holds 3 of the 4 slots: 2 long streams and one
# cacheable stream that trickles a token every 250 ms, so that it is being
# captured for the cache when A dies (40 tokens: 10 s).  Worker B holds the
# 4th slot with a stream that outlives the test's checks.  Then 2 waiters
# park on each worker (queue FIFO across workers: A's come first).
$bg{ah1} = place(req('ah1', h => { 'X-Mock-Delay-Ms' => 30000 }), $wa, 1);
$bg{ah2} = place(req('ah2', h => { 'X-Mock-Delay-Ms' => 30000 }), $wa, 1);
$bg{as}  = place(req('as', content => $store_prompt, max_tokens => 40,
                     h => { 'X-Mock-Token-Ms' => 250 }), $wa, 1);
$bg{bh}  = place(req('bh', h => { 'X-Mock-Delay-Ms' => 12000 }), $wb, 1);
$bg{aq1} = place(req('aq1', h => { 'X-Mock-Delay-Ms' => 1000 }), $wa, 0);
$bg{aq2} = place(req('aq2', h => { 'X-Mock-Delay-Ms' => 1000 }), $wa, 0);
# B's waiters stay in flight for 5 s once admitted: the window in which
# the in-flight gauge is checked
$bg{bq1} = place(req('bq1', h => { 'X-Mock-Delay-Ms' => 5000 }), $wb, 0);
$bg{bq2} = place(req('bq2', h => { 'X-Mock-Delay-Ms' => 5000 }), $wb, 0);

is_deeply($t->settled_conns($mport, [3, 5, 1, 3], $wa, $wb), [3, 5, 1, 3],
          'before the kill: A has 3 in flight (2 streams, 1 being stored) '
          . 'and 2 queued; B has 1 in flight and 2 queued');
is(inflight_gauge(), $N, "... the in-flight gauge is $N");
# the storing stream has sent tokens but not its end yet
my $tokens_seen = $t->mock_stats->{inflight};
is($tokens_seen, $N, "... $N in flight at the mock");

# Store traffic on /c/ while the kill happens: 60 distinct prompts of
# 300 ms each, over 1.2 s, on both workers (about 15 in flight at any
# moment); the kill comes in the middle.  A store may
# be inside an LMDB write transaction when the kill hits (LMDB's robust
# writer mutex must recover), and some answers are on A (their clients
# lose the connection).
my @store_reqs = map { { %{ $t->chat_req(content => "store traffic $_",
                                         uri => '/c/v1/chat/completions',
                                         headers => ['X-Mock-Delay-Ms' => 300],
                                         timeout => 20) },
                         at_ms => 20 * $_ } } 0 .. 59;
my $bgs = $t->bg_parallel(\@store_reqs, timeout => 30);
sleep 0.6;

my $off = length $t->error_log;
kill 'KILL', $wa;
my $killed = time;

ok($t->wait_until(sub {
    my @w = $t->worker_pids;
    @w == 2 && !grep { $_ == $wa } @w;
}, 10), 'kill -9 of worker A: the master respawned it');
my ($wn) = grep { $_ != $wb } $t->worker_pids;

is($t->get('/ping')->{status}, 200, '... an unguarded location answers');

# the reaper: one notice, and exactly A's 3 leases and 2 queue places
ok($t->wait_until(sub {
    substr($t->error_log, $off)
        =~ /zone "llm": released the in-flight slots and queue places of 1 dead worker\(s\)/
}, 5), "... the reaper released the dead worker's slots and queue places");
cmp_ok(time - $killed, '<', 3, '... within 3 s of the kill');
is(reaped() - $reaped0, 5,
   '... zone_reaped_total grew by 5: 3 in-flight slots and 2 queue places');

# B's waiters are admitted into the freed slots: in flight now are B's
# stream and its 2 waiters, and the gauge says so (not 3 + the dead 3)
ok($t->wait_until(sub { inflight_gauge() == 3 }, 5),
   '... the in-flight gauge falls to 3: what the surviving requests hold')
    or diag 'gauge: ' . inflight_gauge();
ok($t->wait_until(sub { $t->mock_stats->{inflight} == 3 }, 5),
   '... and the mock has exactly those 3 in flight');

# the store traffic: every answer a client got is a complete 200; the
# others were on A and lost their connection (no 5xx, no partial 200)
my $sres = $t->bg_wait($bgs);
my @s_ok = grep { $sres->[$_]{status} == 200 } 0 .. $#$sres;
my @s_bad = grep { $sres->[$_]{status} != 200 } 0 .. $#$sres;
is(scalar(grep { $sres->[$_]{body} !~ /"finish_reason":"stop"/ } @s_ok), 0,
   "store traffic: " . scalar(@s_ok) . " complete 200 answers");
is(scalar(grep { ($sres->[$_]{error} // '') !~ /closed|reset/
                 || $sres->[$_]{got_status} } @s_bad), 0,
   '... the ' . scalar(@s_bad) . ' others lost their connection on A, '
   . 'no error status')
    or diag explain [map { $sres->[$_] } @s_bad];
cmp_ok(scalar @s_ok, '>=', 30, '... most were served');
cmp_ok(scalar @s_bad, '>=', 1, '... (the kill did hit stores in progress)');

# every request sent after the kill is served by the surviving workers,
# guarded location included (not stuck behind the dead worker's slots)
my @new = $t->parallel([map { req("new-$_", h => { 'X-Mock-Delay-Ms' => 100 }) }
                        1 .. $N], timeout => 40);
is(scalar(grep { $_->{status} == 200 && $_->{body} =~ /\[DONE\]/ } @new), $N,
   "$N new guarded requests are served after the kill");

my %res = map { $_ => $t->bg_wait($bg{$_})->[0] } keys %bg;
is(join(' ', map { $res{$_}{status} ? 'ok' : 'lost' } qw(ah1 ah2 as aq1 aq2)),
   'lost lost lost lost lost', "the dead worker's clients lost their connection");
is(join(' ', map { $res{$_}{status} // 0 } qw(bh bq1 bq2)), '200 200 200',
   "the surviving worker's requests, in flight and queued, were served");
my $log = $t->log_by_tag($LOG, qw(bh bq1 bq2));
is(join(' ', map { $log->{$_}{st} // '-' } qw(bq1 bq2)), 'QUEUED QUEUED',
   "... its waiters after waiting for the dead worker's slots");

capacity_is_free('after the kill');

# ------------------------------------------------ the cache after the kill

# The respawned worker opened the environment: no "cannot open", no
# recreation (a killed writer does not corrupt LMDB).
unlike(substr($t->error_log, $off), qr/cannot open|was recreated|read failed/,
       'cache: reopened by the new worker, nothing recreated, no read failure');

# Committed entries: 4 requests each, so that both workers answer some
# (reuseport), the new one included: all HIT with the original bytes.
{
    my @r = map { my $c = $_; map { $t->chat_req(content => $c, stream => 0,
                                                 timeout => 10) } 1 .. 4 }
            sort keys %committed;
    my @res = $t->parallel(\@r, timeout => 20);
    my @cs = sort keys %committed;
    my $hits = grep { $res[$_]{status} == 200 && xcs($res[$_]) eq 'HIT'
                      && $res[$_]{body} eq $committed{ $cs[int($_ / 4)] } } 0 .. $#res;
    is($hits, scalar @res,
       'every entry committed before the kill is a HIT with its bytes');
    my %pids = map { ($_->{headers}{'x-pid'} // 0) => 1 } @res;
    ok($pids{$wn}, '... answered by the respawned worker too')
        or diag explain \%pids;
}

# The store traffic: an answer the surviving worker B delivered, or that
# A delivered well before it died, was committed and is a HIT now.  (A
# client may get the last byte a moment before its worker commits the
# entry: answers from A in the last 200 ms before the kill may be lost.)
{
    my @must = grep { my $h = $sres->[$_]{headers}{'x-pid'} // 0;
                      $h == $wb || $sres->[$_]{end} < $killed - 0.2 } @s_ok;
    my @again = $t->parallel([map { { %{ $store_reqs[$_] }, at_ms => 0 } } 0 .. 59],
                             timeout => 20);
    is(scalar(grep { $_->{status} == 200 } @again), 60,
       'store traffic again: all 60 answered 200');
    is(scalar(grep { xcs($again[$_]) eq 'HIT'
                     && $again[$_]{body} eq $sres->[$_]{body} } @must),
       scalar @must,
       scalar(@must) . ' answers committed before the kill are HITs, same bytes')
        or diag explain [map { [$_, xcs($again[$_])] } @must];
}

# The stream A was capturing when it died: never stored half-written (a
# MISS, not a HIT of a truncated stream), the dead filler's lock does not
# hold the next request back for the 60 s lock_timeout, and the new
# answer is complete and is stored.
{
    my $st = time;
    my $a = $t->http(%{ req('after-store', content => $store_prompt,
                            max_tokens => 40, h => { 'X-Mock-Token-Ms' => 0 }) });
    is(xcs($a), 'MISS', 'the entry being stored at the kill: a MISS, not stored');
    cmp_ok(time - $st, '<', 5, '... not held back by the dead filler\'s lock');
    my @d = DSG::Test::sse_data($a->{body});
    is(scalar(@d), 42, '... a complete stream: 40 tokens, stop, [DONE]');
    is($d[-1], '[DONE]', '... ending with [DONE]');
    my $b = $t->http(%{ req('after-store2', content => $store_prompt,
                            max_tokens => 40) });
    is(xcs($b) . ' ' . ($b->{body} eq $a->{body} ? 'same' : 'differs'),
       'HIT same', '... then stored and served whole');
}

# and the cache keeps storing: a new prompt, MISS then HIT
{
    my $a = $t->chat(content => 'after the kill', stream => 0);
    my $b = $t->chat(content => 'after the kill', stream => 0);
    is(xcs($a) . ' ' . xcs($b), 'MISS HIT', 'a new entry is stored and hit');
}

$t->done;
