#!/usr/bin/perl
# Large hits sent from LMDB's map without a copy (a pinned read, issue 18),
# and what keeps them exact and the cache writable:
#
#   A  hits are sent from the map (any size): a 300 KB answer is a
#      HIT with the same bytes, from every worker, many times;
#   B  a slow client (limit_rate: 6 KB/s, so a 300 KB hit takes 50 s)
#      does not hold the pin: what is left to send waits in the write
#      filter and is copied out at once.  Meanwhile 40 answers of 300 KB
#      (12 MB) go through a 4 MB cache: every one is stored (LMDB cannot
#      reuse the pages freed while a read lasts, so a pin held for the 50 s
#      would make the stores fail with a full map), and the slow client
#      gets its 300 KB exactly;
#   C  a hit held back by another filter (add_before_body: the body waits
#      in the postpone filter for a 2.5 s subrequest) keeps its pin until
#      the request ends: the same churn meanwhile cannot change its bytes;
#      stores may fail while it lasts, and succeed again after it;
#   D  kill -9 of the worker in the middle of C: the dead worker's reader
#      slot is cleared (the sweep's mdb_reader_check) and the next stores
#      succeed.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);
$t->allow_log(qr/worker process \d+ exited on signal 9/);
$t->allow_log(qr/shared memory zone "(?:llm)" was locked by \d+/);
# stores while C's pin lasts: the map is full of pages not yet reusable
$t->allow_log(qr/deepseek_guard cache "llm": response not stored: /);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

my $PAD = 300_000;

$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m max_size=4m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        add_header X-Worker $pid always;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 10m;
        # one entry whichever location asks
        deepseek_guard_cache_key "$request_method|$deepseek_guard_auth_sha256|$deepseek_guard_body_sha256";
        proxy_http_version 1.1;

        location = /metrics {
            deepseek_guard_cache off;
            deepseek_guard_metrics;
        }

        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }

        # B: the same entries, sent at 6 KB/s
        location /slow/ {
            limit_rate 6k;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # C: the same cache, the body held back behind a slow subrequest
        location /add/ {
            add_before_body /delay;
            addition_types *;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location = /delay {
            deepseek_guard_cache off;
            proxy_method POST;
            proxy_set_header Content-Type application/json;
            proxy_set_header X-Mock-Delay-Ms 2500;
            proxy_set_header X-Mock-Pad 0;
            proxy_set_body '{"model":"deepseek-chat","messages":[{"role":"user","content":"delay"}],"max_tokens":1}';
            proxy_pass http://%%MOCK%%/v1/chat/completions;
        }
    }
EOF
$t->start;

sub req {
    my ($content, %o) = @_;
    my $pad = delete $o{pad} // $PAD;
    return $t->chat_req(content => $content, timeout => 60,
                        headers => ['X-Mock-Pad' => $pad], %o);
}

sub pad_of {
    my ($body) = @_;
    my $d = DSG::Test::json_decode($body // '');
    return ref $d ? length($d->{pad} // '') : -1;
}

sub metric {
    my ($name) = @_;
    my $m = $t->scrape or return undef;
    return $m->{"deepseek_guard_cache_${name}{cache=\"llm\"}"} // 0;
}

# n distinct answers of $PAD bytes through /v1/, one at a time: how many
# came back whole (the cache status does not matter); $at->{$i}: the time
# the i-th was answered
sub churn {
    my ($tag, $n, $at) = @_;
    my $whole = 0;
    for my $i (1 .. $n) {
        my $r = $t->http(%{ req("churn $tag $i") });
        $whole++ if $r->{status} == 200 && pad_of($r->{body}) == $PAD;
        $at->{$i} = time if $at;
    }
    return $whole;
}

# ------------------------------------------------ A: hits from the map

my $a0 = $t->http(%{ req('pinned A') });
is($a0->{status} . ' ' . ($a0->{headers}{'x-cache-status'} // '-'),
   '200 MISS', 'A: a 300 KB answer, MISS');
is(pad_of($a0->{body}), $PAD, '... whole');
ok($t->wait_until(sub { (metric('stores_total') // 0) == 1 }, 10),
   '... stored');

my (%seen, $same, $hits);
for (1 .. 40) {
    my $r = $t->http(%{ req('pinned A') });
    $hits++ if ($r->{headers}{'x-cache-status'} // '') eq 'HIT';
    $same++ if $r->{body} eq $a0->{body};
    $seen{ $r->{headers}{'x-worker'} // '-' } = 1;
}
is($hits, 40, 'A: 40 HITs');
is($same, 40, '... each the same 300 KB');
is(scalar keys %seen, 2, '... from both workers');

# ------------------------------------------------ B: a slow client

{
    my $s0 = metric('stores_total');
    my $f0 = metric('store_failures_total');

    my $bg = $t->bg_parallel([req('pinned A', timeout => 150,
                                  uri => '/slow/chat/completions')],
                             timeout => 150);
    sleep 0.3;
    my $t0 = time;
    my %at;
    my $whole = churn('B', 40, \%at);
    my ($slow) = @{ $t->bg_wait($bg) };

    is($whole, 40, 'B: 40 answers of 300 KB while a slow client has a '
                   . '300 KB hit: all whole');
    ok($t->wait_until(sub { metric('stores_total') == $s0 + 40 }, 10),
       '... all 40 stored (' . (metric('stores_total') - $s0) . ')');
    is(metric('store_failures_total') - $f0, 0, '... no store failed');
    is(($slow->{status} // 0) . ' ' . ($slow->{headers}{'x-cache-status'}
                                       // '-'),
       '200 HIT', 'B: the slow client: a HIT');
    ok($slow->{body} eq $a0->{body}, '... the same 300 KB');
    # 20 answers of 300 KB fill the 4 MB map several times over: enough to
    # fail if the pin were held
    cmp_ok($slow->{end}, '>', $at{20},
           sprintf('... still being sent after the 20th of them (%.1f s; '
                   . 'the 20th at %.1f s, the 40th at %.1f s)',
                   $slow->{end} - $slow->{start}, $at{20} - $t0,
                   $at{40} - $t0));
}

# ------------------------------------------------ C: held by a filter

my $c0 = $t->http(%{ req('pinned C') });
is(pad_of($c0->{body}), $PAD, 'C: another 300 KB answer');
ok($t->wait_until(sub { $t->http(%{ req('pinned C') })->{headers}
                           {'x-cache-status'} eq 'HIT' }, 10),
   '... stored: a HIT');

{
    my $bg = $t->bg_parallel([req('pinned C', uri => '/add/chat/completions')],
                             timeout => 60);
    sleep 0.5;
    my $whole = churn('C', 20);
    my ($held) = @{ $t->bg_wait($bg) };
    note('C: stores failed while the pin lasted: '
         . (metric('store_failures_total') // '?'));

    is($whole, 20, 'C: 20 answers of 300 KB while a hit waits behind a '
                   . 'subrequest: all whole');
    is($held->{status} . ' ' . ($held->{headers}{'x-cache-status'} // '-'),
       '200 HIT', 'C: the held hit: a HIT');
    my $i = index($held->{body}, $c0->{body});
    ok($i > 0 && $i + length($c0->{body}) == length($held->{body}),
       '... its body is the subrequest\'s answer, then the same 300 KB');

    my $f0 = metric('store_failures_total');
    is(churn('C after', 10), 10, 'C: after it, 10 more answers whole');
    ok($t->wait_until(sub {
           metric('store_failures_total') == $f0
           && $t->http(%{ req('churn C after 10') })->{headers}
                  {'x-cache-status'} eq 'HIT' }, 10),
       '... stored without failures');
}

# ------------------------------------------------ D: kill -9 while pinned

{
    my $bg = $t->bg_parallel([req('pinned C', uri => '/add/chat/completions')],
                             timeout => 60);
    my $victim;
    ok($t->wait_until(sub {
           my %c = $t->worker_conns($t->mock_port);
           ($victim) = grep { $c{$_}[0] > 0 } keys %c;
           defined $victim }, 10),
       'D: a worker sends the held hit (its subrequest is at the mock)');
    kill 'KILL', $victim;
    $t->bg_wait($bg);

    ok($t->wait_until(sub { !grep { $_ == $victim } $t->worker_pids }, 10),
       '... killed');
    # the sweep clears the dead reader slot within a second or two: until
    # then stores may find the map full; once one succeeds, all do
    my $n = 0;
    ok($t->wait_until(sub {
           my $s0 = metric('stores_total');
           churn('D wait ' . ++$n, 1);
           $t->wait_until(sub { metric('stores_total') > $s0 }, 2);
       }, 20), "D: stores succeed again ($n tries)");
    my $f0 = metric('store_failures_total');
    is(churn('D', 20), 20, 'D: then 20 answers of 300 KB, whole');
    is(metric('store_failures_total') - $f0, 0, '... all stored');
    my $r = $t->http(%{ req('pinned C') });
    is(pad_of($r->{body}), $PAD, '... and the cache still answers whole');
}

$t->check_log;
done_testing();
