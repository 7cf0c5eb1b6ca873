#!/usr/bin/perl
# deepseek_guard_cache_use_stale: an expired entry (kept for "inactive")
# answers instead of an upstream 503 / 429 / 504 / refused connection, and
# instead of a guard rejection (overload); "updating" answers while another
# request refills the entry; without use_stale the client gets the error;
# past "inactive" there is nothing stale to serve; a fresh hit costs no
# admission capacity.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use List::Util qw(max);
use Time::HiRes qw(sleep);

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 3);

# valid 1s everywhere: an entry expires 1 s after it was stored and stays
# servable stale for inactive=1m (cache "llm") or only 1s (cache "brief").
# The guard zones allow 1 request a minute for the whole location (constant
# key): the second request within the minute is rejected (503).
$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m inactive=1m;
    deepseek_guard_cache_path %%PREFIX%%/brief keys_zone=brief:1m inactive=1s;
    deepseek_guard_zone ov:1m   key=backend rate=1r/m;
    deepseek_guard_zone ov2:1m  key=backend rate=1r/m;
    deepseek_guard_zone q429:1m key=backend rate=1r/m status=429;
    log_format st '$status "$deepseek_guard_cache_status" '
                  '"$deepseek_guard_status" $uri tag=$http_x_tag';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log st;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache_valid 200 1s;
        deepseek_guard_cache llm;
        proxy_http_version 1.1;
        proxy_read_timeout 1s;
        proxy_connect_timeout 1s;

        # stale on every upstream failure
        location /v1/ {
            deepseek_guard_cache_use_stale error timeout http_500 http_502
                                           http_503 http_504 http_429;
            proxy_pass http://%%MOCK%%;
        }

        # no use_stale: the failure reaches the client
        location /nostale/ {
            proxy_pass http://%%MOCK%%/v1/;
        }

        # an entry kept only 1 s past its expiry
        location /brief/ {
            deepseek_guard_cache brief;
            deepseek_guard_cache_use_stale error http_503;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # the guard in front: stale instead of its rejection
        location /guard/ {
            deepseek_guard ov;
            deepseek_guard_cache_use_stale overload;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # a quota zone: its rejection is a 429
        location /guard429/ {
            deepseek_guard q429;
            deepseek_guard_cache_use_stale overload;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /guard-nostale/ {
            deepseek_guard ov2;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # every status cached: still never nginx's own error pages
        location /any/ {
            deepseek_guard_cache_valid any 1m;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # stale while another request refills the entry
        location /updating/ {
            deepseek_guard_cache_use_stale updating;
            proxy_pass http://%%MOCK%%/v1/;
        }
    }
EOF
$t->start;


# the cache status a client saw, COALESCED counted as a HIT (see
# DSG::Test::cache_status)
sub xcs { DSG::Test::cache_status($_[0]) }

my $tagn = 0;

sub chat {
    my (%o) = @_;
    return $t->cache_chat('x' . ++$tagn, %o);
}

# "<status> <cache status> <guard status>" from the access log
sub logged {
    my ($tag) = @_;
    $t->wait_until(sub { $t->access_log =~ /tag=\Q$tag\E$/m }, 3);
    my @f = $t->access_log =~ /^(\d+) "([^"]*)" "([^"]*)" \S+ tag=\Q$tag\E$/m;
    $f[1] = 'HIT' if @f && $f[1] eq 'COALESCED';    # see xcs()
    return @f ? join(' ', map { length $_ ? $_ : '-' } @f) : '?';
}

sub calls { $t->mock_stats->{chat_requests} }

# store one entry per location, then let them all expire (valid 1s)
my %e;
for my $loc (qw(v1 nostale brief updating)) {
    $e{$loc} = chat(uri => "/$loc/chat/completions", content => "stale $loc");
    is("$e{$loc}{status} $e{$loc}{cache}", '200 MISS', "/$loc/: stored");
}

# the guard locations: the first request uses the minute's only token
$e{guard} = chat(uri => '/guard/chat/completions', content => 'stale guard');

# ------------------------------------------------ fresh hits cost nothing

{
    # within the TTL: hits, although the zone has no token left (a request
    # needing admission would be rejected: see below); sent at once, the
    # entry is valid for 1 s only
    my @h = map { chat(uri => '/guard/chat/completions', content => 'stale guard') } 1 .. 3;
    is(logged($e{guard}{tag}), '200 MISS ADMITTED', '/guard/: admitted and stored');
    is(scalar(grep { logged($_->{tag}) eq '200 HIT CACHED' } @h), 3,
       'fresh hits behind an empty zone: 200, HIT, guard status CACHED');
}

# the other guard locations, stored the same way
$e{guard429} = chat(uri => '/guard429/chat/completions', content => 'stale guard');
is(logged($e{guard429}{tag}), '200 MISS ADMITTED', '/guard429/: admitted and stored');
$e{guardns} = chat(uri => '/guard-nostale/chat/completions', content => 'stale guard');
is(logged($e{guardns}{tag}), '200 MISS ADMITTED', '/guard-nostale/: admitted and stored');


sleep 2.5;

# ------------------------------------------------ guard overload

{
    my $r = chat(uri => '/guard/chat/completions', content => 'stale guard');
    is($r->{status}, 200, 'expired entry, guard rejects: 200 from the stale entry');
    is($r->{cache}, 'STALE', '... X-Cache-Status: STALE');
    is(logged($r->{tag}), '200 STALE STALE',
       '... $deepseek_guard_cache_status and $deepseek_guard_status STALE');
    is($r->{body}, $e{guard}{body}, '... the stored answer');
    is($r->{headers}{'content-type'}, 'application/json', '... its content type');
    ok(!exists $r->{headers}{'retry-after'}, '... not a rejection (no Retry-After)');

    # the same instead of a quota zone's 429
    my $q = chat(uri => '/guard429/chat/completions', content => 'stale guard');
    is(logged($q->{tag}), '200 STALE STALE', 'instead of a 429 rejection: 200 STALE');
    is($q->{body}, $e{guard429}{body}, '... the stored answer');
    my $q2 = chat(uri => '/guard429/chat/completions', content => 'no entry 429');
    is($q2->{status}, 429, '... no entry: the 429');

    # a prompt with no entry at all: the guard's rejection goes out
    my $n = chat(uri => '/guard/chat/completions', content => 'never stored');
    is($n->{status}, 503, 'no entry, guard rejects: 503');
    like($n->{body}, qr/overloaded/, '... the guard\'s rejection');

    # without use_stale: the client gets the guard's 503
    my $s = chat(uri => '/guard-nostale/chat/completions', content => 'stale guard');
    is($s->{status}, 503, 'without use_stale: the guard\'s 503');
    ok($s->{headers}{'retry-after'}, '... with Retry-After');
    is(logged($s->{tag}), '503 EXPIRED REJECTED', '... logged EXPIRED, REJECTED');
}

# ------------------------------------------------ upstream 503 / 429 / 504

{
    $t->mock_reset;
    $t->mock_config({ force_status => 503 });

    my $r = chat(content => 'stale v1');
    is($r->{status}, 200, 'upstream 503 (force_status): 200 from the stale entry');
    is($r->{cache}, 'STALE', '... X-Cache-Status: STALE');
    like(logged($r->{tag}), qr/^200 STALE /, '... $deepseek_guard_cache_status STALE');
    is($r->{body}, $e{v1}{body}, '... the stored answer, not the error body');
    is($r->{headers}{'content-type'}, 'application/json', '... its content type');
    is(calls(), 1, '... the upstream was asked');
    like($t->error_log, qr/upstream answered 503, serving the stale entry/, '... logged');

    # still expired: every request asks the upstream again (no refresh)
    my $r2 = chat(content => 'stale v1');
    is("$r2->{status} $r2->{cache}", '200 STALE', '... again STALE');
    is(calls(), 2, '... after asking the upstream again');

    my $ns = chat(uri => '/nostale/chat/completions', content => 'stale nostale');
    is($ns->{status}, 503, 'without use_stale: the upstream 503');
    like($ns->{body}, qr/Server is busy/, '... its body');
    is($ns->{cache}, 'EXPIRED', '... X-Cache-Status: EXPIRED');

    $t->mock_config({ force_status => 0 });

    # 429 and a timeout (proxy_read_timeout 1s) are stale-served as well
    my $q = chat(content => 'stale v1', headers => ['X-Mock-Status' => 429]);
    is("$q->{status} $q->{cache}", '200 STALE', 'upstream 429: STALE');
    my $to = chat(content => 'stale v1', headers => ['X-Mock-Delay-Ms' => 3000],
                  timeout => 10);
    is("$to->{status} $to->{cache}", '200 STALE', 'upstream timeout (504): STALE');
    is($to->{body}, $e{v1}{body}, '... the stored answer');

    # the upstream recovers: the expired entry is refreshed
    my $ok = chat(content => 'stale v1');
    is("$ok->{status} $ok->{cache}", '200 EXPIRED', 'upstream back: EXPIRED, refetched');
    is(chat(content => 'stale v1')->{cache}, 'HIT', '... stored again: HIT');
}

# ------------------------------------------------ valid any

{
    # an error status the upstream itself sent is stored under "valid any"
    my @a = map { chat(uri => '/any/chat/completions', content => 'any 429',
                       headers => ['X-Mock-Status' => 429]) } 1 .. 2;
    is(join(' ', map { "$_->{status} $_->{cache}" } @a), '429 MISS 429 HIT',
       'valid any: an upstream 429 is stored');
}

# ------------------------------------------------ updating

{
    $t->mock_reset;

    # the first request refills the expired entry slowly (700 ms, under
    # proxy_read_timeout); the others come 200 ms later and are answered
    # stale at once
    my @r = map { $t->chat_req(uri => '/updating/chat/completions',
                               content => 'stale updating', timeout => 10,
                               headers => ['X-Tag' => "upd-$_"]) } 1 .. 6;
    push @{ $r[0]{headers} }, ['X-Mock-Delay-Ms', 700];
    $_->{at_ms} = 200 for @r[1 .. $#r];
    my @res = $t->parallel(\@r, timeout => 20);
    is($res[0]{headers}{'x-cache-status'}, 'EXPIRED', 'updating: the refill (EXPIRED)');
    is(scalar(grep { ($_->{headers}{'x-cache-status'} // '') eq 'STALE'
                     && $_->{status} == 200 } @res[1 .. 5]), 5,
       '... the others: 200 STALE');
    cmp_ok(max(map { $_->{ms} } @res[1 .. 5]), '<', 500, '... at once');
    is(scalar(grep { $_->{body} eq $e{updating}{body} } @res), 6, '... same answer');
    is(calls(), 1, '... one upstream call');
}

# ------------------------------------------------ past inactive

{
    # cache "brief" keeps an expired entry 1 s: 2.5 s after the store
    # there is nothing left to serve stale
    $t->mock_config({ force_status => 503 });
    my $b = chat(uri => '/brief/chat/completions', content => 'stale brief');
    is($b->{status}, 503, 'past inactive: no stale entry, the upstream 503');
    is($b->{cache}, 'MISS', '... a MISS');
    $t->mock_config({ force_status => 0 });
}

# ------------------------------------------------ the upstream is gone

{
    # connection refused: nginx's own 502, replaced by the stale entry
    $t->mock_stop;
    # the refreshed entry above is fresh for 1 s: wait until it expired
    sleep 1.5;
    my $r = chat(content => 'stale v1');
    is($r->{status}, 200, 'mock stopped (connection refused): 200');
    is($r->{cache}, 'STALE', '... STALE');
    like(logged($r->{tag}), qr/^200 STALE /, '... logged STALE');
    is($r->{body}, $e{v1}{body}, '... the stored answer');

    my $ns = chat(uri => '/nostale/chat/completions', content => 'stale nostale');
    is($ns->{status}, 502, 'without use_stale: 502');

    # "valid any" caches what the upstream answers, but a 502 that nginx
    # made up because there was no upstream must not be served for a
    # minute once the upstream is back
    my @a = map { chat(uri => '/any/chat/completions', content => 'any status') } 1 .. 2;
    is_deeply([map { $_->{status} } @a], [502, 502], 'valid any, upstream down: 502');
    is_deeply([map { $_->{cache} } @a], [qw(MISS MISS)],
              '... nginx\'s own 502 is not stored');
}

$t->done;
