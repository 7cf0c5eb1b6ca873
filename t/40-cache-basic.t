#!/usr/bin/perl
# deepseek_guard_cache basics: miss, store, hit (byte-identical body, same
# status and content type, one upstream call), with proxy_buffering on and
# off; hits survive a full restart and a reload (the LMDB file outlives the
# workers); GET and HEAD; what the upstream may forbid (Cache-Control
# no-store / private, Set-Cookie, X-Accel-Expires: 0) and the TTLs it may set
# (max-age, X-Accel-Expires seconds and @absolute); bypass; the status
# header and $deepseek_guard_cache_status.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Time::HiRes qw(sleep);

my $t = DSG::Test->new(workers => 2);

# no artificial latency: the mock answers at once, every test below counts
# upstream calls rather than timing them
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

# A static nginx server on port 1 stands in for an upstream that answers
# HEAD with 200 (the mock only knows GET /v1/models and POST chat), so the
# HEAD-versus-GET entry question can be asked at all.
mkdir $t->prefix . '/html';
{
    open(my $fh, '>', $t->prefix . '/html/doc.txt') or die $!;
    print {$fh} "static document body\n" x 10;
    close $fh;
}

# The access log records, per request, the module's cache status and a tag
# the test sends (X-Tag), so the variable can be checked request by request.
# reuseport: the kernel spreads the connections over both workers, so every
# hit below is as likely to come from the other worker as from the one that
# stored the entry.
$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;
    log_format cache '$pid $status "$deepseek_guard_cache_status" '
                     '$request_method $uri tag=$http_x_tag';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log cache;
        deepseek_guard_cache_status_header X-Cache-Status;

        # the typical LLM location: streaming proxy, 1 minute TTL for 200s
        # and, to show that the status is replayed, for 402s too
        location /v1/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 402 1m;
            proxy_pass http://%%MOCK%%;
            proxy_buffering off;
            proxy_http_version 1.1;
        }

        # the same with nginx buffering the upstream response
        location /buf/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1m;
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering on;
            proxy_http_version 1.1;
        }

        # no cache_valid line for 200: only X-Accel-Expires can store a
        # 200 here
        location /novalid/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 404 1m;
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering off;
        }

        # no cache_valid line at all: the cache does not act (the valid
        # line is the opt-in), not even for X-Accel-Expires
        location /nolines/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_status_header X-Cache-Status;
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering off;
        }

        # a 1 s TTL that the upstream's max-age may lengthen
        location /short/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1s;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /bypass/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1m;
            deepseek_guard_cache_bypass $http_x_bypass;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # POST is not a cached method here
        location /getonly/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1m;
            deepseek_guard_cache_methods GET HEAD;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # HEAD and GET share one key here (no $request_method in it): a
        # HEAD answered upstream must never leave an empty body for GET
        location /static/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1m;
            deepseek_guard_cache_key "$uri";
            proxy_pass http://127.0.0.1:%%PORT_1%%/;
        }

        # the default key (with $request_method) in front of the same
        location /static2/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1m;
            proxy_pass http://127.0.0.1:%%PORT_1%%/;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        access_log %%PREFIX%%/logs/static.log;
        root %%PREFIX%%/html;
    }
EOF
$t->start;
ok(-d $t->prefix . '/cache', 'nginx created the cache directory');


# the cache status a client saw, COALESCED counted as a HIT (see
# DSG::Test::cache_status)
sub xcs { DSG::Test::cache_status($_[0]) }

my $tagn = 0;

# one chat through nginx; returns the response, its tag and the X-Cache-Status
sub chat {
    my (%o) = @_;
    my $uri = delete $o{uri} || '/v1/chat/completions';
    return $t->cache_chat('t' . ++$tagn, %o, uri => $uri);
}

# the $deepseek_guard_cache_status the access log has for a tag
sub logged {
    my ($tag) = @_;
    $t->wait_until(sub { $t->access_log =~ /tag=\Q$tag\E$/m }, 3);
    my ($st) = $t->access_log =~ /^\d+ \d+ "([^"]*)" \S+ \S+ tag=\Q$tag\E$/m;
    $st = 'HIT' if defined $st && $st eq 'COALESCED';    # see xcs()
    return $st // '?';
}

sub upstream_calls { $t->mock_stats->{chat_requests} }

sub _slurp_log {
    my ($name) = @_;
    open(my $fh, '<', $t->prefix . "/logs/$name") or return '';
    local $/;
    return scalar <$fh>;
}

# ------------------------------------------------ miss, store, hit

for my $loc (['/v1/', 'proxy_buffering off'], ['/buf/', 'proxy_buffering on']) {
    my ($prefix, $what) = @$loc;
    $t->mock_reset;
    my %o = (uri => "${prefix}chat/completions", content => "basic $prefix");

    # the first request must go upstream and be stored
    my $a = chat(%o);
    is($a->{status}, 200, "$what: first request 200");
    is($a->{cache}, 'MISS', '... X-Cache-Status: MISS');
    is(logged($a->{tag}), 'MISS', '... $deepseek_guard_cache_status MISS');
    like($a->{body}, qr/"content":"tok0-/, '... a chat completion');

    # the same request again, several times, over both workers: the
    # upstream must not be asked again and every answer must be identical
    my @hits = map { chat(%o) } 1 .. 6;
    is(scalar(grep { $_->{status} == 200 } @hits), 6, '... hits: 200');
    is(scalar(grep { $_->{cache} eq 'HIT' } @hits), 6, '... X-Cache-Status: HIT');
    is(scalar(grep { logged($_->{tag}) eq 'HIT' } @hits), 6,
       '... $deepseek_guard_cache_status HIT');
    is(scalar(grep { $_->{body} eq $a->{body} } @hits), 6,
       '... byte-identical bodies');
    is(scalar(grep { ($_->{headers}{'content-type'} // '') eq 'application/json' }
              @hits), 6, '... same content type');
    is(scalar(grep { ($_->{headers}{'content-length'} // -1) == length $a->{body} }
              @hits), 6, '... Content-Length of the body');
    is(upstream_calls(), 1, '... the upstream saw ONE call');
    my %pids = map { /^(\d+) \d+ "HIT" POST \Q$prefix\E/ ? ($1 => 1) : () }
               split /\n/, $t->access_log;
    ok(keys %pids >= 1, '... hits logged by ' . scalar(keys %pids) . ' worker(s)');
}

# the first 7 + 7 requests spread over the workers: both must have served
# hits, which only an entry shared through LMDB allows
{
    my %pids = map { /^(\d+) \d+ "HIT"/ ? ($1 => 1) : () }
               split /\n/, $t->access_log;
    is(scalar keys %pids, 2, 'both workers served hits of the shared entries');
}

# the status is replayed too (a 402 with valid 402)
{
    $t->mock_reset;
    my %o = (content => 'status 402', headers => ['X-Mock-Status' => 402]);
    my $a = chat(%o);
    is($a->{status}, 402, 'a 402 (cache_valid 402) goes upstream');
    my $b = chat(%o);
    is($b->{cache}, 'HIT', '... and is then a HIT');
    is($b->{status}, 402, '... with the same status');
    is($b->{body}, $a->{body}, '... and body');
    is(upstream_calls(), 1, '... one upstream call');

    # a status without a cache_valid line is not stored
    my @r = map { chat(content => 'status 500',
                       headers => ['X-Mock-Status' => 500]) } 1 .. 2;
    is_deeply([map { $_->{status} } @r], [500, 500], 'a 500 passes through');
    is_deeply([map { $_->{cache} } @r], ['MISS', 'MISS'], '... not stored: MISS twice');
    is(upstream_calls(), 3, '... both went upstream');
}

# ------------------------------------------------ keep-alive

{
    # three requests pipelined on one keep-alive connection (what SDKs do):
    # MISS, then two HITs answered from the precontent phase; each response
    # must be complete and the connection must go on to the next request
    $t->mock_reset;
    my $body = DSG::Test::json_encode({ model => 'deepseek-chat',
        messages => [{ role => 'user', content => 'keep-alive' }] });
    my $one = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            . "Content-Type: application/json\r\nContent-Length: "
            . length($body) . "\r\n";
    my $raw = $t->http(request_raw => $one . "\r\n" . $body
                                      . $one . "\r\n" . $body
                                      . $one . "Connection: close\r\n\r\n" . $body,
                       read_all => 1, timeout => 10)->{raw};
    my @resp;
    while ($raw =~ /\GHTTP\/1\.1 (\d+)[^\r]*\r\n(.*?)\r\n\r\n/gcs) {
        my ($st, $h) = ($1, $2);
        my ($len) = $h =~ /^Content-Length: (\d+)/mi;
        my ($cs) = $h =~ /^X-Cache-Status: (\w+)/mi;
        last unless defined $len;
        my $b = substr($raw, pos($raw), $len);
        pos($raw) = pos($raw) + $len;
        push @resp, [$st, $cs // '', $b];
    }
    is(scalar @resp, 3, 'three pipelined requests on one connection: three responses');
    is(join(' ', map { $_->[0] } @resp), '200 200 200', '... all 200');
    is(join(' ', map { $_->[1] eq 'COALESCED' ? 'HIT' : $_->[1] } @resp), 'MISS HIT HIT',
       '... MISS, HIT, HIT');
    is(scalar(grep { $_->[2] eq ($resp[0][2] // 'x') } @resp), 3, '... identical bodies');
    is(upstream_calls(), 1, '... one upstream call');
}

# ------------------------------------------------ restart and reload

# the entries of the first block must survive a full stop/start (new
# master, new workers, the LMDB file reopened) and a reload (new workers)
{
    my $before = upstream_calls();
    my $ref = chat(content => 'basic /v1/');
    is($ref->{cache}, 'HIT', 'before restart: HIT');

    $t->restart;
    my $a = chat(content => 'basic /v1/');
    is($a->{cache}, 'HIT', 'after a full restart: still a HIT');
    is($a->{body}, $ref->{body}, '... identical body');

    ok($t->reload, 'reload');
    my @b = map { chat(content => 'basic /v1/') } 1 .. 4;
    is(scalar(grep { $_->{cache} eq 'HIT' } @b), 4, 'after a reload: HIT');
    is(scalar(grep { $_->{body} eq $ref->{body} } @b), 4, '... identical bodies');
    is(upstream_calls(), $before, '... no upstream call for any of them');

    # and the cache still stores after both
    my $c = chat(content => 'after reload');
    my $d = chat(content => 'after reload');
    is("$c->{cache} $d->{cache}", 'MISS HIT', 'new entries after the reload');
}

# ------------------------------------------------ GET and HEAD

{
    # GET of a JSON resource: stored and replayed, one upstream request
    my $before = $t->mock_stats->{requests};
    my @g = map { my $r = $t->get('/v1/models');
                  $r->{cache} = xcs($r); $r } 1 .. 3;
    is_deeply([map { $_->{cache} } @g], [qw(MISS HIT HIT)], 'GET: MISS, HIT, HIT');
    is(scalar(grep { $_->{body} eq $g[0]{body} && $_->{status} == 200 } @g), 3,
       '... identical 200 bodies');
    is($t->mock_stats->{requests} - $before, 1, '... one upstream request');

    # HEAD of the same URI with the default key is another entry: the mock
    # has no HEAD /v1/models (404), which must not be stored or mixed up
    my $h = $t->http(method => 'HEAD', uri => '/v1/models');
    is($h->{status}, 404, 'HEAD /v1/models (default key): the upstream 404');
    is($h->{body}, '', '... no body');
    my $g = $t->get('/v1/models');
    is(xcs($g), 'HIT', '... GET still a HIT');
    is($g->{body}, $g[0]{body}, '... with the full body');

    # HEAD first, then GET, on a key without the method: the HEAD went
    # upstream and got no body; the GET must get the real document
    my $doc = "static document body\n" x 10;
    my $h1 = $t->http(method => 'HEAD', uri => '/static/doc.txt');
    is($h1->{status}, 200, 'HEAD first (key without method): 200');
    is($h1->{headers}{'content-length'}, length $doc, '... Content-Length of the document');
    is($h1->{body}, '', '... no body');
    my $g1 = $t->get('/static/doc.txt');
    is($g1->{status}, 200, 'then GET: 200');
    is($g1->{body}, $doc, '... the whole document, not an empty entry');
    my $g2 = $t->get('/static/doc.txt');
    is(xcs($g2), 'HIT', 'GET again: HIT');
    is($g2->{body}, $doc, '... the whole document');
    my $h2 = $t->http(method => 'HEAD', uri => '/static/doc.txt');
    is(xcs($h2), 'HIT', 'HEAD after GET: a HIT of the GET entry');
    is($h2->{headers}{'content-length'}, length $doc, '... its Content-Length');
    is($h2->{body}, '', '... and no body');

    # the default key keeps GET and HEAD apart: the GET entry is not used
    # for HEAD, and a HEAD answered upstream (no body) is never stored
    my @s = map { $t->http(method => $_, uri => '/static2/doc.txt') }
            qw(GET HEAD GET HEAD);
    is_deeply([map { xcs($_) } @s],
              [qw(MISS MISS HIT MISS)],
              'default key: GET stored, HEAD its own key and not stored');
    is_deeply([map { $_->{status} } @s], [200, 200, 200, 200], '... all 200');
    is_deeply([map { $_->{body} } @s], [$doc, '', $doc, ''],
              '... GET bodies whole, HEAD bodies empty');
    # the upstream logs after it answered: give its log phase a moment
    my @static;
    $t->wait_until(sub {
        @static = grep { m{"HEAD /doc.txt} } split /\n/,
                  _slurp_log('static.log');
        @static >= 3;
    }, 3);
    is(scalar @static, 3, '... every HEAD that missed reached the upstream');
}

# ------------------------------------------------ what the upstream forbids

# Each case: the same prompt twice with the header(s) the mock adds to its
# answer (X-Mock-Header): never stored, so MISS twice and two upstream calls.
{
    my @cases = (
        ['Cache-Control: no-store'],
        ['Cache-Control: private, max-age=60'],
        ['Set-Cookie: session=s3cr3t; Path=/'],
        ['X-Accel-Expires: 0'],
        # Set-Cookie forbids storing whatever comes before it
        ['X-Accel-Expires: 60', 'Set-Cookie: session=s3cr3t'],
        ['Cache-Control: max-age=60', 'Set-Cookie: session=s3cr3t'],
    );
    for my $c (@cases) {
        $t->mock_reset;
        my $name = join ' + ', @$c;
        my @h = map { ('X-Mock-Header' => $_) } @$c;
        my @r = map { chat(content => "forbid $name", headers => \@h) } 1 .. 2;
        is_deeply([map { $_->{status} } @r], [200, 200], "$name: 200");
        is_deeply([map { $_->{cache} } @r], [qw(MISS MISS)], '... not stored');
        is(upstream_calls(), 2, '... two upstream calls');
    }

    # no-cache only asks for revalidation (every SSE stream carries it):
    # stored
    $t->mock_reset;
    my @h = ('X-Mock-Header' => 'Cache-Control: no-cache');
    my @r = map { chat(content => 'no-cache', headers => \@h) } 1 .. 2;
    is_deeply([map { $_->{cache} } @r], [qw(MISS HIT)], 'Cache-Control: no-cache is stored');
    is(upstream_calls(), 1, '... one upstream call');
}

# ------------------------------------------------ TTLs from the upstream

{
    $t->mock_reset;

    # max-age=1 shortens the location's 1 minute; x-accel-expires: 1 gives
    # a TTL where no cache_valid line exists; @now+2 an absolute expiry;
    # max-age=60 lengthens /short/'s 1 s; X-Accel-Expires wins over a
    # Cache-Control that comes before it
    my @h_ma = ('X-Mock-Header' => 'Cache-Control: max-age=1');
    my @h_xa = ('X-Mock-Header' => 'X-Accel-Expires: 1');
    my @h_at = ('X-Mock-Header' => 'X-Accel-Expires: @' . (time() + 2));
    my @h_long = ('X-Mock-Header' => 'Cache-Control: max-age=60');
    my @h_win = ('X-Mock-Header' => 'Cache-Control: no-store',
                 'X-Mock-Header' => 'X-Accel-Expires: 60');
    my %req = (
        ma   => { content => 'ttl max-age', headers => \@h_ma },
        xa   => { uri => '/novalid/chat/completions', content => 'ttl xae',
                  headers => \@h_xa },
        at   => { uri => '/novalid/chat/completions', content => 'ttl xae at',
                  headers => \@h_at },
        long => { uri => '/short/chat/completions', content => 'ttl long',
                  headers => \@h_long },
        win  => { content => 'ttl xae wins', headers => \@h_win },
        nov  => { uri => '/novalid/chat/completions', content => 'ttl none' },
        nma  => { uri => '/novalid/chat/completions', content => 'ttl none ma',
                  headers => \@h_long },
    );
    my %first = map { $_ => chat(%{ $req{$_} }) } sort keys %req;
    my %second = map { $_ => chat(%{ $req{$_} }) } sort keys %req;
    for (qw(ma xa at long win)) {
        is("$first{$_}{cache} $second{$_}{cache}", 'MISS HIT',
           "$_: stored (MISS, HIT)");
    }
    is("$first{nov}{cache} $second{nov}{cache}", 'MISS MISS',
       'no cache_valid for the status, no X-Accel-Expires: not stored');
    is("$first{nma}{cache} $second{nma}{cache}", 'MISS MISS',
       'no cache_valid for the status: max-age alone does not store');

    # no cache_valid line at all: no cache status, nothing stored, even
    # with X-Accel-Expires
    my @nl = map { chat(uri => '/nolines/chat/completions', content => 'ttl no lines',
                        headers => \@h_xa) } 1 .. 2;
    is(join(' ', map { $_->{status} } @nl), '200 200', 'no cache_valid line: answered');
    is(join(' ', map { $_->{cache} } @nl), ' ',
       '... the cache does not act (no status), not even for X-Accel-Expires');

    # past every short TTL (1 s, and @now+2 s), well inside the long ones
    sleep 2.6;
    my %third = map { $_ => chat(%{ $req{$_} }) } qw(ma xa at long win);
    for (qw(ma xa at)) {
        is($third{$_}{cache}, 'EXPIRED', "$_: EXPIRED after its TTL");
        is(logged($third{$_}{tag}), 'EXPIRED', '... $deepseek_guard_cache_status EXPIRED');
        is($third{$_}{body}, $first{$_}{body}, '... refetched, same answer');
    }
    is($third{long}{cache}, 'HIT', 'max-age=60 outlives cache_valid 1s');
    is($third{win}{cache}, 'HIT', 'X-Accel-Expires: 60 wins over a no-store before it');

    # the expired entries were refetched and stored again: HIT now
    my %fourth = map { $_ => chat(%{ $req{$_} }) } qw(ma xa);
    is("$fourth{ma}{cache} $fourth{xa}{cache}", 'HIT HIT',
       'the refetched entries are stored again');

    my $bodies = $t->mock_stats->{bodies};
    # ma, xa, at: 2 calls each; long, win: 1 each; nov, nma, nolines: 2 each
    is(upstream_calls(), 3 * 2 + 2 * 1 + 3 * 2, 'upstream calls add up');
}

# ------------------------------------------------ bypass

{
    $t->mock_reset;
    my %o = (uri => '/bypass/chat/completions', content => 'bypass me');
    my $a = chat(%o);
    my $b = chat(%o);
    is("$a->{cache} $b->{cache}", 'MISS HIT', 'bypass location: MISS, HIT');

    # with the bypass value set the request goes upstream even though a
    # fresh entry exists; X-Mock-Pad makes this answer different so the
    # next test can tell which one got stored
    my $c = chat(%o, headers => ['X-Bypass' => 1, 'X-Mock-Pad' => 10]);
    is($c->{cache}, 'BYPASS', 'X-Bypass: 1: BYPASS');
    is(logged($c->{tag}), 'BYPASS', '... $deepseek_guard_cache_status BYPASS');
    like($c->{body}, qr/"pad":"x{10}"/, '... the upstream answered');
    is(upstream_calls(), 2, '... two upstream calls');

    # "0" and "" do not bypass
    my $d = chat(%o, headers => ['X-Bypass' => '0']);
    is($d->{cache}, 'HIT', 'X-Bypass: 0: HIT');

    # the bypassed response was stored: the next hit is the padded answer
    is($d->{body}, $c->{body}, '... the response of the bypassed request was stored');
    is(upstream_calls(), 2, '... no upstream call');

    # a bypass on a new key stores too
    my $e = chat(%o, content => 'bypass new', headers => ['X-Bypass' => 'yes']);
    my $f = chat(%o, content => 'bypass new');
    is("$e->{cache} $f->{cache}", 'BYPASS HIT', 'a bypassed miss is stored');
}

# ------------------------------------------------ methods

{
    $t->mock_reset;
    my @r = map { chat(uri => '/getonly/chat/completions', content => 'methods') } 1 .. 2;
    is_deeply([map { $_->{status} } @r], [200, 200], 'cache_methods GET HEAD: POST answered');
    is_deeply([map { $_->{cache} } @r], ['', ''], '... not looked up (no X-Cache-Status)');
    is(upstream_calls(), 2, '... both went upstream');
    my @g = map { $t->get('/getonly/models') } 1 .. 2;
    is(join(' ', map { xcs($_) } @g), 'MISS HIT', '... while GET is cached');
}

# ------------------------------------------------ the status values seen

{
    my %seen = map { /^\d+ \d+ "([A-Z]*)"/ ? ($1 => 1) : () }
               split /\n/, $t->access_log;
    delete $seen{COALESCED};    # possible, see xcs()
    is_deeply([sort grep { length } keys %seen], [qw(BYPASS EXPIRED HIT MISS)],
              'access log: MISS, HIT, EXPIRED, BYPASS were all logged');
}

$t->done;
