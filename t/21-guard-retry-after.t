#!/usr/bin/perl
# deepseek_guard rejections: Retry-After / retry-after-ms are present, in
# the OpenAI error shape, and honest: a client that waits what it was told
# is admitted, one that comes back early is not; x-should-retry: false only
# for waits beyond 60 s; RateLimit headers only when enabled.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use POSIX qw(ceil);
use Time::HiRes qw(time sleep);

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 10, token_ms => 1, tokens => 2);

my $common = <<'EOF';
    map $http_authorization $api_key {
        "~^Bearer\s+(?<k>\S+)$"  $k;
        default                  "";
    }
EOF

# Static files (root) answer in the content phase, after the guard's access
# phase; "return" would answer before the guard runs.  reuseport spreads the
# connections over both workers: a retry often lands on the other worker
# than the rejection it follows.
$t->write_config($common . <<'EOF');
    # one token every 4 s: long enough to retry "early" at half of it with
    # a 2 s margin for a slow machine
    deepseek_guard_zone q429:1m   key=$api_key rate=15r/m status=429;
    deepseek_guard_zone min429:1m key=$api_key rate=1r/m status=429;
    deepseek_guard_zone r503:1m   key=$api_key rate=1r/s;
    deepseek_guard_zone inf503:1m key=$api_key inflight=1;
    deepseek_guard_zone inf429:1m key=$api_key inflight=1 status=429;
    deepseek_guard_zone hdr:1m    key=$api_key rate=1r/m status=429;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        root %%PREFIX%%/html;

        location /q429    { deepseek_guard q429; }
        location /min429  { deepseek_guard min429; }
        location /r503    { deepseek_guard r503; }
        location /hdr-on  { deepseek_guard hdr;
                            deepseek_guard_ratelimit_headers on; }
        location /hdr-off { deepseek_guard hdr; }

        location /v1/ {
            deepseek_guard inf503;
            proxy_pass http://%%MOCK%%;
        }

        location /quota/v1/ {
            deepseek_guard inf429;
            proxy_pass http://%%MOCK%%/v1/;
        }
    }
EOF

mkdir $t->prefix . '/html';
for my $f (qw(q429 min429 r503 hdr-on hdr-off)) {
    open(my $fh, '>', $t->prefix . "/html/$f") or die "$f: $!";
    print {$fh} "ok\n";
    close $fh;
}
$t->start;

sub get_key {
    my ($uri, $key) = @_;
    return $t->get($uri, Authorization => "Bearer $key");
}

# sleeps at least $ms milliseconds (never returns early, e.g. on a signal)
sub sleep_ms {
    my ($ms) = @_;
    my $until = time() + $ms / 1000;
    while ((my $left = $until - time()) > 0) {
        sleep($left);
    }
}

# What every rejection must carry, whatever the zone: the status, an
# integer Retry-After >= 1 that is retry-after-ms rounded up to seconds
# (so Retry-After * 1000 - retry-after-ms is in [0, 1000)), x-should-retry:
# false exactly when the wait is over 60 s, and the OpenAI error JSON.
# Returns (Retry-After, retry-after-ms).
sub check_reject {
    my ($r, $status, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $h = $r->{headers};
    my ($type, $code) = $status == 429 ? ('requests', 'rate_limit_exceeded')
                                       : ('server_error', 'server_overloaded');
    is($r->{status}, $status, "$name: $status");
    my $ra = $h->{'retry-after'} // '';
    my $ms = $h->{'retry-after-ms'} // '';
    like($ra, qr/^[1-9]\d*$/, "$name: Retry-After is an integer >= 1");
    like($ms, qr/^[1-9]\d*$/, "$name: retry-after-ms is an integer >= 1");
    $ra = 0 unless $ra =~ /^\d+$/;
    $ms = 0 unless $ms =~ /^\d+$/;
    ok($ra * 1000 - $ms >= 0 && $ra * 1000 - $ms < 1000,
       "$name: Retry-After is retry-after-ms rounded up ($ra s, $ms ms)");
    is($h->{'x-should-retry'}, $ms > 60000 ? 'false' : undef,
       "$name: x-should-retry " . ($ms > 60000 ? 'false' : 'absent'));
    like($h->{'content-type'} // '', qr{^application/json\b},
         "$name: application/json");
    my $j = DSG::Test->json_decode($r->{body});
    ok(ref $j eq 'HASH' && ref $j->{error} eq 'HASH'
       && ($j->{error}{message} // '') ne '', "$name: JSON error with a message")
        or diag $r->{body};
    is($j->{error}{type}, $type, "$name: type $type");
    is($j->{error}{code}, $code, "$name: code $code");
    return ($ra, $ms);
}

# ------------------------------------------- a bucket-limited key, 429

{
    is(get_key('/q429', 'k-q')->{status}, 200, '15r/m: the only token');

    my $r = get_key('/q429', 'k-q');
    my ($ra, $ms) = check_reject($r, 429, '15r/m at once');
    # the next token is 4 s after the first request
    cmp_ok($ms, '>', 3000, '... retry-after-ms close to 4 s (> 3000)');
    cmp_ok($ms, '<=', 4000, '... and not above 4000');

    # Half of the announced wait: the hint is not pessimistic padding, the
    # bucket really has no token yet.  The rejection does not consume
    # anything, and the new hint is shorter by the time waited: the hint is
    # computed, not a constant.
    my $half = int($ms / 2);
    sleep_ms($half);
    $r = get_key('/q429', 'k-q');
    my ($ra2, $ms2) = check_reject($r, 429, 'retry at 50%');
    cmp_ok($ms2, '<', $ms, '... the new retry-after-ms is shorter');
    cmp_ok($ms2, '<=', $ms - $half + 5, '... by (at least) the time waited')
        or diag "first $ms ms, waited $half ms, now $ms2 ms";

    # waiting exactly what the last answer said is enough
    sleep_ms($ms2);
    is(get_key('/q429', 'k-q')->{status}, 200,
       "waited exactly retry-after-ms ($ms2): admitted");

    # and so is waiting the whole seconds of Retry-After
    $r = get_key('/q429', 'k-q');
    ($ra, $ms) = check_reject($r, 429, 'right after');
    sleep_ms($ra * 1000);
    is(get_key('/q429', 'k-q')->{status}, 200,
       "waited exactly Retry-After ($ra s): admitted");
}

# ------------------------------------------------------------ 1r/m, 429

{
    is(get_key('/min429', 'k-m')->{status}, 200, '1r/m: the token');
    my ($ra, $ms) = check_reject(get_key('/min429', 'k-m'), 429, '1r/m');
    cmp_ok($ra, '>', 50, '... Retry-After close to 60 (> 50)');
    cmp_ok($ra, '<=', 60, '... and not above 60');
    cmp_ok($ms, '>', 50000, '... retry-after-ms > 50000');
}

# ------------------------------------------- a bucket-limited key, 503

# status 503 (the default) and the implicit class, which never queues:
# rejected at once, as "server overloaded"; the wait is still honest
{
    is(get_key('/r503', 'k-r')->{status}, 200, '1r/s 503 zone: the token');
    my ($ra, $ms) = check_reject(get_key('/r503', 'k-r'), 503, '1r/s 503');
    cmp_ok($ms, '>', 500, '... retry-after-ms close to 1 s');
    sleep_ms($ms);
    is(get_key('/r503', 'k-r')->{status}, 200,
       "waited exactly retry-after-ms ($ms): admitted");
}

# ------------------------------------------------- in-flight cap, 503

# one slow request holds the key's only in-flight slot for 1.5 s; a second
# one 300 ms later is rejected, with the same headers and body
{
    my @res = $t->parallel([
        $t->chat_req(key => 'k-i', headers => ['X-Mock-Delay-Ms' => 1500]),
        { %{ $t->chat_req(key => 'k-i') }, at_ms => 300 },
    ], timeout => 20);
    is($res[0]{status}, 200, 'inflight=1: the slow request passes');
    check_reject($res[1], 503, 'inflight=1, second request');
    ok($res[1]{ms} < 1000, '... rejected at once, not after the slow one')
        or diag "took $res[1]{ms} ms";
    # the slot is freed in the log phase, just after the client has the
    # whole answer: a request sent at once may reach the other worker first
    my $st;
    $t->wait_until(sub { ($st = $t->chat(key => 'k-i')->{status}) == 200 }, 2);
    is($st, 200, '... once it is done: 200');
}

# ------------------------------------------------- in-flight quota, 429

# The same with status=429, a per-key concurrency quota: rejected at once,
# never queued.  The slot stays taken for another 1.2 s; the hint must be
# an estimate of that order (the 503 zone above says 1000 ms, the mean
# in-flight time it assumes without history), not "1 ms", which tells an
# SDK to retry immediately, again and again.
{
    my $uri = '/quota/v1/chat/completions';
    my @res = $t->parallel([
        $t->chat_req(key => 'k-iq', uri => $uri,
                     headers => ['X-Mock-Delay-Ms' => 1500]),
        { %{ $t->chat_req(key => 'k-iq', uri => $uri) }, at_ms => 300 },
    ], timeout => 20);
    is($res[0]{status}, 200, 'inflight=1 status=429: the slow request passes');
    my ($ra, $ms) = check_reject($res[1], 429, 'inflight=1 status=429, second');
    cmp_ok($ms, '>=', 100, '... retry-after-ms is a real estimate (>= 100 ms)');
    ok($res[1]{ms} < 1000, '... rejected at once, not after the slow one')
        or diag "took $res[1]{ms} ms";
}

# ------------------------------------------------------- RateLimit headers

{
    is(get_key('/hdr-on', 'k-h1')->{status}, 200, 'ratelimit headers on: 200');
    my $r = get_key('/hdr-on', 'k-h1');
    my ($ra) = check_reject($r, 429, 'ratelimit headers on');
    like($r->{headers}{'ratelimit-policy'} // '', qr/^"hdr";q=\d+;w=\d+$/,
         '... RateLimit-Policy: "hdr";q=..;w=..');
    like($r->{headers}{ratelimit} // '', qr/^"hdr";r=0;t=\d+$/,
         '... RateLimit: "hdr";r=0;t=..');
    my ($tt) = ($r->{headers}{ratelimit} // '') =~ /;t=(\d+)$/;
    is($tt, $ra, '... t= is the Retry-After');

    is(get_key('/hdr-off', 'k-h2')->{status}, 200, 'ratelimit headers off: 200');
    $r = get_key('/hdr-off', 'k-h2');
    check_reject($r, 429, 'ratelimit headers off');
    ok(!exists $r->{headers}{'ratelimit-policy'}
       && !exists $r->{headers}{ratelimit},
       '... no RateLimit-Policy / RateLimit (off by default)');
}

# ------------------------------------------- waits over 60 s: x-should-retry

# A wait over 60 s, honestly: critical reserves 20% of every zone, so the
# normal class gets 80% of 1r/m, one request every 75 s; after its one
# request a normal key is told 75 s, more than the OpenAI SDKs accept, so
# "x-should-retry: false".  A critical key on the same zone waits 60 s:
# no such header (the threshold is "over 60 s").
$t->stop;
$t->write_config($common . <<'EOF');
    deepseek_guard_class critical reserve=20%;
    deepseek_guard_class normal;

    map $api_key $dsg_class {
        k-crit   critical;
        default  normal;
    }

    deepseek_guard_zone slow:1m key=$api_key rate=1r/m status=429;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        root %%PREFIX%%/html;

        location /q429 {
            deepseek_guard slow;
            deepseek_guard_classify $dsg_class;
        }
    }
EOF
$t->start;

{
    is(get_key('/q429', 'k-norm')->{status}, 200, 'normal at 80% of 1r/m: 200');
    my $r = get_key('/q429', 'k-norm');
    my ($ra, $ms) = check_reject($r, 429, 'normal, next request');
    cmp_ok($ms, '>', 70000, '... told about 75 s (> 70000 ms)');
    cmp_ok($ms, '<=', 75000, '... not above 75000 ms');
    cmp_ok($ra, '>', 60, '... Retry-After over 60');
    is($r->{headers}{'x-should-retry'}, 'false', '... x-should-retry: false');

    is(get_key('/q429', 'k-crit')->{status}, 200, 'critical at 100%: 200');
    $r = get_key('/q429', 'k-crit');
    ($ra, $ms) = check_reject($r, 429, 'critical, next request');
    cmp_ok($ms, '>', 50000, '... told about 60 s');
    cmp_ok($ra, '<=', 60, '... Retry-After not over 60');
    ok(!exists $r->{headers}{'x-should-retry'}, '... no x-should-retry');
}

$t->done;
