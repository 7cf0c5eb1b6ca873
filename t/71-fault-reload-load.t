#!/usr/bin/perl
# Fault injection: `nginx -s reload` ten times under steady load.  A
# background client sends a batch of mixed requests every ~second the
# whole time: cache hits, misses that are admitted or queued behind an
# in-flight cap of 4, SSE streams, a burst that overflows the queue
# (503), a 1r/m key that is over its quota (429) and fresh quota keys.
# Every response must be a complete 200 or a proper 503/429 with
# Retry-After and the JSON error body: no connection reset, no 502/504
# made by nginx, no truncated body.  The shared state survives every
# reload: the 1r/m key stays 429 with a Retry-After that counts down the
# same minute, and the metrics counters account for every response the
# clients saw (a counter reset by a reload would come up short).

use strict;
use warnings;
use Test::More;
use POSIX ();
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $RELOADS = 10;

my $t = DSG::Test->new(workers => 2);
$t->mock_start(capacity => 0, first_token_ms => 50, token_ms => 20, tokens => 5);

$t->write_config(<<'EOF');
    log_format dsg 'tag=$http_x_tag pid=$pid st=$deepseek_guard_status '
                   'status=$status cache=$deepseek_guard_cache_status';

    # one class: a small queue with a short wait, so that bursts produce
    # queued requests and queue-full / expected-wait 503s
    deepseek_guard_class normal queue=4 queue_timeout=3s;
    deepseek_guard_zone llm:1m   key=global inflight=4;
    deepseek_guard_zone quota:1m key=$http_x_user rate=1r/m status=429;
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=cache:1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport backlog=1024;
        access_log %%PREFIX%%/logs/dsg.log dsg;
        proxy_http_version 1.1;
        proxy_buffering off;

        location /v1/ {
            deepseek_guard llm;
            deepseek_guard_cache cache;
            deepseek_guard_cache_valid 200 10m;
            deepseek_guard_cache_status_header X-Cache-Status;
            proxy_pass http://%%MOCK%%;
        }

        # one request per minute and user
        location /q/ {
            deepseek_guard quota;
            proxy_pass http://%%MOCK%%/;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
EOF
$t->start;

# ------------------------------------------------------------ helpers

my @COUNTERS = (
    'deepseek_guard_responses_total{zone="llm",code="2xx"}',
    'deepseek_guard_responses_total{zone="llm",code="5xx"}',
    'deepseek_guard_responses_total{zone="quota",code="2xx"}',
    'deepseek_guard_responses_total{zone="quota",code="4xx"}',
    'deepseek_guard_requests_total{zone="quota",class="normal",decision="rejected_429"}',
    'deepseek_guard_requests_total{zone="llm",class="normal",decision="rejected_503"}',
    'deepseek_guard_requests_total{zone="llm",class="normal",decision="queued"}',
    'deepseek_guard_cache_requests_total{cache="cache",status="hit"}',
);

my $qn = 0;
sub quota_req {
    my ($user, %o) = @_;
    return { %{ $t->chat_req(content => 'quota ' . ++$qn,
                             uri => '/q/v1/chat/completions', timeout => 20,
                             headers => ['X-User' => $user, 'X-Tag' => "q-$qn"]) },
             %o };
}

# A well-formed answer: a complete 200 (a JSON completion or an SSE stream
# up to data: [DONE]), or a 503/429 rejection with Retry-After and the
# OpenAI-shaped JSON error.  Returns '' or what is wrong.
sub wrong {
    my ($r) = @_;
    return 'error: ' . $r->{error} . ' (status ' . ($r->{got_status} // '-') . ')'
        if $r->{error};
    my $s = $r->{status};
    if ($s == 200) {
        my $ct = $r->{headers}{'content-type'} // '';
        if ($ct =~ m{text/event-stream}) {
            return 'stream without [DONE]'
                unless $r->{body} =~ /data: \[DONE\]\n\n\z/;
        } else {
            return 'JSON body incomplete'
                unless $r->{body} =~ /"finish_reason":"stop".*\}\z/s;
        }
        return '';
    }
    if ($s == 503 || $s == 429) {
        my $ra = $r->{headers}{'retry-after'} // '';
        return "$s without a Retry-After >= 1 ('$ra')" unless $ra =~ /^\d+$/ && $ra >= 1;
        return "$s without the JSON error body"
            unless $r->{body} =~ /^\{"error":\{"message":.*"code":"\w+"\}\}\n?\z/s
                   && ($r->{headers}{'content-type'} // '') eq 'application/json';
        return '';
    }
    return "unexpected status $s";
}

# ------------------------------------------------ before the reloads

# three prompts stored: the load's cache hits
my @hot = map { "hot prompt $_" } 1 .. 3;
for my $c (@hot) {
    $t->chat(content => $c);
    # right after the store the entry may still be under its fill lock:
    # COALESCED is a hit from the same entry
    like($t->chat(content => $c)->{headers}{'x-cache-status'},
         qr/^(?:HIT|COALESCED)$/, "'$c' cached");
}

# alice spends her one request of the minute: every later one is 429
my $alice0 = time;
is($t->http(%{ quota_req('alice') })->{status}, 200, 'alice: the 1r/m quota spent');
is($t->http(%{ quota_req('alice') })->{status}, 429, '... the next one is 429');

# the baseline once the log phase has counted the requests above: alice's
# 429 may be counted a moment after she has it, and an llm slot is freed
# after its response is counted
my $m0;
$t->wait_until(sub {
    $m0 = $t->metrics;
    ($m0->{'deepseek_guard_responses_total{zone="quota",code="2xx"}'} // 0)
        + ($m0->{'deepseek_guard_responses_total{zone="quota",code="4xx"}'}
           // 0) == 2
    && $t->zone_idle('llm');
}, 5) or diag('the baseline was scraped before the log phase counted');

# ------------------------------------------------ the load

# The background client: until the stop file appears, one batch after
# another, each spread over ~1 s with at_ms offsets:
#   6 cache hits, 6 misses of 300 ms (admitted or queued, cap 4),
#   3 streams (5 tokens, 20 ms apart), alice (429), a fresh user (200),
#   and at 600 ms a burst of 8 misses at once: more than the 4 slots and
#   the 4 queue places, so some are rejected 503 (queue full or the
#   expected wait over queue_timeout).
my $stop = $t->prefix . '/stop';
my $out  = $t->prefix . '/load.json';
my $loader = fork();
die "fork: $!" unless defined $loader;
if (!$loader) {
    $t->{owner} = 0;        # the child must not clean up the parent's nginx
    my (@all, $b);
    my $n = 0;
    while (!-e $stop && $b++ < 60) {
        my @reqs;
        for my $i (0 .. 5) {
            push @reqs, { %{ $t->chat_req(content => $hot[$i % 3], timeout => 20) },
                          at_ms => 150 * $i, kind => 'hit' };
            push @reqs, { %{ $t->chat_req(content => "miss $$ " . ++$n, timeout => 20,
                                          headers => ['X-Mock-Delay-Ms' => 300]) },
                          at_ms => 150 * $i + 50, kind => 'miss' };
        }
        for my $i (0 .. 2) {
            push @reqs, { %{ $t->chat_req(content => "stream $$ " . ++$n,
                                          stream => 1, timeout => 20) },
                          at_ms => 300 * $i + 100, kind => 'stream' };
        }
        push @reqs, { %{ quota_req('alice') }, at_ms => 400, kind => 'alice' };
        push @reqs, { %{ quota_req("user-$$-" . ++$n) }, at_ms => 500,
                      kind => 'fresh' };
        for my $i (0 .. 7) {
            push @reqs, { %{ $t->chat_req(content => "burst $$ " . ++$n, timeout => 20,
                                          headers => ['X-Mock-Delay-Ms' => 300]) },
                          at_ms => 600, kind => 'burst' };
        }
        my @res = $t->parallel(\@reqs, timeout => 30);
        for my $i (0 .. $#res) {
            my $r = $res[$i];
            push @all, { kind => $reqs[$i]{kind}, status => $r->{status},
                         error => $r->{error}, got_status => $r->{got_status},
                         body => $r->{body}, headers => $r->{headers},
                         start => $r->{start} };
        }
    }
    open(my $fh, '>', "$out.tmp") or POSIX::_exit(1);
    print {$fh} DSG::Test::json_encode(\@all);
    close $fh;
    rename "$out.tmp", $out;
    POSIX::_exit(0);
}

# the reloads, one every ~0.7 s or as soon as the previous generation has
# gone (old workers finish their in-flight and queued requests first)
sleep 1;
my $ok = 0;
my %gens;
for my $i (1 .. $RELOADS) {
    $ok++ if $t->reload(timeout => 20);
    $gens{$_} = 1 for $t->worker_pids;
    sleep 0.7;
}
is($ok, $RELOADS, "$RELOADS reloads under load, each with a new generation of workers");
is(scalar keys %gens, 2 * $RELOADS, '... ' . 2 * $RELOADS . ' new workers in all');
sleep 1;

open(my $sf, '>', $stop) or die "$stop: $!";
close $sf;
waitpid($loader, 0);
my $all = do {
    open(my $fh, '<', $out) or die "no results from the load: $out";
    local $/;
    DSG::Test::json_decode(scalar <$fh>);
};
my $load_end = time;

# ------------------------------------------------ every answer is proper

my (%by, %wrong);
for my $r (@$all) {
    $by{ $r->{kind} }{ $r->{status} }++;
    my $w = wrong($r);
    push @{ $wrong{ $r->{kind} } }, $w if $w;
}
diag join "; ", map { my $k = $_; "$k: " . join(" ", map { "$_ x $by{$k}{$_}" } sort keys %{ $by{$k} }) } sort keys %by;
cmp_ok(scalar @$all, '>=', 10 * 25, scalar(@$all) . ' requests during the reloads');
is(scalar(map { @$_ } values %wrong), 0,
   'every response is a complete 200 or a 503/429 with Retry-After and a '
   . 'JSON error: no reset, no 502, no truncated body')
    or diag explain \%wrong;

# the load really ran across the generations: the access log names the
# worker of every request
{
    my %pids;
    open(my $fh, '<', $t->prefix . '/logs/dsg.log') or die;
    while (<$fh>) { $pids{$1} = 1 if /pid=(\d+) / }
    cmp_ok(scalar keys %pids, '>=', $RELOADS,
           'the load was served by ' . scalar(keys %pids) . ' different workers');
}

is_deeply([sort keys %{ $by{hit} }], [200], 'cache hits: all 200');
is(scalar(grep { ($_->{headers}{'x-cache-status'} // '') eq 'HIT' }
          grep { $_->{kind} eq 'hit' } @$all),
   $by{hit}{200}, '... all of them HIT: the cache served through the reloads');
ok(!grep({ $_ != 200 && $_ != 503 } keys %{ $by{stream} }), 'streams: 200 or 503 only');
is_deeply([sort keys %{ $by{fresh} }], [200], 'fresh quota keys: all admitted');
ok(!grep({ $_ != 200 && $_ != 503 } keys %{ $by{miss} }), 'misses: 200 or 503 only');
ok(!grep({ $_ != 200 && $_ != 503 } keys %{ $by{burst} }), 'bursts: 200 or 503 only');
cmp_ok($by{burst}{503} // 0, '>=', 1, '... the bursts overflowed the queue: 503s');
cmp_ok($by{miss}{200} + ($by{burst}{200} // 0), '>=', 10 * 8,
       '... while most misses were served');

# ------------------------------------------------ the 1r/m bucket survived

{
    my @al = grep { $_->{kind} eq 'alice' } @$all;
    is_deeply([sort keys %{ $by{alice} }], [429],
              'alice (1r/m, spent before the reloads): 429 through all '
              . scalar(@al) . ' requests and ' . $RELOADS . ' reloads');
    # the wait announced counts down the same minute: never more than
    # what is left of it (a bucket reset to full would admit her; a
    # bucket recreated empty would announce a fresh minute)
    my @bad = grep { $_->{headers}{'retry-after'} > 60 - ($_->{start} - $alice0) + 1 } @al;
    is(scalar @bad, 0, '... Retry-After counts down the minute she spent')
        or diag explain [map { [$_->{start} - $alice0, $_->{headers}{'retry-after'}] } @bad];
    my $r = $t->http(%{ quota_req('alice') });
    is($r->{status}, 429, '... and after the last reload: still 429');
}

# ------------------------------------------------ the counters survived

{
    my $n2 = scalar grep { $_->{status} == 200 && $_->{kind} =~ /hit|miss|stream|burst/ } @$all;
    my $n5 = scalar grep { $_->{status} == 503 } @$all;
    my $q2 = scalar grep { $_->{status} == 200 && $_->{kind} eq 'fresh' } @$all;
    my $q4 = scalar grep { $_->{status} == 429 } @$all;
    my $hits = scalar grep { ($_->{headers}{'x-cache-status'} // '') eq 'HIT' } @$all;
    # responses are counted in the log phase, which may run a moment after
    # a client has read its last byte: wait (briefly) for the last ones
    my ($m1, %d);
    $t->wait_until(sub {
        $m1 = $t->metrics;
        %d = map { $_ => ($m1->{$_} // 0) - ($m0->{$_} // 0) } @COUNTERS;
        $d{'deepseek_guard_responses_total{zone="llm",code="2xx"}'}
            + $d{'deepseek_guard_responses_total{zone="llm",code="5xx"}'} >= $n2 + $n5
        && $d{'deepseek_guard_responses_total{zone="quota",code="2xx"}'}
            + $d{'deepseek_guard_responses_total{zone="quota",code="4xx"}'} >= $q2 + $q4 + 1;
    }, 5);
    is($d{'deepseek_guard_responses_total{zone="llm",code="2xx"}'}, $n2,
       "llm responses 2xx: +$n2, every 200 the clients got");
    is($d{'deepseek_guard_responses_total{zone="llm",code="5xx"}'}, $n5,
       "llm responses 5xx: +$n5, every 503 the clients got");
    is($d{'deepseek_guard_requests_total{zone="llm",class="normal",decision="rejected_503"}'},
       $n5, "llm rejected_503: +$n5");
    cmp_ok($d{'deepseek_guard_requests_total{zone="llm",class="normal",decision="queued"}'},
           '>=', 1, '... and requests were queued meanwhile');
    is($d{'deepseek_guard_responses_total{zone="quota",code="2xx"}'}, $q2,
       "quota responses 2xx: +$q2");
    is($d{'deepseek_guard_responses_total{zone="quota",code="4xx"}'}, $q4 + 1,
       "quota responses 4xx: +" . ($q4 + 1) . " (every 429, and one after the load)");
    is($d{'deepseek_guard_requests_total{zone="quota",class="normal",decision="rejected_429"}'},
       $q4 + 1, '... rejected_429 the same');
    is($d{'deepseek_guard_cache_requests_total{cache="cache",status="hit"}'}, $hits,
       "cache hits: +$hits");
    # and no counter went backwards across the reloads
    my @back = grep { /_total\{/ && ($m1->{$_} // 0) < $m0->{$_} } keys %$m0;
    is(scalar @back, 0, 'no counter is lower than before the reloads')
        or diag explain \@back;
}

# the queue is empty and every slot is back: 4 slow requests at once are
# all admitted without waiting
{
    ok($t->wait_until(sub { $t->zone_idle('llm') }, 10),
       'after the load: in-flight and queue depth back to 0');
    $t->mock_reset;
    my @res = $t->parallel([map { $t->chat_req(content => "cap $_", timeout => 10,
                                               headers => ['X-Mock-Delay-Ms' => 1000,
                                                           'X-Tag' => "cap-$_"]) }
                            1 .. 4], timeout => 15);
    is(scalar(grep { $_->{status} == 200 } @res), 4, '... 4 slow requests served');
    is($t->mock_stats->{max_inflight}, 4, '... all 4 in flight together');
}

$t->done;
