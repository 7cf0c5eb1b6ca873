#!/usr/bin/perl
# deepseek_guard_cache keys: the whole request body is in the key, also
# when it spilled to a temporary file (stock $request_body would be empty
# and different prompts would collide); canonical JSON (key order and
# whitespace) only when enabled; invalid JSON with canonical on keyed on
# its raw bytes; chunked and Content-Length bodies alike; the per-customer
# key with $deepseek_guard_auth_sha256, which the default key has too.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Digest::SHA qw(sha256_hex);

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 3);

# client_body_buffer_size 16k: every body above 16 KB is written to a
# client_body_temp file, which is what the 64 KB / 100 KB prompts need.
# The access log records the body digest the module computed, so it can be
# compared with the digest of what the test sent.
$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;
    log_format keys '$status "$deepseek_guard_cache_status" $uri '
                    'sha=$deepseek_guard_body_sha256 tag=$http_x_tag';
    client_body_buffer_size 16k;
    client_max_body_size 10m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log keys;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 1m;
        proxy_http_version 1.1;
        proxy_buffering off;

        # default key, raw body bytes
        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }

        # canonical JSON; 400 is cached too so the mock's answer to an
        # invalid body can show how that body was keyed
        location /canon/ {
            deepseek_guard_cache_json_canonical on;
            deepseek_guard_cache_valid 200 400 1m;
            proxy_pass http://%%MOCK%%/v1/;
        }

        # the documented per-customer key
        location /cust/ {
            deepseek_guard_cache_key "$request_method|$host$request_uri|$deepseek_guard_auth_sha256|$deepseek_guard_body_sha256";
            proxy_pass http://%%MOCK%%/v1/;
        }
    }
EOF
$t->start;

my $tagn = 0;

sub send_body {
    my ($uri, $body, @h) = @_;
    my $tag = 'k' . ++$tagn;
    my $r = $t->http(method => 'POST', uri => $uri, body => $body,
                     headers => [['Content-Type', 'application/json'],
                                 ['X-Tag', $tag], @h]);
    $r->{tag} = $tag;
    $r->{cache} = DSG::Test::cache_status($r);
    return $r;
}

# the $deepseek_guard_body_sha256 logged for a request
sub logged_sha {
    my ($tag) = @_;
    $t->wait_until(sub { $t->access_log =~ /tag=\Q$tag\E$/m }, 3);
    my ($s) = $t->access_log =~ /sha=(\S*) tag=\Q$tag\E$/m;
    return $s // '';
}

sub calls { $t->mock_stats->{chat_requests} }

sub prompt_body {
    my ($content) = @_;
    return '{"model":"deepseek-chat","messages":[{"role":"user","content":"'
           . $content . '"}]}';
}

# ------------------------------------------------ spilled bodies

{
    $t->mock_reset;

    # 70 000 identical bytes, then one differing byte: the two bodies agree
    # on their first 64 KB (and on every in-memory buffer nginx may hold)
    my $a = prompt_body(('A' x 70000) . 'one');
    my $b = prompt_body(('A' x 70000) . 'two');
    is(substr($a, 0, 65536), substr($b, 0, 65536), 'the bodies share their first 64 KB');

    my $ra = send_body('/v1/chat/completions', $a);
    my $rb = send_body('/v1/chat/completions', $b);
    is("$ra->{status} $rb->{status}", '200 200', 'two long prompts: 200');
    is("$ra->{cache} $rb->{cache}", 'MISS MISS', '... two different entries (MISS, MISS)');
    is(calls(), 2, '... two upstream calls');
    isnt($ra->{body}, $rb->{body}, '... different answers');

    # the digest is over the whole body, read back from the temporary file
    is(logged_sha($ra->{tag}), sha256_hex($a), '... $deepseek_guard_body_sha256 of all of A');
    is(logged_sha($rb->{tag}), sha256_hex($b), '... and of all of B');
    like($t->error_log, qr/client request body is buffered to a temporary file/,
         '... the bodies were in temporary files');

    # each answered from its own entry
    my $ra2 = send_body('/v1/chat/completions', $a);
    my $rb2 = send_body('/v1/chat/completions', $b);
    is("$ra2->{cache} $rb2->{cache}", 'HIT HIT', 'again: HIT, HIT');
    is($ra2->{body}, $ra->{body}, '... A gets the answer to A');
    is($rb2->{body}, $rb->{body}, '... B gets the answer to B');
    is(calls(), 2, '... no more upstream calls');

    # identical 100 KB bodies: one upstream call, identical answers
    my $big = prompt_body(join '', map { chr(97 + $_ % 26) } 1 .. 100_000);
    cmp_ok(length $big, '>', 100_000, 'a 100 KB body');
    my @r = map { send_body('/v1/chat/completions', $big) } 1 .. 4;
    is_deeply([map { $_->{cache} } @r], [qw(MISS HIT HIT HIT)], '... MISS then HIT');
    is(scalar(grep { $_->{body} eq $r[0]{body} && $_->{status} == 200 } @r), 4,
       '... identical answers');
    is(calls(), 3, '... one upstream call for it');
    is($t->mock_stats->{bodies}{ sha256_hex($big) }, 1,
       '... the mock saw that body once, whole');

    # the same body sent chunked: the module reads it all the same, one key
    my $chunked = join('', map { sprintf("%x\r\n%s\r\n", length $_, $_) }
                           unpack('(a8000)*', $big)) . "0\r\n\r\n";
    my $rc = send_body('/v1/chat/completions', $chunked,
                       ['Transfer-Encoding', 'chunked']);
    is($rc->{cache}, 'HIT', 'the same body, chunked: HIT');
    is($rc->{body}, $r[0]{body}, '... same answer');
    is(logged_sha($rc->{tag}), sha256_hex($big), '... same body digest');

    # a query string is part of the default key
    my $rq = send_body('/v1/chat/completions?x=1', $big);
    is($rq->{cache}, 'MISS', 'another URI: another entry');
}

# ------------------------------------------------ canonical JSON

{
    $t->mock_reset;

    # the same object: other key order, other whitespace; the mock's answer
    # depends on the raw bytes, so the test can tell whose answer came back
    my $j1 = '{"model":"deepseek-chat","messages":[{"role":"user","content":"canon"}],"temperature":0}';
    my $j2 = "{ \"temperature\" : 0,\n  \"messages\" : [ { \"content\" : \"canon\", \"role\" : \"user\" } ],\n  \"model\" : \"deepseek-chat\" }\n";
    isnt($j1, $j2, 'two spellings of one JSON object');

    # canonical off (/v1/): two entries, two upstream calls
    my $o1 = send_body('/v1/chat/completions', $j1);
    my $o2 = send_body('/v1/chat/completions', $j2);
    is("$o1->{cache} $o2->{cache}", 'MISS MISS', 'canonical off: two entries');
    isnt($o1->{body}, $o2->{body}, '... each its own answer');
    is(calls(), 2, '... two upstream calls');

    # canonical on: one entry
    my $c1 = send_body('/canon/chat/completions', $j1);
    my $c2 = send_body('/canon/chat/completions', $j2);
    is("$c1->{cache} $c2->{cache}", 'MISS HIT', 'canonical on: one entry (MISS, HIT)');
    is($c2->{body}, $c1->{body}, '... the second spelling gets the first answer');
    is(calls(), 3, '... one upstream call');
    is(logged_sha($c1->{tag}), logged_sha($c2->{tag}), '... same body digest');
    isnt(logged_sha($o1->{tag}), logged_sha($o2->{tag}),
         '... while canonical off digests differ');

    # a different value is still a different entry under canonical
    my $c3 = send_body('/canon/chat/completions', $j1 =~ s/"temperature":0/"temperature":1/r);
    is($c3->{cache}, 'MISS', 'canonical on: another value, another entry');

    # canonical over a spilled body: 100 KB pretty-printed vs compact
    my $long = 'z' x 100_000;
    my $p1 = qq({"messages":[{"role":"user","content":"$long"}],"model":"deepseek-chat"});
    my $p2 = qq({\n  "model": "deepseek-chat",\n  "messages": [\n    {"content": "$long", "role": "user"}\n  ]\n});
    my $l1 = send_body('/canon/chat/completions', $p1);
    my $l2 = send_body('/canon/chat/completions', $p2);
    is("$l1->{cache} $l2->{cache}", 'MISS HIT', 'canonical on, 100 KB spilled bodies: one entry');
    is($l2->{body}, $l1->{body}, '... same answer');

    # invalid JSON with canonical on: still served, keyed on the raw bytes
    # (the mock answers 400 "Invalid JSON body", cached with valid 400)
    my $bad1 = '{"messages": [ not json';
    my $bad2 = '{"messages":  [ not json';
    my @b = map { send_body('/canon/chat/completions', $_) } $bad1, $bad1, $bad2;
    is_deeply([map { $_->{status} } @b], [400, 400, 400], 'invalid JSON, canonical on: answered (400 from the mock)');
    like($b[0]{body}, qr/Invalid JSON body/, '... the upstream answer');
    is_deeply([map { $_->{cache} } @b], [qw(MISS HIT MISS)],
              '... keyed on its raw bytes: same bytes HIT, other whitespace MISS');
    is(logged_sha($b[0]{tag}), sha256_hex($bad1), '... digest of the raw bytes');
    like($t->error_log, qr/request body is not canonical JSON/, '... logged (info)');

    # duplicate keys are not canonicalized (parsers disagree on them)
    my $d1 = '{"model":"deepseek-chat","model":"x","messages":[{"role":"user","content":"dup"}]}';
    my $rd = send_body('/canon/chat/completions', $d1);
    is(logged_sha($rd->{tag}), sha256_hex($d1), 'duplicate keys: keyed on the raw bytes');
}

# ------------------------------------------------ per-customer key

{
    $t->mock_reset;
    my $body = prompt_body('customer prompt');
    my @ka = (['Authorization', 'Bearer sk-customer-a']);
    my @kb = (['Authorization', 'Bearer sk-customer-b']);

    # two customers, one prompt: each gets its own upstream call
    my $a1 = send_body('/cust/chat/completions', $body, @ka);
    my $b1 = send_body('/cust/chat/completions', $body, @kb);
    is("$a1->{cache} $b1->{cache}", 'MISS MISS', 'two API keys, one prompt: two entries');
    is(calls(), 2, '... two upstream calls');

    # and each its own hit afterwards
    my $a2 = send_body('/cust/chat/completions', $body, @ka);
    my $b2 = send_body('/cust/chat/completions', $body, @kb);
    is("$a2->{cache} $b2->{cache}", 'HIT HIT', '... each key hits its own entry');
    my $n1 = send_body('/cust/chat/completions', $body);
    is($n1->{cache}, 'MISS', '... no Authorization: a third entry');
    is(calls(), 3, '... three upstream calls in all');

    # the default key names the credentials too: customers never share
    my $s1 = send_body('/v1/chat/completions', $body, @ka);
    my $s2 = send_body('/v1/chat/completions', $body, @kb);
    my $s3 = send_body('/v1/chat/completions', $body, @ka);
    is("$s1->{cache} $s2->{cache} $s3->{cache}", 'MISS MISS HIT',
       'default key: the two customers are kept apart');
}

$t->done;
