#!/usr/bin/perl
# The mock LLM upstream (t/mock/mock_llm.py) under the harness: many slow
# concurrent streams, capacity 503s, deterministic answers, and nginx
# (with the module loaded) proxying JSON and SSE to it.

use strict;
use warnings;
use utf8;
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
# "stream N": 2 tokens + 3 per message + 3 per request; 10 tokens each
is_deeply($st->{tokens}, { prompt => 550 * 8, completion => 550 * 10 },
          'mock tokens: 550 prompts of 8, 550 completions of 10');

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

# ------------------------------------------------ usage: the mock's tokenizer

# The mock's tokenizer (its docstring): whitespace separates; a token is a run
# of ASCII letters/digits (single hyphens between runs join them), or any other
# single character.  prompt_tokens = 3 + per message (3 + content tokens).
# The expected counts below are worked out by hand from that rule; ntok() is
# the same rule, only used on the generated (ASCII) answers.
sub ntok { my $n = () = $_[0] =~ /[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*|\S/g; $n }

# the decoded data: events of an SSE body, [DONE] left out
sub sse_events {
    map { DSG::Test->json_decode($_) } grep { $_ ne '[DONE]' } DSG::Test::sse_data($_[0]);
}

{
    my $p = $t->mock_start(name => 'usage', first_token_ms => 0, token_ms => 0,
                           tokens => 4);
    my $ask = sub {
        my $r = $t->chat(port => $p, @_);
        return ($r, DSG::Test->json_decode($r->{body}) || {});
    };

    # prompt_tokens of one user message: 6 + the tokens of its content
    my @prompts = (
        ['ASCII words',        'Hello world',          2],
        ['words, punctuation', 'Hello, world!',        4],   # Hello , world !
        ['empty',              '',                     0],
        ['whitespace only',    "  \n\t  ",             0],
        ['CJK',                '你好，世界',            5],   # each character
        ['hyphens',            'well-known a--b -x-',  8],   # 1 + 4 + 3
        ['mixed',              'GPT-4o costs $5.00/1M tokens… 日本', 12],
        ['accented',           'café naïve',           5],   # caf é na ï ve
        ['digits',             'Call 555-1234, ok?',   5],   # Call 555-1234 , ok ?
    );
    for my $c (@prompts) {
        my ($name, $text, $n) = @$c;
        my ($r, $d) = $ask->(content => $text);
        is($d->{usage}{prompt_tokens}, 6 + $n, "tokenizer, $name: prompt_tokens 6 + $n")
            or diag $r->{body};
    }

    my ($r, $d) = $ask->(messages => [{ role => 'system', content => 'You are terse.' },
                                      { role => 'user', content => 'Hi!' }]);
    is($d->{usage}{prompt_tokens}, 3 + 3 + 4 + 3 + 2,
       'two messages: 3 + (3 + 4) + (3 + 2)');
    ($r, $d) = $ask->(messages => [{ role => 'user', content => [
        { type => 'text', text => 'Hello, world!' },
        { type => 'image_url', image_url => { url => 'http://x/y.png' } },
        { type => 'text', text => '你好' } ] }]);
    is($d->{usage}{prompt_tokens}, 3 + 3 + 4 + 2, 'list content: its text parts');
    ($r, $d) = $ask->(messages => []);
    is($d->{usage}{prompt_tokens}, 3, 'no message: 3');

    # JSON usage: completion = the tokens of the answer, total = sum
    ($r, $d) = $ask->(content => 'Hello, world!');
    is($r->{status}, 200, 'JSON answer');
    my $text = $d->{choices}[0]{message}{content};
    like($text, qr/^tok0-[0-9a-f]{8} tok1-/, '... the usual content');
    is_deeply($d->{usage}, { prompt_tokens => 10, completion_tokens => 4,
                             total_tokens => 14 },
              '... usage 10 + 4 (4 generated tokens) = 14');
    is(ntok($text), 4, '... the content is 4 tokens');
    is_deeply([sort keys %$d], [qw(choices created id model object usage)],
              '... the JSON shape is unchanged');

    # max_tokens / max_completion_tokens
    for my $c ([{ max_tokens => 3 }, 3, 'max_tokens 3'],
               [{ max_completion_tokens => 2 }, 2, 'max_completion_tokens 2'],
               [{ max_tokens => 5, max_completion_tokens => 2 }, 2,
                'both: max_completion_tokens wins'],
               [{ max_tokens => 3, max_completion_tokens => 0 }, 3,
                'max_completion_tokens 0 ignored: max_tokens'],
               [{ max_completion_tokens => 'x' }, 4, 'not an integer: the default']) {
        my ($extra, $n, $name) = @$c;
        ($r, $d) = $ask->(content => 'limits', extra => $extra);
        my $content = $d->{choices}[0]{message}{content} // '';
        is(ntok($content), $n, "$name: $n tokens generated");
        is($d->{usage}{completion_tokens}, $n, "... completion_tokens $n");
    }

    # SSE with include_usage: "usage": null everywhere, then the usage chunk
    my %su = (content => 'Hello, world!', stream => 1,
              extra => { stream_options => { include_usage => JSON::PP::true } });
    ($r) = $ask->(%su, max_tokens => 5);
    is($r->{status}, 200, 'SSE with include_usage');
    my @data = DSG::Test::sse_data($r->{body});
    is($data[-1], '[DONE]', '... ends with [DONE]');
    my @ev = sse_events($r->{body});
    is(scalar @ev, 7, '... 5 tokens, the stop chunk, the usage chunk');
    my $last = $ev[-1];
    is_deeply($last->{choices}, [], '... the last chunk before [DONE] has choices []');
    is_deeply($last->{usage}, { prompt_tokens => 10, completion_tokens => 5,
                                total_tokens => 15 }, '... and the usage');
    is_deeply([sort keys %$last], [qw(choices created id model object usage)],
              '... id, object, created, model, choices, usage');
    is($last->{object}, 'chat.completion.chunk', '... a chat.completion.chunk');
    is($last->{id}, $ev[0]{id}, '... the id of the other chunks');
    is(scalar(grep { exists $_->{usage} && !defined $_->{usage} } @ev[0 .. $#ev - 1]),
       6, '... every other chunk has "usage": null');
    is($ev[-2]{choices}[0]{finish_reason}, 'stop', '... after the finish_reason chunk');
    my $streamed = join '', map { $_->{choices}[0]{delta}{content} // '' } @ev;
    is(ntok($streamed), $last->{usage}{completion_tokens},
       '... completion_tokens = the content tokens streamed');

    ($r) = $ask->(%su, extra => { %{ $su{extra} }, max_completion_tokens => 2 });
    @ev = sse_events($r->{body});
    is($ev[-1]{usage}{completion_tokens}, 2, 'SSE max_completion_tokens 2: usage 2');
    is(scalar(grep { defined $_->{choices}[0]{delta}{content} } @ev), 2,
       '... 2 content chunks');

    # SSE without include_usage: as before, no usage anywhere
    for my $c ([{}, 'no stream_options'],
               [{ stream_options => {} }, 'stream_options {}'],
               [{ stream_options => { include_usage => JSON::PP::false } },
                'include_usage false']) {
        my ($extra, $name) = @$c;
        ($r) = $ask->(content => 'Hello, world!', stream => 1, extra => $extra);
        @ev = sse_events($r->{body});
        is(scalar @ev, 5, "SSE, $name: 4 tokens and the stop chunk");
        unlike($r->{body}, qr/usage/, '... no usage key, no usage chunk');
    }

    # stream_options without "stream": true is refused
    for my $c ([undef, 'no stream'], [0, 'stream false']) {
        my ($stream, $name) = @$c;
        ($r, $d) = $ask->(content => 'x', defined $stream ? (stream => $stream) : (),
                          extra => { stream_options => { include_usage => JSON::PP::true } });
        is($r->{status}, 400, "stream_options with $name: 400");
        is($d->{error}{type}, 'invalid_request_error', '... invalid_request_error');
    }
    ($r, $d) = $ask->(content => 'x', stream => 1, extra => { stream_options => 1 });
    is($r->{status}, 400, 'stream_options not an object: 400');

    # /stats tokens and tokens_by_key
    $t->mock_reset('usage');
    my (%want, $prompt, $completion);
    my $count = sub {
        my ($key, $u) = @_;
        $want{$key}{prompt}     += $u->{prompt_tokens};
        $want{$key}{completion} += $u->{completion_tokens};
        $want{$key}{requests}++;
        $prompt += $u->{prompt_tokens};
        $completion += $u->{completion_tokens};
    };
    for my $key ('alpha', 'beta', undef) {
        for my $i (1 .. 3) {
            ($r, $d) = $ask->(content => "count me $i", max_tokens => $i,
                              defined $key ? (key => $key) : ());
            $count->(defined $key ? "Bearer $key" : '', $d->{usage});
        }
        ($r) = $ask->(%su, defined $key ? (key => $key) : ());
        @ev = sse_events($r->{body});
        $count->(defined $key ? "Bearer $key" : '', $ev[-1]{usage});
    }
    # not counted: errors, a cut JSON answer
    $ask->(content => 'err', key => 'alpha', headers => ['X-Mock-Status' => 429]);
    $ask->(content => 'bad', key => 'alpha', extra => { stream_options => {} });
    $ask->(content => 'cut json', key => 'alpha', headers => ['X-Mock-Abort-After' => 1]);
    # a stream cut by the mock after 2 tokens: no usage chunk, 2 delivered
    ($r) = $ask->(%su, content => 'cut by mock', key => 'beta',
                  headers => ['X-Mock-Abort-After' => 2]);
    unlike($r->{body}, qr/"usage":\{/, 'a stream cut by the mock: no usage chunk');
    # a stream cut by the client between its 2nd and 3rd token
    ($r) = $ask->(%su, content => 'cut by client', key => 'beta', abort_after_ms => 1500,
                  headers => ['X-Mock-Token-Ms' => 1000]);
    ok($r->{aborted}, 'a stream cut by the client');
    my $got = grep { defined $_->{choices}[0]{delta}{content} } sse_events($r->{body});
    my $cst = $t->wait_until(sub {
        my $s = $t->mock_stats('usage');
        ($s->{tokens_by_key}{'Bearer beta'}{cut} // 0) >= 2 ? $s : undef });
    ok($cst, '... the mock saw both cuts');
    my $pcut = 2 * (6 + 3);     # "cut by mock", "cut by client": 3 tokens each
    %{ $want{$_} } = (cut => 0, cut_prompt => 0, completion_delivered => 0,
                      %{ $want{$_} }) for keys %want;
    @{ $want{'Bearer beta'} }{qw(cut cut_prompt completion_delivered)} = (2, $pcut, 2 + $got);
    is($got, 2, '... after receiving 2 content chunks');

    is_deeply($cst->{tokens}, { prompt => $prompt, completion => $completion },
              'mock tokens: the sum of the usages of the completed answers');
    is_deeply($cst->{tokens_by_key}, \%want,
              '... tokens_by_key by Authorization: completed answers, cut streams')
        or diag explain $cst->{tokens_by_key};
    my %sum;
    for my $k (values %{ $cst->{tokens_by_key} }) {
        $sum{$_} += $k->{$_} for qw(prompt completion requests);
    }
    is_deeply(\%sum, { prompt => $prompt, completion => $completion,
                       requests => $cst->{completed} },
              '... adding up to tokens and completed');
    is($cst->{completed}, 12, '... 12 completed answers');
    $t->mock_stop('usage');
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

    my $u = $t->chat(content => 'through nginx', stream => 1,
                     extra => { stream_options => { include_usage => JSON::PP::true } });
    @ev = DSG::Test::sse_data($u->{body});
    is(scalar @ev, 8, 'SSE with include_usage through nginx: one more event');
    my $uc = DSG::Test->json_decode($ev[-2]) || {};
    is_deeply([$uc->{choices}, $uc->{usage}{completion_tokens}], [[], 5],
              '... the usage chunk before [DONE]');
}

$t->done;
