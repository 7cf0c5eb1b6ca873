#!/usr/bin/perl
# Cache trust (issue 13): the cache answers a request only with what the
# upstream would have answered that request.  An unauthorized client never
# gets a cached answer, whatever the error_page (URI, "=", named location)
# of auth_basic, auth_request or deny; credentials keep entries apart
# (Authorization, X-Api-Key, Api-Key, Cookie), and a key without
# $deepseek_guard_auth_sha256 stores a credentialed answer only when the
# upstream says public / s-maxage / must-revalidate or the operator says
# deepseek_guard_cache_credentials shared; a gzip answer reaches only a
# client that accepts gzip, with its Content-Encoding; Vary is honoured and
# Vary: * never stored; a 206 is never stored and a Range request on a full
# entry gets the right bytes; an error_page fallback (maintenance page) is
# never stored under the prompt's key; an early $deepseek_guard_body_sha256
# does not freeze the key; a close-delimited answer, cut or whole, is never
# stored; zone, class and keys_zone names outside [A-Za-z0-9_.-]{1,64}
# fail nginx -t.  The mock's X-Mock-Gzip and X-Mock-Close-Delimited test
# headers (t/mock/mock_llm.py) give the gzip and close-delimited upstreams.
# Every numbered section fails on the module before issue 13.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use MIME::Base64 qw(encode_base64);
use IO::Uncompress::Gunzip qw(gunzip $GunzipError);

my $t = DSG::Test->new(workers => 2);

# no latency: every check counts upstream calls or reads X-Cache-Status
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

my $p = $t->prefix;

sub spew {
    my ($file, $data) = @_;
    open(my $fh, '>', $file) or die "$file: $!";
    binmode $fh;
    print {$fh} $data;
    close $fh or die "$file: $!";
}

my $DENIED = qq({"error":"denied"}\n);
my $MAINT  = qq({"error":"maintenance"}\n);
my $DOC    = join '', map { sprintf "line %03d of the static document\n", $_ } 1 .. 40;

mkdir "$p/html" or die "$p/html: $!";
spew("$p/html/denied.json", $DENIED);
spew("$p/html/maint.json", $MAINT);
spew("$p/html/doc.txt", $DOC);
# nginx's auth_basic_user_file knows the {PLAIN} scheme
spew("$p/htpasswd", "user:{PLAIN}secret\n");

# ------------------------------------------------ configuration

# The auth server (port 0): the cache at SERVER level, so the error pages
# (/denied.json, @denied) inherit it as a new user would write it.  Its key
# has no credentials in it, on purpose: the authorized and the unauthorized
# request then share one key, and only "decide after access" and "an
# internal redirect neither answers nor stores" keep the answer from the
# unauthorized one (the fills carry Cache-Control: public, which the
# credentials rule needs to store an Authorization request under it).
# One location per (access module x error_page form):
#   basic-*  auth_basic (401)
#   areq-*   auth_request to /_auth: X-User good 204, forbidden 403, else 401
#   deny-*   deny 10.0.0.0/8, the client address taken from X-Real-IP
# and *-uri  error_page 401 403 /denied.json        (the error status kept)
#     *-eq   error_page 401 403 = /denied.json      (the page's 200)
#     *-named error_page 401 403 = @denied          (proxied static page, 200)
my %ACCESS = (
    basic => "auth_basic \"llm\";\n"
           . "            auth_basic_user_file %%PREFIX%%/htpasswd;",
    areq  => 'auth_request /_auth;',
    deny  => 'deny 10.0.0.0/8;',
);
my %ERRPAGE = (
    uri   => 'error_page 401 403 /denied.json;',
    eq    => 'error_page 401 403 = /denied.json;',
    named => 'error_page 401 403 = @denied;',
);
my $auth_locations = '';
for my $m (sort keys %ACCESS) {
    for my $e (sort keys %ERRPAGE) {
        $auth_locations .= <<"EOL";
        location /$m-$e/ {
            $ACCESS{$m}
            $ERRPAGE{$e}
            proxy_pass http://%%MOCK%%/v1/;
        }
EOL
    }
}

# $shared: the one location that needs deepseek_guard_cache_credentials
# (a directive today's module does not know: it is added in its own
# phase at the end, so the rest of the file runs against any build)
sub config {
    my ($shared) = @_;
    my $shared_loc = $shared ? <<'EOL' : '';
        # the operator shares answers across credentials on purpose
        location /shared/ {
            deepseek_guard_cache_key "$request_method|$request_uri|$deepseek_guard_body_sha256";
            deepseek_guard_cache_credentials shared;
            proxy_pass http://%%MOCK%%/v1/;
        }
EOL
    $t->write_config(<<"EOF");
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 1m;
        deepseek_guard_cache_key "\$request_method|\$request_uri|\$deepseek_guard_body_sha256";
        proxy_http_version 1.1;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        root %%PREFIX%%/html;

        location = /denied.json { }

        location \@denied {
            rewrite ^ /denied.json break;
            proxy_method GET;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }

        location = /_auth {
            internal;
            if (\$http_x_user = good) {
                return 204;
            }
            if (\$http_x_user = forbidden) {
                return 403;
            }
            return 401;
        }

$auth_locations
    }

    # the static upstream: ranges, Accept-Ranges: bytes, the \@denied page
    server {
        listen 127.0.0.1:%%PORT_1%%;
        access_log %%PREFIX%%/logs/static.log;
        root %%PREFIX%%/html;
    }

    # everything else (port 2): the cache at server level, default key
    server {
        listen 127.0.0.1:%%PORT_2%% reuseport;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 1m;
        proxy_http_version 1.1;
        root %%PREFIX%%/html;

        # the default key
        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }

        # the same, unbuffered
        location /unbuf/ {
            proxy_buffering off;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # the README's per-customer key
        location /readme/ {
            deepseek_guard_cache_key "\$request_method|\$host\$request_uri|\$deepseek_guard_auth_sha256|\$deepseek_guard_body_sha256";
            proxy_pass http://%%MOCK%%/v1/;
        }

        # a key that does not tell credentials apart
        location /nocred/ {
            deepseek_guard_cache_key "\$request_method|\$request_uri|\$deepseek_guard_body_sha256";
            proxy_pass http://%%MOCK%%/v1/;
        }

        # 206 made cacheable by the operator: still never stored
        location /range/ {
            deepseek_guard_cache_valid 200 206 1m;
            proxy_pass http://127.0.0.1:%%PORT_1%%/;
        }

        # "any" status made cacheable: a 304 is still never stored
        location /cond/ {
            deepseek_guard_cache_valid any 1m;
            proxy_pass http://127.0.0.1:%%PORT_1%%/;
        }

        # the maintenance fallback of a new user
        location /maint/ {
            proxy_intercept_errors on;
            error_page 502 503 504 = /maint.json;
            proxy_pass http://%%MOCK%%/v1/;
        }
        location = /maint.json { }

        # the body digest evaluated in the rewrite phase, before the body
        location /early/ {
            set \$h \$deepseek_guard_body_sha256;
            proxy_pass http://%%MOCK%%/v1/;
        }
$shared_loc
    }

    # the digest evaluated in the SERVER rewrite phase (port 3)
    server {
        listen 127.0.0.1:%%PORT_3%% reuseport;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 1m;
        proxy_http_version 1.1;
        set \$h \$deepseek_guard_body_sha256;

        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }
    }
EOF
}

config(0);
$t->start;

# ------------------------------------------------ helpers

sub xcs { DSG::Test::cache_status($_[0]) }

sub calls { $t->mock_stats->{chat_requests} }

# one chat request to port $port (0 = auth server, 2 = the other) and
# $uri with the prompt $content and headers @h; returns the response with
# cache => its X-Cache-Status (COALESCED as HIT)
sub ask {
    my ($port, $uri, $content, @h) = @_;
    my $r = $t->chat(port => $t->port($port), uri => $uri,
                     content => $content, headers => [@h]);
    $r->{cache} = xcs($r);
    return $r;
}

sub get2 {
    my ($uri, @h) = @_;
    my $r = $t->http(method => 'GET', uri => $uri, port => $t->port(2),
                     headers => [@h]);
    $r->{cache} = xcs($r);
    return $r;
}

sub is_answer { ($_[0]{body} // '') =~ /"object":"chat\.completion"/ ? 1 : 0 }

# ------------------------------------------------ 1. decide after access

# auth_basic without / with a wrong password, auth_request 401 / 403, deny
# 403: the unauthorized client of a location whose answer is cached
my $basic_ok  = 'Basic ' . encode_base64('user:secret', '');
my $basic_bad = 'Basic ' . encode_base64('user:wrong', '');
my %GOOD = (basic => ['Authorization' => $basic_ok],
            areq  => ['X-User' => 'good'],
            deny  => []);
my %BAD = (
    basic => [['auth_basic, no password', [], 401],
              ['auth_basic, wrong password', ['Authorization' => $basic_bad], 401]],
    areq  => [['auth_request 401', ['X-User' => 'nobody'], 401],
              ['auth_request 403', ['X-User' => 'forbidden'], 403]],
    deny  => [['deny', ['X-Real-IP' => '10.1.2.3'], 403]],
);

for my $m (sort keys %ACCESS) {
    for my $e (sort keys %ERRPAGE) {
        my $uri = "/$m-$e/chat/completions";
        my $what = "$m-$e";
        my $prompt = "trust $what";
        $t->mock_reset;

        # the authorized client fills the entry and then hits it: without a
        # stored answer the checks below would prove nothing (public: see
        # the configuration)
        my @fill = (@{ $GOOD{$m} }, 'X-Mock-Header' => 'Cache-Control: public');
        my $a = ask(0, $uri, $prompt, @fill);
        my $b = ask(0, $uri, $prompt, @fill);
        is("$a->{status} $b->{status}", '200 200', "$what: authorized client: 200");
        is("$a->{cache} $b->{cache}", 'MISS HIT', '... MISS, then HIT: the answer is cached');
        is($b->{body}, $a->{body}, '... the cached answer');

        # the unauthorized clients: the error status (error_page to a URI)
        # or the error page's own 200 ("=" and named), the denied page's
        # body, never the cached answer, never a HIT
        for my $bad (@{ $BAD{$m} }) {
            my ($name, $h, $status) = @$bad;
            my $want = $e eq 'uri' ? $status : 200;
            my $r = ask(0, $uri, $prompt, @$h);
            is($r->{status}, $want, "$what: $name: status $want");
            ok(!is_answer($r) && index($r->{body}, $a->{body}) < 0,
               '... not the cached answer')
                or diag "got: $r->{body}";
            is($r->{body}, $DENIED, '... the denied page');
            isnt($r->{cache}, 'HIT', '... not a HIT');
        }

        # the entry is intact (the denied page was not stored under the
        # prompt's key) and no unauthorized request reached the upstream
        my $c = ask(0, $uri, $prompt, @fill);
        is("$c->{cache} $c->{status}", 'HIT 200', "$what: the authorized client still hits");
        is($c->{body}, $a->{body}, '... the real answer');
        is(calls(), 1, '... one upstream call in all');
    }
}

# ------------------------------------------------ 2. credentials

# The default key: customer A fills (X-Mock-Pad makes A's answer A's own,
# so a leak shows in the body too); A hits it; B, a client without any
# credential, and the other credential headers never get it.
my @CRED = (
    ['Authorization', 'Bearer sk-customer-a', 'Bearer sk-customer-b'],
    ['X-Api-Key', 'A2', 'B2'],
    ['Api-Key', 'A3', 'B3'],
    ['Cookie', 'session=A4', 'session=B4'],
);
for my $loc ('/v1/', '/readme/') {
    my $key = $loc eq '/v1/' ? 'default key' : "README's key";
    for my $c (@CRED) {
        my ($hdr, $va, $vb) = @$c;
        my $uri = "${loc}chat/completions";
        my $prompt = "cred $loc $hdr";
        my $before = calls();
        my $a = ask(2, $uri, $prompt, $hdr => $va, 'X-Mock-Pad' => 7);
        my $a2 = ask(2, $uri, $prompt, $hdr => $va);
        is("$a->{cache} $a2->{cache}", 'MISS HIT', "$key, $hdr: A fills, A hits");
        is($a2->{body}, $a->{body}, "... A's answer");
        like($a->{body}, qr/"pad":"x{7}"/, "... (A's answer is padded)");

        my $b = ask(2, $uri, $prompt, $hdr => $vb);
        is($b->{cache}, 'MISS', "$key, $hdr: customer B: MISS");
        unlike($b->{body}, qr/"pad"/, "... not A's answer");
        is(calls() - $before, 2, '... the upstream was asked for B');

        # the README key's Authorization case is t/41's; the others are
        # new there, and the default key must separate every one
        my $n = ask(2, $uri, $prompt);
        is($n->{cache}, 'MISS', "$key, $hdr: no credential at all: MISS");
        unlike($n->{body}, qr/"pad"/, "... not A's answer");
        is(calls() - $before, 3, '... the upstream was asked');
    }
}

# A key without $deepseek_guard_auth_sha256: a credentialed answer is not
# stored (MISS twice, two upstream calls) ...
for my $c (@CRED) {
    my ($hdr, $va) = @$c;
    my $before = calls();
    my @r = map { ask(2, '/nocred/chat/completions', "nocred $hdr", $hdr => $va) } 1 .. 2;
    is(join(' ', map { $_->{cache} } @r), 'MISS MISS',
       "key without credentials, $hdr: not stored (MISS, MISS)");
    is(calls() - $before, 2, '... two upstream calls');
    ok(is_answer($r[1]), '... the upstream answer');
}

# ... unless the answer says it may be shared ...
for my $cc ('public', 'public, max-age=60', 's-maxage=60', 'must-revalidate') {
    my $before = calls();
    my @r = map { ask(2, '/nocred/chat/completions', "nocred cc $cc",
                      'Authorization' => 'Bearer sk-customer-a',
                      'X-Mock-Header' => "Cache-Control: $cc") } 1 .. 2;
    is(join(' ', map { $_->{cache} } @r), 'MISS HIT',
       "key without credentials, Cache-Control: $cc: stored (MISS, HIT)");
    is(calls() - $before, 1, '... one upstream call');
}

# ... and an answer to a request without credentials is stored as ever
{
    my @r = map { ask(2, '/nocred/chat/completions', 'nocred none') } 1 .. 2;
    is(join(' ', map { $_->{cache} } @r), 'MISS HIT',
       'key without credentials, no credential: stored (MISS, HIT)');
}

# ------------------------------------------------ 3. gzip

# The upstream compresses for a client that accepts gzip (X-Mock-Gzip).
{
    my $uri = '/v1/chat/completions';
    my @gz = ('X-Mock-Gzip' => 1);
    my $before = calls();

    # the gzip client fills: gzip bytes with their Content-Encoding
    my $g1 = ask(2, $uri, 'gzip prompt', @gz, 'Accept-Encoding' => 'gzip');
    is($g1->{status}, 200, 'gzip: the first (gzip) client: 200');
    is($g1->{headers}{'content-encoding'} // '', 'gzip', '... Content-Encoding: gzip');
    my $plain;
    ok(gunzip(\$g1->{body} => \$plain), '... gzip bytes') or diag $GunzipError;
    $plain //= '';
    ok(DSG::Test::json_decode($plain), '... of the JSON answer');

    # another gzip client, the same Accept-Encoding: a hit that keeps its
    # Content-Encoding, or the client cannot read the bytes
    my $g2 = ask(2, $uri, 'gzip prompt', @gz, 'Accept-Encoding' => 'gzip');
    is($g2->{cache}, 'HIT', 'gzip client again: HIT');
    is($g2->{headers}{'content-encoding'} // '', 'gzip', '... with Content-Encoding: gzip');
    my $p2 = '';
    gunzip(\$g2->{body} => \$p2);
    is($p2, $plain, '... gzip bytes of the same JSON answer');

    # a client that never asked for gzip: plain JSON, no Content-Encoding
    my $i1 = ask(2, $uri, 'gzip prompt', @gz);
    is($i1->{status}, 200, 'no Accept-Encoding: 200');
    ok(!defined $i1->{headers}{'content-encoding'}, '... no Content-Encoding')
        or diag "Content-Encoding: $i1->{headers}{'content-encoding'}";
    ok(DSG::Test::json_decode($i1->{body}), '... valid JSON, not gzip bytes');
    is($i1->{body}, $plain, '... the upstream answer');

    # gzip refused by q=0: identity too
    my $i2 = ask(2, $uri, 'gzip prompt', @gz, 'Accept-Encoding' => 'gzip;q=0, identity');
    ok(!defined $i2->{headers}{'content-encoding'}, 'Accept-Encoding gzip;q=0: no Content-Encoding');
    is($i2->{body}, $plain, '... the plain JSON answer');

    # the gzip client is still served gzip, with its Content-Encoding
    my $g3 = ask(2, $uri, 'gzip prompt', @gz, 'Accept-Encoding' => 'gzip');
    is($g3->{headers}{'content-encoding'} // '', 'gzip', 'gzip client after them: Content-Encoding: gzip');
    my $p3 = '';
    gunzip(\$g3->{body} => \$p3);
    is($p3, $plain, '... gzip bytes of the JSON answer');
    cmp_ok(calls() - $before, '>=', 2, '... the identity client went upstream');
}

# ------------------------------------------------ 4. Vary

{
    my $uri = '/v1/chat/completions';
    my @v = ('X-Mock-Header' => 'Vary: Accept-Language');
    my $before = calls();
    my $en1 = ask(2, $uri, 'vary prompt', @v, 'Accept-Language' => 'en');
    my $en2 = ask(2, $uri, 'vary prompt', @v, 'Accept-Language' => 'en');
    is("$en1->{cache} $en2->{cache}", 'MISS HIT', 'Vary: Accept-Language: en fills, en hits');
    is($en2->{headers}{vary} // '', 'Accept-Language', '... the hit replays Vary');
    my $fr1 = ask(2, $uri, 'vary prompt', @v, 'Accept-Language' => 'fr');
    is($fr1->{cache}, 'MISS', '... fr: MISS');
    is(calls() - $before, 2, '... the upstream was asked for fr');
    my $fr2 = ask(2, $uri, 'vary prompt', @v, 'Accept-Language' => 'fr');
    is($fr2->{cache}, 'HIT', '... fr again: HIT (its answer was stored)');

    $before = calls();
    my @s = map { ask(2, $uri, 'vary star', 'X-Mock-Header' => 'Vary: *') } 1 .. 2;
    is(join(' ', map { $_->{cache} } @s), 'MISS MISS', 'Vary: *: never stored (MISS, MISS)');
    is(calls() - $before, 2, '... two upstream calls');
}

# ------------------------------------------------ 5. Range

{
    # a Range request first: the static upstream's 206 (valid 206 is set)
    my $r1 = get2('/range/doc.txt', 'Range' => 'bytes=0-9');
    is($r1->{status}, 206, 'Range first: 206 from the upstream');
    is($r1->{body}, substr($DOC, 0, 10), '... its 10 bytes');

    # a plain GET must get the whole document, not the stored 206
    my $g1 = get2('/range/doc.txt');
    is($g1->{status}, 200, 'then a plain GET: 200, not the 206');
    is($g1->{body}, $DOC, '... the whole document');
    isnt($g1->{cache}, 'HIT', '... not a HIT of the Range answer');

    # the full 200 is stored
    my $g2 = get2('/range/doc.txt');
    is("$g2->{cache} $g2->{status}", 'HIT 200', 'plain GET again: HIT 200');
    is($g2->{body}, $DOC, '... the whole document');
    like($g2->{headers}{'accept-ranges'} // '', qr/^bytes$/, '... Accept-Ranges: bytes replayed');

    # a Range request on that full entry: the right bytes, as a 206
    my $len = length $DOC;
    my $r2 = get2('/range/doc.txt', 'Range' => 'bytes=5-14');
    is($r2->{status}, 206, 'Range on the full entry: 206');
    is($r2->{body}, substr($DOC, 5, 10), '... bytes 5-14');
    is($r2->{headers}{'content-range'} // '', "bytes 5-14/$len", '... Content-Range');
    is($r2->{cache}, 'HIT', '... answered from the entry');

    # and the entry is still the whole document
    my $g3 = get2('/range/doc.txt');
    is("$g3->{status} " . length($g3->{body}), "200 $len", 'plain GET after it: the whole document');
}

# ------------------------------------------------ 5b. conditional requests

{
    # learn the static document's validators through the uncached range
    # location's answer, then ask /cond/ conditionally first: the static
    # upstream answers 304, which must not be stored under the key a plain
    # GET uses
    my $v = get2('/range/doc.txt');
    my $etag = $v->{headers}{etag} // '';
    like($etag, qr/^"/, 'the static document has an ETag');
    my $c1 = get2('/cond/doc.txt', 'If-None-Match' => $etag);
    is($c1->{status}, 304, 'conditional first, valid any: 304 from the upstream');
    my $p1 = get2('/cond/doc.txt');
    is($p1->{status}, 200, '... a plain GET then: 200, not the stored 304');
    is($p1->{body}, $DOC, '... the whole document');
    # the 200 is stored; a conditional request on it: 304 from nginx's
    # not_modified filter, on the entry's ETag
    my $p2 = get2('/cond/doc.txt');
    is("$p2->{cache} $p2->{status}", 'HIT 200', '... stored: HIT 200');
    my $c2 = get2('/cond/doc.txt', 'If-None-Match' => $etag);
    is("$c2->{cache} $c2->{status}", 'HIT 304', 'a conditional request on the entry: HIT 304');
    is($c2->{body} // '', '', '... no body');
}

# ------------------------------------------------ 6. fallback page

{
    my $uri = '/maint/chat/completions';
    # the upstream fails: the client gets the maintenance page
    my $m = ask(2, $uri, 'maint prompt', 'X-Mock-Status' => 503);
    is($m->{status}, 200, 'upstream 503: the = /maint.json page (200)');
    is($m->{body}, $MAINT, '... the maintenance page');

    # the backend recovered: the same prompt gets the real answer
    my $before = calls();
    my $a = ask(2, $uri, 'maint prompt');
    is($a->{status}, 200, 'backend recovered: 200');
    ok(is_answer($a), '... the upstream answer, not the maintenance page')
        or diag "got: $a->{body}";
    isnt($a->{cache}, 'HIT', '... not a HIT');
    is(calls() - $before, 1, '... the upstream was asked');

    # the real answer is what gets stored
    my $b = ask(2, $uri, 'maint prompt');
    is("$b->{cache} $b->{status}", 'HIT 200', 'again: HIT');
    is($b->{body}, $a->{body}, '... of the real answer');
}

# ------------------------------------------------ 7. early digest

# set $h $deepseek_guard_body_sha256 runs before the body is read (in the
# location's rewrite phase on port 2, in the server's on port 3): two
# different prompts must still be two entries
for my $e ([2, '/early/', 'location'], [3, '/v1/', 'server']) {
    my ($port, $loc, $where) = @$e;
    my $uri = "${loc}chat/completions";
    my $before = calls();
    my $e1 = ask($port, $uri, "early one $where");
    my $e2 = ask($port, $uri, "early two $where");
    is("$e1->{cache} $e2->{cache}", 'MISS MISS',
       "early digest ($where set): two prompts, two entries (MISS, MISS)");
    isnt($e2->{body}, $e1->{body}, "... the second prompt gets its own answer");
    is(calls() - $before, 2, '... two upstream calls');
    my $e3 = ask($port, $uri, "early one $where");
    is($e3->{cache}, 'HIT', '... and the first prompt still hits');
    is($e3->{body}, $e1->{body}, '... its own answer');
}

# ------------------------------------------------ 8. close-delimited

for my $loc ('/v1/', '/unbuf/') {
    my $uri = "${loc}chat/completions";
    my $what = $loc eq '/v1/' ? 'buffered' : 'unbuffered';

    # the upstream closes after 40 bytes of a close-delimited answer: the
    # cut answer reaches this client, and must not be stored
    my $before = calls();
    my $cut = ask(2, $uri, "close cut $loc", 'X-Mock-Close-Delimited' => 40);
    is(length($cut->{body}), 40, "$what, close-delimited answer cut at 40 bytes: the client got 40")
        or diag explain $cut;
    my $next = ask(2, $uri, "close cut $loc");
    isnt($next->{cache}, 'HIT', '... the next request is not a HIT');
    ok(DSG::Test::json_decode($next->{body}), '... it gets the whole answer')
        or diag "got: $next->{body}";
    is(calls() - $before, 2, '... from the upstream');

    # a whole close-delimited answer: nothing proves it whole, not stored
    $before = calls();
    my @w = map { ask(2, $uri, "close whole $loc", 'X-Mock-Close-Delimited' => 0) } 1 .. 2;
    ok(DSG::Test::json_decode($w[0]{body}), "$what, whole close-delimited answer: the client got it");
    is(join(' ', map { $_->{cache} } @w), 'MISS MISS', '... not stored (MISS, MISS)');
    is(calls() - $before, 2, '... two upstream calls');
}

# ------------------------------------------------ 2b. credentials shared

# deepseek_guard_cache_credentials shared: the operator's explicit choice
# to share answers across customers on a key without credentials
{
    $t->stop;
    config(1);
    $t->allow_log(qr/unknown directive "deepseek_guard_cache_credentials"/);
    my $ok = eval { $t->start; 1 };
    ok($ok, 'deepseek_guard_cache_credentials shared: nginx starts') or diag $@;
    SKIP: {
        skip 'nginx did not start', 3 unless $ok;
        my $uri = '/shared/chat/completions';
        my $a = ask(2, $uri, 'shared', 'Authorization' => 'Bearer sk-customer-a');
        my $a2 = ask(2, $uri, 'shared', 'Authorization' => 'Bearer sk-customer-a');
        is("$a->{cache} $a2->{cache}", 'MISS HIT', '... a credentialed answer is stored');
        my $b = ask(2, $uri, 'shared', 'Authorization' => 'Bearer sk-customer-b');
        is($b->{cache}, 'HIT', '... and shared with customer B, as configured');
        is($b->{body}, $a->{body}, "... A's answer");
    }
    $t->stop;
}

# ------------------------------------------------ 9. names

# Zone, class and cache names outside [A-Za-z0-9_.-] fail nginx -t naming
# the directive's line (a quote would break the JSON error body and the
# RateLimit headers they are rendered in).  nginx is stopped: nginx -t only.
{
    my $srv = "    server {\n        listen 127.0.0.1:%%PORT%%;\n    }\n";
    my $ok_conf = "    deepseek_guard_zone a.b-c_1:1m key=\$remote_addr rate=1r/s;\n"
                . "    deepseek_guard_zone " . ('z' x 64) . ":1m key=\$remote_addr rate=1r/s;\n"
                . "    deepseek_guard_class cl.a-ss_1;\n"
                . "    deepseek_guard_cache_path %%PREFIX%%/cache2 keys_zone=l.l-m_1:1m;\n"
                . $srv;
    $t->write_config($ok_conf);
    my ($ok, $out) = $t->test_config;
    ok($ok, 'names of [A-Za-z0-9_.-], 64 characters: nginx -t passes') or diag $out;

    $t->config_fails('zone name with a quote',
        "    deepseek_guard_zone 'a\"b:1m' key=\$remote_addr rate=1r/s;\n$srv",
        qr/invalid.*a\\?"b/, qr/deepseek_guard_zone 'a"b:1m'/);
    $t->config_fails('zone name with a space',
        "    deepseek_guard_zone 'a b:1m' key=\$remote_addr rate=1r/s;\n$srv",
        qr/invalid.*a b/, qr/deepseek_guard_zone 'a b:1m'/);
    my $long = 'z' x 65;
    $t->config_fails('zone name of 65 characters',
        "    deepseek_guard_zone $long:1m key=\$remote_addr rate=1r/s;\n$srv",
        qr/invalid.*$long/, qr/deepseek_guard_zone $long:1m/);
    $t->config_fails('class name with a quote',
        "    deepseek_guard_class 'cl\"ass';\n$srv",
        qr/invalid.*cl\\?"ass/, qr/deepseek_guard_class 'cl"ass'/);
    $t->config_fails('keys_zone name with a quote',
        "    deepseek_guard_cache_path %%PREFIX%%/cache3 'keys_zone=l\"lm:1m';\n$srv",
        qr/invalid.*l\\?"lm/, qr/keys_zone=l"lm:1m/);
}

$t->done;
