#!/usr/bin/perl
# Token budgets (deepseek_guard_zone ... tokens=N/m): configuration errors,
# the refusals (a reservation larger than the bucket; a spent budget) with
# the OpenAI error body of type "tokens", and the settlement: after a mix of
# JSON answers, streams with and without usage, streams the upstream cut,
# a client that went away mid-stream and answers the upstream refused,
# what the zone counted as used is exactly what the mock LLM counted
# (for the cut streams: the content events delivered, plus the prompt
# estimate, the only part nobody told us), and reserved - refunded +
# charged = used.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# ---------------------------------------------------------- nginx -t

my $srv = <<'EOF2';
    server {
        listen 127.0.0.1:%%PORT%%;
        location / { deepseek_guard z; empty_gif; }
    }
EOF2
$t->config_fails('tokens= without a unit',
    "deepseek_guard_zone z:1m key=a tokens=100;\n$srv",
    qr/invalid token budget "tokens=100"/,
    qr/deepseek_guard_zone z:1m/);
$t->config_fails('tokens=0',
    "deepseek_guard_zone z:1m key=a tokens=0/m;\n$srv",
    qr/invalid token budget "tokens=0\/m"/,
    qr/deepseek_guard_zone z:1m/);
$t->config_fails('tokens_burst= without tokens=',
    "deepseek_guard_zone z:1m key=a rate=1r/s tokens_burst=10;\n$srv",
    qr/tokens_burst= and tokens_output= need tokens=/,
    qr/deepseek_guard_zone z:1m/);
$t->config_fails('tokens= in a fleet zone',
    "deepseek_guard_fleet redis=127.0.0.1:1;\n"
    . "deepseek_guard_zone z:1m key=a tokens=10/m fleet=on;\n$srv",
    qr/tokens= is not supported in a fleet=on zone/,
    qr/deepseek_guard_zone z:1m/);

# ---------------------------------------------------------- the gateway

my $mport = $t->mock_start(first_token_ms => 0, token_ms => 2, tokens => 20);
$t->write_config(<<'EOF2');
    log_format tok 'tag=$http_x_tag status=$status st=$deepseek_guard_status '
                   'reserved=$deepseek_guard_tokens_reserved '
                   'used=$deepseek_guard_tokens_used';

    # shared: backend capacity in tokens (503): a spent budget queues
    deepseek_guard_class default queue=8 queue_timeout=20s;
    deepseek_guard_zone shared:1m key=backend tokens=1200/m
                                 tokens_burst=60 tokens_output=10;

    # big: the settlement's zone; small: a bucket of 100 tokens
    deepseek_guard_zone big:1m   key=$http_authorization tokens=1000000/m
                                 tokens_output=50 status=429;
    deepseek_guard_zone small:1m key=$http_authorization tokens=100/m
                                 tokens_output=10 status=429;

    server {
        listen 127.0.0.1:%%PORT%%;
        access_log %%PREFIX%%/logs/tok.log tok;
        proxy_http_version 1.1;
        proxy_buffering off;

        location /v1/ {
            deepseek_guard big;
            proxy_pass http://%%MOCK%%;
        }

        location /small/ {
            deepseek_guard small;
            deepseek_guard_openai_headers on;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /usage/ {
            deepseek_guard big;
            deepseek_guard_tokens_stream_usage on;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /shared/ {
            deepseek_guard shared;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
EOF2
$t->start;
my $LOG = $t->prefix . '/logs/tok.log';

# ---------------------------------------------------------- refusals

# 2000 ASCII bytes: an estimate near 500 tokens, in a bucket of 100
my $r = $t->chat(uri => '/small/chat/completions', key => 'big-one',
                 content => 'x ' x 1000);
is($r->{status}, 429, 'a reservation larger than the bucket: 429');
my $e = eval { DSG::Test::json_decode($r->{body}) } || {};
is($e->{error}{type}, 'tokens', '... error type "tokens"');
like($e->{error}{message} // '', qr/too large for the token budget/,
     '... the message says the request is too large');
is($r->{headers}{'x-should-retry'}, 'false',
   '... and x-should-retry: false (retrying cannot help)');

# a small key: 5 tokens of prompt estimate + 10 of output per request
my @st;
for my $i (1 .. 12) {
    my $x = $t->chat(uri => '/small/chat/completions', key => 'small',
                     content => 'hi', max_tokens => 10);
    push @st, $x->{status};
    if ($x->{status} == 429) {
        $r = $x;
        last;
    }
}
is($r->{status}, 429, "a spent budget: 429 after @st");
$e = eval { DSG::Test::json_decode($r->{body}) } || {};
is($e->{error}{type}, 'tokens', '... error type "tokens"');
like($e->{error}{message} // '', qr/Rate limit reached for tokens/,
     '... "Rate limit reached for tokens"');
my $ms = $r->{headers}{'retry-after-ms'} // 0;
ok($ms > 0 && $ms <= 60000, "... retry-after-ms $ms");
is($r->{headers}{'retry-after'}, int(($ms + 999) / 1000),
   '... Retry-After is its ceiling in seconds');
is($r->{headers}{'x-ratelimit-limit-tokens'}, 100,
   '... x-ratelimit-limit-tokens on the refusal too');
sleep($ms / 1000 + 0.05);
is($t->chat(uri => '/small/chat/completions', key => 'small',
            content => 'hi', max_tokens => 10)->{status},
   200, '... admitted again once the announced wait is over');

# a budget of shared capacity (status 503) queues instead: 60 tokens of
# bucket, 20 a second; each request reserves about 15 and uses about 12
my @q = map { $t->chat_req(uri => '/shared/chat/completions', key => "q$_",
                           content => 'hi', max_tokens => 5,
                           headers => { 'X-Tag' => "shared$_" }) } 1 .. 10;
my @qr = $t->parallel(\@q, timeout => 30);
is(join(' ', map { $_->{status} } @qr), join(' ', (200) x 10),
   'a spent shared token budget: every request served');
my $ql = $t->log_by_tag($LOG, map { "shared$_" } 1 .. 10);
my @queued = grep { $ql->{$_}{st} eq 'QUEUED' } keys %$ql;
cmp_ok(scalar @queued, '>=', 3, '... ' . scalar(@queued)
       . ' of them after waiting in the queue for the bucket');

# ---------------------------------------------------------- settlement

$t->mock_reset;
my $m0 = $t->metrics;

sub chat_bg {
    my ($tag, %o) = @_;
    my $h = delete $o{h} || {};
    return $t->chat_req(key => 'settle', headers => { 'X-Tag' => $tag, %$h },
                        %o);
}
my @reqs = (
    # JSON answers: usage in the body
    (map { chat_bg("json$_", content => "json prompt $_ " . ('word ' x (10 * $_))) } 1 .. 4),
    (map { chat_bg("jmax$_", content => "capped $_", max_tokens => 5 + $_) } 1 .. 3),
    # streams with usage
    (map { chat_bg("sse$_", content => "stream me $_", stream => 1,
                   extra => { stream_options => { include_usage => JSON::PP::true } }) } 1 .. 3),
    # streams the upstream cuts after 7 content events
    (map { chat_bg("cut$_", content => "cut stream $_", stream => 1,
                   extra => { stream_options => { include_usage => JSON::PP::true } },
                   h => { 'X-Mock-Abort-After' => 7 }) } 1 .. 2),
    # refused by the upstream
    (map { chat_bg("err$_", content => "refused $_",
                   h => { 'X-Mock-Status' => 503 }) } 1 .. 2),
    (map { chat_bg("bad$_", content => "bad $_", stream => 0,
                   extra => { stream_options => { include_usage => JSON::PP::true } }) } 1 .. 2),
);
$t->parallel(\@reqs, timeout => 30);

# a client that goes away mid-stream
my $gone = $t->http(%{ chat_bg('gone', content => 'leave early', stream => 1,
                               h => { 'X-Mock-Token-Ms' => 50 }) },
                    abort_after_bytes => 600);

ok($t->wait_until(sub {
    my %l = %{ $t->log_by_tag($LOG, 'gone') };
    return $l{gone};
}, 10), 'the settlement requests are all logged');
$t->settle('settlement', 10);

my $ms_ = $t->mock_stats->{tokens_by_key}{'Bearer settle'} || {};
# a request is settled in its cleanup, just after its log line: wait for
# the counters to balance (they do once every settlement request is done)
my $m1;
$t->wait_until(sub {
    $m1 = $t->metrics;
    my $k = 'deepseek_guard_tokens_total{zone="big",class="default",kind=';
    ($m1->{"${k}\"reserved\"}"} // 0) - ($m1->{"${k}\"refunded\"}"} // 0)
        + ($m1->{"${k}\"charged\"}"} // 0) == ($m1->{"${k}\"used\"}"} // 0);
}, 5);
my $d = sub {
    my ($kind) = @_;
    my $k = "deepseek_guard_tokens_total{zone=\"big\",class=\"default\",kind=\"$kind\"}";
    return ($m1->{$k} // 0) - ($m0->{$k} // 0);
};
my ($reserved, $refunded, $charged, $used) = map { $d->($_) } qw(reserved refunded charged used);
note "zone big: reserved $reserved refunded $refunded charged $charged used $used; "
     . "mock: " . join(' ', map { "$_=" . ($ms_->{$_} // 0) } sort keys %$ms_);
is($reserved - $refunded + $charged, $used,
   'reserved - refunded + charged = used');

# what the zone must have counted: the mock's completed usage, plus for
# each cut stream (the upstream's cuts and the client's) the content
# events it delivered and our prompt estimate (reserved - the output part)
my @cut = ((map { "cut$_" } 1 .. 2), 'gone');
my $log = $t->log_by_tag($LOG, @cut);
my $est = 0;
$est += $log->{$_}{reserved} - 50 for @cut;
note join ', ', map { "$_: reserved $log->{$_}{reserved} used $log->{$_}{used}" } @cut;
is($ms_->{cut}, 3, 'the mock saw 3 cut streams');
is($used, $ms_->{prompt} + $ms_->{completion} + $ms_->{completion_delivered} + $est,
   'used = the mock\'s usage of completed answers + the delivered content of '
   . 'cut streams + their prompt estimates');

my @tags = map { ("bad$_", "err$_") } 1 .. 2;
my $all = $t->log_by_tag($LOG, @tags);
is(join(' ', map { "$all->{$_}{status}:$all->{$_}{used}" } @tags),
   '400:0 503:0 400:0 503:0', 'answers the upstream refused are refunded in full');
@tags = map { "jmax$_" } 1 .. 3;
$all = $t->log_by_tag($LOG, @tags);
is(join(' ', map { $all->{$_}{used} - $all->{$_}{reserved} < 0 ? 'refund' : 'charge' } @tags),
   'refund refund refund', 'max_tokens caps the output part: settled with a refund');

# deepseek_guard_tokens_stream_usage: a stream that did not ask for its
# usage is asked for it upstream, settled at it exactly, and the client
# never sees the usage event; a client that asked gets it; requests that
# are not streams are left alone (the mock refuses stream_options there)
$t->mock_reset;
my @u = (
    $t->chat_req(uri => '/usage/chat/completions', key => 'usage1',
                 content => 'please count me', stream => 1,
                 headers => { 'X-Tag' => 'u-plain' }),
    $t->chat_req(uri => '/usage/chat/completions', key => 'usage2',
                 content => 'I asked myself', stream => 1,
                 extra => { stream_options => { include_usage => JSON::PP::true } },
                 headers => { 'X-Tag' => 'u-asked' }),
    $t->chat_req(uri => '/usage/chat/completions', key => 'usage3',
                 content => 'no stream', stream => 0,
                 headers => { 'X-Tag' => 'u-json' }),
    $t->chat_req(uri => '/usage/chat/completions', key => 'usage4',
                 content => 'no stream key', headers => { 'X-Tag' => 'u-none' }),
);
my @ur = $t->parallel(\@u, timeout => 20);
is(join(' ', map { $_->{status} } @ur), '200 200 200 200',
   'stream_usage: streams and non-streams answered 200');
my @ev = DSG::Test::sse_data($ur[0]);
is(scalar(grep { /"usage":\{/ } @ev), 0,
   '... the client that did not ask sees no usage event');
is(scalar(grep { /"content":"tok/ } @ev), 20, '... and all 20 content events');
is($ev[-1], '[DONE]', '... up to [DONE]');
my @ev2 = DSG::Test::sse_data($ur[1]);
is(scalar(grep { /"choices":\[\],.*"usage":\{/ } @ev2), 1,
   '... the client that asked gets its usage event');
my $ul = $t->log_by_tag($LOG, qw(u-plain u-asked u-json u-none));
my $us = $t->mock_stats->{tokens_by_key};
for my $k (1 .. 4) {
    my $tag = (qw(u-plain u-asked u-json u-none))[$k - 1];
    my $mk = $us->{"Bearer usage$k"} || {};
    is($ul->{$tag}{used}, ($mk->{prompt} // 0) + ($mk->{completion} // -1),
       "... $tag settled at the mock's usage ($ul->{$tag}{used})");
}

# a complete stream without usage: the prompt estimate and its 20 content
# events (the mock's tokens=20), as nothing else tells
$r = $t->chat(key => 'plain', content => 'plain stream', stream => 1,
              headers => { 'X-Tag' => 'plain' });
is($r->{status}, 200, 'a stream without usage');
$all = $t->log_by_tag($LOG, 'plain');
is($all->{plain}{used}, $all->{plain}{reserved} - 50 + 20,
   '... settled at its prompt estimate + its 20 content events');

$t->done;
