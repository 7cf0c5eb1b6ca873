#!/usr/bin/perl
# The mock LLM upstream (t/mock/mock_llm.py) under the harness: many slow
# concurrent streams, capacity 503s, deterministic answers, and nginx
# (with the module loaded) proxying JSON and SSE to it.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# ------------------------------------------------ 550 slow concurrent streams

my $mport = $t->mock_start(capacity => 600, first_token_ms => 1000,
                           token_ms => 50, tokens => 10);
ok($mport, 'mock started');

my @reqs = map { $t->chat_req(content => "stream $_", stream => 1,
                              port => $mport, timeout => 30) } 1 .. 550;
my @res = $t->parallel(\@reqs, timeout => 40);

my @ok = grep { $_->{status} == 200 } @res;
is(scalar @ok, 550, '550 concurrent streams: all 200')
    or diag explain [map { $_->{error} || $_->{status} } grep { $_->{status} != 200 } @res[0 .. 4]];
is(scalar(grep { $_->{body} =~ /data: \[DONE\]\n\n\z/ } @res), 550,
   '... all end with data: [DONE]');
is(scalar(grep { (() = DSG::Test::sse_data($_->{body})) == 12 } @res), 550,
   '... each with 10 tokens, the stop event and [DONE]');
is(scalar(grep { ($_->{headers}{'content-type'} // '') eq 'text/event-stream' } @res),
   550, '... as text/event-stream');
ok(!(grep { $_->{ms} < 1000 } @ok), '... none faster than first_token_ms');

my $st = $t->mock_stats;
cmp_ok($st->{max_inflight}, '>=', 500, 'mock max_inflight >= 500')
    or diag explain $st->{max_inflight};
is($st->{completed}, 550, 'mock completed 550');
is($st->{rejected_503}, 0, 'mock rejected none');

# ------------------------------------------------ determinism

{
    my %o = (content => 'determinism', port => $mport);
    $t->mock_config({ first_token_ms => 0, token_ms => 0 });
    my ($a, $b) = map { $t->chat(%o) } 1 .. 2;
    is($a->{status}, 200, 'JSON answer');
    is($a->{body}, $b->{body}, 'same body twice: identical JSON answer');
    my $d = DSG::Test->json_decode($a->{body});
    like($d->{choices}[0]{message}{content} // '', qr/^tok0-/, '... a chat completion');

    ($a, $b) = map { $t->chat(%o, stream => 1) } 1 .. 2;
    is($a->{body}, $b->{body}, 'same body twice: identical SSE answer');
    isnt($a->{body}, $t->chat(%o, content => 'other', stream => 1)->{body},
         'another body: another answer');

    $t->mock_reset;
    $t->chat(%o) for 1 .. 2;
    my $bodies = $t->mock_stats->{bodies};
    is_deeply([values %$bodies], [2], 'mock counts the body twice');
}

$t->mock_stop;

# ------------------------------------------------ capacity: 503 above it

{
    my $p = $t->mock_start(name => 'small', capacity => 5,
                           first_token_ms => 1000, tokens => 2);
    my @res = $t->parallel([map { $t->chat_req(content => "cap $_", port => $p) }
                            1 .. 20], timeout => 20);
    is(scalar(grep { $_->{status} == 200 } @res), 5, 'capacity 5: five 200');
    my @busy = grep { $_->{status} == 503 } @res;
    is(scalar @busy, 15, '... fifteen 503');
    is(scalar(grep { $_->{body} =~ /Server is busy/ } @busy), 15,
       '... "Server is busy"');
    is($t->mock_stats('small')->{rejected_503}, 15, '... counted by the mock');
    $t->mock_stop('small');
}

# ------------------------------------------------ nginx in front of the mock

$t->mock_start(first_token_ms => 100, token_ms => 20, tokens => 5);
$t->write_config(<<'EOF');
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ {
            proxy_pass http://%%MOCK%%;
            proxy_buffering off;
            proxy_http_version 1.1;
        }
    }
EOF
$t->start;

{
    my $via = $t->chat(content => 'through nginx');
    is($via->{status}, 200, 'JSON chat through nginx');
    like($via->{headers}{server} // '', qr/^nginx/, '... answered by nginx');
    my $direct = $t->chat(content => 'through nginx', port => $t->mock_port);
    is($via->{body}, $direct->{body}, '... same answer as the mock gives');

    my $sse = $t->chat(content => 'through nginx', stream => 1);
    is($sse->{status}, 200, 'SSE chat through nginx');
    is($sse->{headers}{'content-type'}, 'text/event-stream', '... text/event-stream');
    my @ev = DSG::Test::sse_data($sse->{body});
    is(scalar @ev, 7, '... 5 tokens, the stop event and [DONE]');
    is($ev[-1], '[DONE]', '... ends with [DONE]');
    ok($sse->{first_body_ms} < $sse->{ms} - 50, '... streamed, not buffered')
        or diag "first body byte $sse->{first_body_ms} ms, end $sse->{ms} ms";
    is($t->mock_stats->{chat_requests}, 3, 'mock saw 3 chats');
}

$t->done;
