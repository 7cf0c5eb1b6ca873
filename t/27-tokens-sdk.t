#!/usr/bin/perl
# A real client against a token budget: the OpenAI Node SDK (npm "openai",
# pinned in status/package-lock.json, installed by ./build.sh) sends chat
# completions for one key through nginx until the key's token budget
# refuses one.  The SDK must read our 429 and its retry-after-ms, wait that
# long and retry on its own, and the retry must be admitted: the caller
# sees only 200s, the last one late by the announced wait.  The
# x-ratelimit-*-tokens headers it got must be those of the budget.
#
# Budget: 300 tokens a minute (5 a second), bucket 300.  Each call asks
# max_tokens=100: the mock answers exactly 100 completion tokens and a
# prompt of 3 + 3 + 3 = 9 ("hello number <i>"), 109 used.  The reservation
# is the prompt estimate plus min(100, tokens_output=200) = 100: about 105.
# Two calls leave 300 - 218 = 82 (plus a little refill): the third call's
# reservation does not fit, and the 429 says how long until it does
# (about (105 - 82) / 5 = 5 s).

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);
use lib 't/lib';
use DSG::Test;

my $NODE = $ENV{DSG_NODE} || 'node';

my $t = DSG::Test->new(workers => 2);
my $repo = $t->repo;

ok(!system("$NODE --version >/dev/null 2>&1")
   && -d "$repo/status/node_modules/openai",
   'node and the OpenAI SDK are installed (./build.sh installs them)')
    or BAIL_OUT('node or status/node_modules/openai missing');

$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 8);
$t->write_config(<<'EOF2');
    log_format tok 'key=$http_authorization status=$status '
                   'st=$deepseek_guard_status '
                   'reserved=$deepseek_guard_tokens_reserved '
                   'used=$deepseek_guard_tokens_used '
                   'retry=$deepseek_guard_retry_after_ms';

    deepseek_guard_zone tpm:1m key=$http_authorization tokens=300/m
                        tokens_output=200 status=429;

    server {
        listen 127.0.0.1:%%PORT%%;
        access_log %%PREFIX%%/logs/tok.log tok;

        location /v1/ {
            deepseek_guard tpm;
            deepseek_guard_openai_headers on;
            proxy_pass http://%%MOCK%%;
        }
    }
EOF2
$t->start;

my $t0 = time;
my $out = `NODE_PATH='$repo/status/node_modules' $NODE '$repo/t/js/sdk-retry.js' 'http://127.0.0.1:${\ $t->port}/v1' sdk-key 100 3 2>&1`;
my $elapsed = time - $t0;
note "sdk: $out";
my $calls = eval { DSG::Test::json_decode($out) } || [];
is(scalar @$calls, 3, 'the SDK made its three calls');
is(join(' ', map { $_->{status} // 0 } @$calls), '200 200 200',
   '... and its caller saw three 200s: the 429 was retried by the SDK');

my @log = grep { /key=Bearer sdk-key/ } split /\n/,
          DSG::Test::_slurp($t->prefix . '/logs/tok.log');
note join "\n", @log;
my @st = map { /status=(\d+)/ ? $1 : 0 } @log;
is("@st", '200 200 429 200',
   'nginx answered 200, 200, 429, then 200 to the retry');
my ($retry) = map { /retry=(\d+)/ ? $1 : () } grep { /status=429/ } @log;
ok($retry && $retry >= 1000 && $retry <= 20000,
   "... the 429 announced a wait of ${\ ($retry // '-')} ms");
my $last = $calls->[2] || {};
cmp_ok($last->{ms} // 0, '>=', ($retry // 0) - 50,
       "... the SDK waited it out before its retry ($last->{ms} ms)");

# every answer carried the budget's headers; the used tokens are the
# mock's exact counts (100 completion + 9 prompt), settled after each call
for my $i (0 .. 2) {
    my $h = $calls->[$i]{headers} || {};
    is($h->{'x-ratelimit-limit-tokens'}, 300,
       "call $i: x-ratelimit-limit-tokens 300");
    like($h->{'x-ratelimit-reset-tokens'} // '', qr/^(?:\d+m)?(?:\d+(?:\.\d+)?s|\d+ms)$/,
         "call $i: x-ratelimit-reset-tokens is a duration");
    is($calls->[$i]{usage}{total_tokens}, 109, "call $i: 109 tokens used");
}
my @used = map { /used=(\d+)/ ? $1 : '-' } grep { /status=200/ } @log;
is("@used", '109 109 109', 'each admitted call settled at its usage: 109');

# remaining tokens as the client saw them: the bucket minus the settled
# calls minus this call's reservation, plus what refilled meanwhile
# (5 tokens a second)
my @res = map { /reserved=(\d+)/ ? $1 : 0 } grep { /status=200/ } @log;
my $near = 2 + 5 * (($calls->[0]{ms} // 0) + ($calls->[1]{ms} // 0)) / 1000;
my $rem0 = $calls->[0]{headers}{'x-ratelimit-remaining-tokens'} // -1;
my $rem1 = $calls->[1]{headers}{'x-ratelimit-remaining-tokens'} // -1;
cmp_ok(abs($rem0 - (300 - $res[0])), '<=', $near,
       "call 0: remaining $rem0 = 300 - its reservation $res[0]");
cmp_ok(abs($rem1 - (300 - 109 - $res[1])), '<=', $near,
       "call 1: remaining $rem1 = 300 - 109 - its reservation $res[1]");

$t->done;
