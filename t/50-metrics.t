#!/usr/bin/perl
# deepseek_guard_metrics: after a known sequence of requests across two
# workers (admitted, rejected by a per-key quota, queued then admitted,
# queued then timed out, dry run, upstream 5xx, cache misses and hits) the
# endpoint's numbers are exactly those of the sequence, whichever worker
# answers the scrape; the text passes `promtool check metrics`; the JSON
# has the same numbers; HEAD, other methods, Accept; every counter
# survives `nginx -s reload` and keeps counting after it.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Time::HiRes qw(sleep time);

my $PROMTOOL = '/usr/bin/promtool';

my $t = DSG::Test->new(workers => 2);

# no artificial latency: only the requests that say so are slow
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

# Three classes from the API key.  Zones:
#   quota    per key, 1r/m with burst 2: 3 requests at once, then 429
#   backend  one key, 1 request in flight: the next ones queue by class
#   dry      1r/m, dry run: the second request is let through, counted
# reuseport: the kernel spreads the connections over both workers, so the
# numbers can only be right if they are shared.
$t->write_config(<<'EOF');
    map $http_authorization $cls {
        "~^Bearer c"    critical;
        "~^Bearer l"    low;
        default         normal;
    }

    deepseek_guard_class critical queue=4 queue_timeout=5s;
    deepseek_guard_class normal   queue=4 queue_timeout=5s;
    deepseek_guard_class low      queue=4 queue_timeout=300ms;

    deepseek_guard_zone quota:1m   key=$http_authorization rate=1r/m burst=2
                                   status=429;
    deepseek_guard_zone backend:1m key=backend inflight=1;
    deepseek_guard_zone dry:1m     key=dry rate=1r/m;

    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;

    log_format m '$pid $status $deepseek_guard_status $uri';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log m;

        deepseek_guard_classify $cls;

        location /v1/ {
            deepseek_guard quota;
            deepseek_guard backend;
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1m;
            deepseek_guard_cache_status_header X-Cache-Status;
            proxy_pass http://%%MOCK%%;
        }

        location /q/ {
            deepseek_guard backend;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /dry/ {
            deepseek_guard dry;
            deepseek_guard_dry_run on;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location = /metrics {
            # scrapes while the sequence runs stay out of its access log
            access_log off;
            deepseek_guard_metrics;
            allow 127.0.0.1;
            deny all;
        }
    }
EOF
$t->start;

# ------------------------------------------------------------ helpers

# the exposition as { 'name{k="v",...}' => value }, label order as sent
sub parse_text {
    my ($text) = @_;
    my (%m, %type);
    for my $l (split /\n/, $text) {
        if ($l =~ /^# TYPE (\S+) (\S+)$/) {
            $type{$1} = $2;
            next;
        }
        next if $l =~ /^#/ || $l eq '';
        $l =~ /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$/
            or die "bad exposition line: $l";
        $m{ $1 . ($2 // '') } = $3;
    }
    return (\%m, \%type);
}

sub scrape {
    my $r = $t->get('/metrics');
    die "scrape: $r->{status} $r->{error}" unless $r->{status} == 200;
    my ($m) = parse_text($r->{body});
    return wantarray ? ($m, $r) : $m;
}

sub key {
    my ($name, @labels) = @_;
    my @p;
    while (my ($k, $v) = splice(@labels, 0, 2)) {
        push @p, qq{$k="$v"};
    }
    return $name . (@p ? '{' . join(',', @p) . '}' : '');
}

sub req_total {
    my ($m, $zone, $class, $decision) = @_;
    return $m->{ key('deepseek_guard_requests_total', zone => $zone,
                     class => $class, decision => $decision) };
}

sub logged {
    my ($n) = @_;
    $t->wait_until(sub {
        scalar(() = $t->access_log =~ /\n/g) >= $n }, 5);
    return [map { [split ' '] } split /\n/, $t->access_log];
}

my @log_expect;     # statuses, in order, of every logged request

# ------------------------------------------------------------ sequence

# Every request of steps 1-4 that passes the backend zone is sent once the
# previous one's slot is free: the client has the whole answer before the
# log phase releases the slot, and the next request may reach the other
# worker in between, on a busy machine, and be counted as queued (seen in
# CI, a wait under 5 ms)
sub backend_idle {
    $t->wait_until(sub { $t->zone_idle('backend') }, 5)
        or diag('the backend zone still has a request in flight');
}

# 1. quota: key "q", 5 different prompts one after the other: 3 are
#    admitted, 2 rejected by the quota; each one is a cache miss, the
#    3 answered ones are stored
my @st = map { backend_idle();
               $t->chat(key => 'q', content => "quota $_")->{status} } 1 .. 5;
is("@st", '200 200 200 429 429', 'quota: 3 admitted, then 429');

# 2. a repeated prompt of the same key (the default cache key has the
#    credentials in it), spent as its quota is, is a hit: answered before
#    admission, no zone decides it
my $r = $t->chat(key => 'q', content => 'quota 1');
is($r->{status}, 200, 'cache: repeated prompt answered');
is($r->{headers}{'x-cache-status'}, 'HIT', '... from the cache');

# 3. an upstream 5xx (a miss, not stored: only 200 is valid)
backend_idle();
$r = $t->chat(key => 'e', content => 'busy',
              headers => ['X-Mock-Status' => 503]);
is($r->{status}, 503, 'upstream 503 passed through');

# 4. the queue: 3 quick requests first (the mean in-flight time the queue
#    estimates waits from stays small), then A holds the backend's only
#    slot for 2 s; B (normal) arrives at 100 ms and waits for A; D (low,
#    queue_timeout 300 ms) arrives at 200 ms and times out
for (1 .. 3) {
    backend_idle();
    $t->chat(uri => '/q/chat/completions', key => 'n0', content => "warm $_");
}
backend_idle();

my @res = $t->parallel([
    $t->chat_req(uri => '/q/chat/completions', key => 'na', content => 'A',
                 headers => ['X-Mock-Delay-Ms' => 2000], timeout => 20),
    { %{ $t->chat_req(uri => '/q/chat/completions', key => 'nb',
                      content => 'B', timeout => 20) }, at_ms => 100 },
    { %{ $t->chat_req(uri => '/q/chat/completions', key => 'ld',
                      content => 'D', timeout => 20) }, at_ms => 200 },
], timeout => 30);
is(join(' ', map { $_->{status} } @res), '200 200 503',
   'queue: A served, B queued then served, D timed out');
cmp_ok($res[2]{ms}, '>=', 280, '... D waited its queue_timeout');
cmp_ok($res[2]{ms}, '<', 1500, '... and no longer');

# 5. dry run: the second request in the minute would be rejected
@st = map { $t->chat(uri => '/dry/chat/completions', content => "dry $_")
                ->{status} } 1 .. 2;
is("@st", '200 200', 'dry run: both served');

my $nreq = 5 + 1 + 1 + 3 + 3 + 2;
my $log = logged($nreq);
is(scalar @$log, $nreq, "$nreq requests logged");
my %pids = map { $_->[0] => 1 } @$log;
is(scalar keys %pids, 2, 'the requests were served by both workers')
    or diag explain \%pids;

# ------------------------------------------------------------ numbers

# the cache gauges are refreshed once a second by the sweep
$t->wait_until(sub {
    (scrape()->{'deepseek_guard_cache_entries{cache="llm"}'} // 0) == 3 }, 5);

my ($m, $resp) = scrape();
like($resp->{headers}{'content-type'}, qr{^text/plain; version=0\.0\.4},
     'text exposition format 0.0.4');

my %want = (
    # quota: the 5 prompts of key q and the 503 of key e
    'quota normal admitted'          => 4,
    'quota normal rejected_429'      => 2,
    'quota normal queued'            => 0,
    'quota normal rejected_503'      => 0,
    'quota critical admitted'        => 0,
    # backend: 3 + 1 on /v1/, 3 warm-ups, A and B on /q/; B queued
    'backend normal admitted'        => 9,
    'backend normal queued'          => 1,
    'backend normal rejected_503'    => 0,
    'backend normal rejected_429'    => 0,
    'backend normal queue_timeout'   => 0,
    'backend low admitted'           => 0,
    'backend low queued'             => 1,
    'backend low rejected_503'       => 1,
    'backend low queue_timeout'      => 1,
    'backend low rejected_other'     => 0,
    'backend critical queued'        => 0,
    # dry: the first admitted, the second let through
    'dry normal admitted'            => 1,
    'dry normal dry_run'             => 1,
    'dry normal rejected_503'        => 0,
);
for my $k (sort keys %want) {
    my ($zone, $class, $decision) = split ' ', $k;
    is(req_total($m, $zone, $class, $decision), $want{$k},
       "requests_total{zone=$zone,class=$class,decision=$decision}")
        or diag("access log (pid status decision uri):\n"
                . $t->access_log);
}

my %resp_want = (
    quota   => { '1xx' => 0, '2xx' => 4, '3xx' => 0, '4xx' => 2, '5xx' => 1 },
    backend => { '1xx' => 0, '2xx' => 9, '3xx' => 0, '4xx' => 2, '5xx' => 2 },
    dry     => { '1xx' => 0, '2xx' => 2, '3xx' => 0, '4xx' => 0, '5xx' => 0 },
);
for my $z (sort keys %resp_want) {
    is_deeply({ map { $_ => $m->{ key('deepseek_guard_responses_total',
                                      zone => $z, code => $_) } }
                keys %{ $resp_want{$z} } },
              $resp_want{$z}, "responses_total of zone $z by code");
}

for my $z (qw(quota backend dry)) {
    for my $c (qw(critical normal low)) {
        is($m->{ key('deepseek_guard_inflight', zone => $z, class => $c) }
           . '/' . $m->{ key('deepseek_guard_queue_depth', zone => $z,
                             class => $c) },
           '0/0', "inflight and queue_depth of $z/$c back to 0");
    }
}

is($m->{ key('deepseek_guard_queue_capacity', zone => 'backend',
             class => 'low') }, 4, 'queue_capacity: queue= of the class');
is($m->{ key('deepseek_guard_queue_capacity', zone => 'quota',
             class => 'normal') }, 0, '... 0 in a status=429 zone');
is($m->{ key('deepseek_guard_zone_inflight_limit', zone => 'backend') }, 1,
   'zone_inflight_limit');
is($m->{ key('deepseek_guard_zone_keys', zone => 'quota') }, 2,
   'zone_keys: the two keys admission saw in the quota zone');
is($m->{ key('deepseek_guard_zone_keys', zone => 'backend') }, 1,
   '... one in the backend zone');
is($m->{ key('deepseek_guard_zone_evictions_total', zone => 'quota') }, 0,
   'zone_evictions_total');

# the queue wait histogram: B waited ~1.9 s, D ~0.3 s
sub bucket {
    my ($class, $le) = @_;
    return $m->{ key('deepseek_guard_queue_wait_seconds_bucket',
                     zone => 'backend', class => $class, le => $le) };
}
my @les = qw(0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 5 10 +Inf);
is(join(' ', map { bucket('normal', $_) } @les), '0 0 0 0 0 0 0 0 1 1 1',
   'wait histogram of normal: B in the 1-5 s bucket, cumulative');
is(join(' ', map { bucket('low', $_) } @les), '0 0 0 0 0 0 1 1 1 1 1',
   'wait histogram of low: D in the 0.25-0.5 s bucket, cumulative');
is($m->{ key('deepseek_guard_queue_wait_seconds_count', zone => 'backend',
             class => 'normal') }, 1, '_count of normal');
my $sum = $m->{ key('deepseek_guard_queue_wait_seconds_sum',
                    zone => 'backend', class => 'normal') };
ok($sum > 1.5 && $sum < 2.5, "_sum of normal in seconds ($sum)");
$sum = $m->{ key('deepseek_guard_queue_wait_seconds_sum', zone => 'backend',
                 class => 'low') };
ok($sum >= 0.29 && $sum < 0.5, "_sum of low in seconds ($sum)");
is(bucket('critical', '+Inf'), 0, 'no critical request waited');

# the cache: 6 misses (5 quota prompts, the 503), 1 hit, 3 stored
my %cache_want = (hit => 1, miss => 6, expired => 0, stale => 0,
                  coalesced => 0, bypass => 0);
is_deeply({ map { $_ => $m->{ key('deepseek_guard_cache_requests_total',
                                  cache => 'llm', status => $_) } }
            keys %cache_want },
          \%cache_want, 'cache_requests_total by status');
is($m->{'deepseek_guard_cache_stores_total{cache="llm"}'}, 3,
   'cache_stores_total');
is($m->{'deepseek_guard_cache_store_failures_total{cache="llm"}'}, 0,
   'cache_store_failures_total');
is($m->{'deepseek_guard_cache_entries{cache="llm"}'}, 3, 'cache_entries');
cmp_ok($m->{'deepseek_guard_cache_bytes{cache="llm"}'}, '>', 0,
       'cache_bytes');
cmp_ok($m->{'deepseek_guard_cache_file_bytes{cache="llm"}'}, '>=',
       $m->{'deepseek_guard_cache_bytes{cache="llm"}'},
       'cache_file_bytes >= cache_bytes');
is($m->{'deepseek_guard_cache_capacity_bytes{cache="llm"}'}, 256 << 20,
   'cache_capacity_bytes: the default max_size');

# whichever worker answers, the same numbers (nothing moves meanwhile)
my %seen;
for (1 .. 8) {
    my $s = $t->get('/metrics');
    $seen{ $s->{body} } = 1;
}
is(scalar keys %seen, 1, '8 scrapes over both workers: identical bodies');

# ------------------------------------------------------------ format

SKIP: {
    skip "$PROMTOOL not installed", 2 unless -x $PROMTOOL;
    my $f = $t->prefix . '/metrics.txt';
    open(my $fh, '>', $f) or die $!;
    print {$fh} $resp->{body};
    close $fh;
    my $out = `$PROMTOOL check metrics < $f 2>&1`;
    is($?, 0, 'promtool check metrics accepts the exposition')
        or diag $out;
    is($out, '', '... without a single lint warning') or diag $out;
}

{
    my (undef, $type) = parse_text($resp->{body});
    is($type->{deepseek_guard_queue_wait_seconds}, 'histogram',
       'TYPE histogram');
    my @bad = grep { /_total$/ && $type->{$_} ne 'counter'
                     || $type->{$_} eq 'counter' && !/_total$/ } keys %$type;
    is("@bad", '', 'counters, and only counters, end in _total');
    like($resp->{body}, qr/^# HELP deepseek_guard_requests_total \S/m,
         'HELP lines');
}

# JSON: the same numbers
my $j = $t->get('/metrics?format=json');
like($j->{headers}{'content-type'}, qr{^application/json}, 'JSON format');
my $d = DSG::Test::json_decode($j->{body});
ok(ref $d eq 'HASH', 'JSON parses') or diag $j->{body};

{
    my %z = map { $_->{zone} => $_ } @{ $d->{zones} || [] };
    is_deeply([sort keys %z], [qw(backend dry quota)], 'JSON: the zones');
    my @diff;
    for my $zn (keys %z) {
        for my $c (@{ $z{$zn}{classes} }) {
            for my $dec (keys %{ $c->{requests} }) {
                my $tv = req_total($m, $zn, $c->{class}, $dec);
                push @diff, "$zn/$c->{class}/$dec: $c->{requests}{$dec} != $tv"
                    if $c->{requests}{$dec} != $tv;
            }
            for my $le (keys %{ $c->{queue_wait}{buckets} }) {
                my $tv = $m->{ key('deepseek_guard_queue_wait_seconds_bucket',
                               zone => $zn, class => $c->{class}, le => $le) };
                push @diff, "$zn/$c->{class}/le=$le"
                    if $c->{queue_wait}{buckets}{$le} != $tv;
            }
        }
        for my $code (keys %{ $z{$zn}{responses} }) {
            push @diff, "$zn/$code"
                if $z{$zn}{responses}{$code}
                   != $m->{ key('deepseek_guard_responses_total',
                                zone => $zn, code => $code) };
        }
    }
    is("@diff", '', 'JSON: every request, bucket and response counter '
                    . 'equals the text');
    my ($b) = grep { $_->{class} eq 'normal' } @{ $z{backend}{classes} };
    is($b->{requests}{queued}, 1, 'JSON: backend/normal queued');
    is($b->{queue_wait}{count}, 1, 'JSON: queue_wait count');
    is($z{quota}{keys}, 2, 'JSON: zone keys');
    my ($c) = @{ $d->{caches} || [] };
    is($c->{cache}, 'llm', 'JSON: the cache');
    is_deeply($c->{requests}, \%cache_want, 'JSON: cache requests');
    is($c->{stores}, 3, 'JSON: cache stores');
    is($c->{entries}, 3, 'JSON: cache entries');
}

$j = $t->get('/metrics', Accept => 'application/json');
ok(DSG::Test::json_decode($j->{body}), 'Accept: application/json gives JSON');
$j = $t->get('/metrics?format=prometheus', Accept => 'application/json');
like($j->{body}, qr/^# HELP /, '?format=prometheus wins over Accept');

my $h = $t->http(method => 'HEAD', uri => '/metrics');
is($h->{status}, 200, 'HEAD');
is($h->{headers}{'content-length'}, length $resp->{body},
   '... Content-Length of the body');
is($t->http(method => 'POST', uri => '/metrics', body => 'x')->{status},
   405, 'POST: 405');

# ------------------------------------------------------------ reload

my $before = scrape();
ok($t->reload, 'nginx -s reload');
my $after = scrape();
my @changed = grep { !/_(?:entries|bytes|file_bytes|capacity_bytes)\{/
                     && ($after->{$_} // 'missing') ne $before->{$_} }
              keys %$before;
is("@changed", '', 'every counter survives the reload');
is(scalar keys %$after, scalar keys %$before, '... the same series');

# and goes on counting in the new workers
$r = $t->chat(key => 'e', content => 'after reload');
is($r->{status}, 200, 'a request after the reload');
# its response is counted in the log phase, just before its slot is freed
backend_idle();
$after = scrape();
is(req_total($after, 'quota', 'normal', 'admitted'), 5,
   '... quota/normal admitted 4 -> 5');
is(req_total($after, 'backend', 'normal', 'admitted'), 10,
   '... backend/normal admitted 9 -> 10');
is($after->{'deepseek_guard_cache_requests_total{cache="llm",status="miss"}'},
   7, '... cache misses 6 -> 7');
is($after->{ key('deepseek_guard_responses_total', zone => 'backend',
                 code => '2xx') }, 10, '... backend 2xx responses 9 -> 10');

$t->done;
