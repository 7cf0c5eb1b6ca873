#!/usr/bin/perl
# deepseek_guard_cache and SSE streams: a completed stream (ending with
# data: [DONE]) is stored and replayed identically; a stream cut by the
# upstream, cut by the client, or complete but without [DONE] is not; a
# stream larger than max_entry_size still reaches the client whole; with
# proxy_buffering off a miss streams (the first event is not held back
# until the end).

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use List::Util qw(max);
use Time::HiRes qw(sleep);

my $t = DSG::Test->new(workers => 2);

# 6 tokens 100 ms apart by default: a stream lasts > 500 ms, long enough to
# see whether nginx passes the first event on before the last one exists
$t->mock_start(first_token_ms => 20, token_ms => 100, tokens => 6);

# Static event streams on a second server (port 1) stand in for an upstream
# that finishes cleanly with or without the terminal [DONE] event.
mkdir $t->prefix . '/html';
my $ev = qq(data: {"choices":[{"delta":{"content":"hi"}}]}\n\n);
for (['done.sse', $ev x 3 . "data: [DONE]\n\n"], ['nodone.sse', $ev x 3]) {
    open(my $fh, '>', $t->prefix . "/html/$_->[0]") or die $!;
    print {$fh} $_->[1];
    close $fh;
}

$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;
    log_format sse '$status "$deepseek_guard_cache_status" $uri tag=$http_x_tag';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log sse;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 1m;
        proxy_http_version 1.1;

        # streaming: what every SSE proxy does
        location /v1/ {
            proxy_pass http://%%MOCK%%;
            proxy_buffering off;
        }

        # buffered: nginx holds the stream in its buffers
        location /buf/ {
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering on;
        }

        # streams bigger than 2 KB are not stored
        location /small/ {
            deepseek_guard_cache_max_entry_size 2k;
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering off;
        }

        # nginx reads the upstream at most 256 bytes at a time
        location /split/ {
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering off;
            proxy_buffer_size 256;
        }

        location /static/ {
            proxy_pass http://127.0.0.1:%%PORT_1%%/;
            proxy_buffering off;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        access_log off;
        root %%PREFIX%%/html;
        types { text/event-stream sse; }
    }
EOF
$t->start;


# the cache status a client saw, COALESCED counted as a HIT (see
# DSG::Test::cache_status)
sub xcs { DSG::Test::cache_status($_[0]) }

my $tagn = 0;

sub stream {
    my (%o) = @_;
    return $t->cache_chat('s' . ++$tagn, stream => 1, timeout => 15, %o);
}

sub calls { $t->mock_stats->{chat_requests} }

sub logged {
    my ($tag) = @_;
    $t->wait_until(sub { $t->access_log =~ /tag=\Q$tag\E$/m }, 3);
    my ($st, $s) = $t->access_log =~ /^(\d+) "([^"]*)" \S+ tag=\Q$tag\E$/m;
    $s = 'HIT' if defined $s && $s eq 'COALESCED';    # see xcs()
    return defined $s ? "$st $s" : '?';
}

# ------------------------------------------------ completed streams

for my $loc (['/v1/', 'proxy_buffering off'], ['/buf/', 'proxy_buffering on']) {
    my ($prefix, $what) = @$loc;
    $t->mock_reset;
    my %o = (uri => "${prefix}chat/completions", content => "sse $prefix");

    my $a = stream(%o);
    is($a->{status}, 200, "$what: a stream, 200");
    is($a->{cache}, 'MISS', '... MISS');
    is($a->{headers}{'content-type'}, 'text/event-stream', '... text/event-stream');
    my @ev = DSG::Test::sse_data($a->{body});
    is($ev[-1], '[DONE]', '... ends with [DONE]');
    is(scalar @ev, 8, '... 6 tokens, the stop event, [DONE]');
    cmp_ok($a->{ms}, '>', 450, '... took the mock\'s time (' . int($a->{ms}) . ' ms)');

    my @hits = map { stream(%o) } 1 .. 4;
    is(scalar(grep { $_->{status} == 200 } @hits), 4, '... replays: 200');
    is(scalar(grep { $_->{cache} eq 'HIT' } @hits), 4, '... HIT');
    is(scalar(grep { logged($_->{tag}) eq '200 HIT' } @hits), 4, '... logged HIT');
    is(scalar(grep { ($_->{headers}{'content-type'} // '') eq 'text/event-stream' }
              @hits), 4, '... text/event-stream');
    is(scalar(grep { $_->{body} eq $a->{body} } @hits), 4, '... identical bytes');
    is(calls(), 1, '... one upstream call');
    cmp_ok(max(map { $_->{ms} } @hits), '<', 300,
           '... replayed at once, not at the mock\'s pace');
}

# ------------------------------------------------ streaming on a miss

{
    $t->mock_reset;
    my $r = stream(content => 'latency probe');
    is($r->{cache}, 'MISS', 'a streamed miss');
    ok(defined $r->{first_body_ms} && $r->{first_body_ms} < $r->{ms} - 300,
       '... the first event arrived well before the end')
        or diag "first body byte $r->{first_body_ms} ms, end $r->{ms} ms";
    cmp_ok($r->{first_body_ms} // 1e9, '<', 250,
           '... about when the mock sent it (' . int($r->{first_body_ms} // -1) . ' ms)');
    is((DSG::Test::sse_data($r->{body}))[-1], '[DONE]', '... complete');
}

# ------------------------------------------------ cut by the upstream

for my $loc (['/v1/', 'proxy_buffering off'], ['/buf/', 'proxy_buffering on']) {
    my ($prefix, $what) = @$loc;
    $t->mock_reset;
    my %o = (uri => "${prefix}chat/completions", content => "upstream cut $prefix");

    # the mock sends 2 events and drops the connection: no [DONE], and
    # nginx sees no clean end of the upstream response
    my $a = stream(%o, headers => ['X-Mock-Abort-After' => 2]);
    ok($a->{error} || $a->{body} !~ /\[DONE\]/,
       "$what: the mock cut the stream (" . ($a->{error} // 'no [DONE]') . ')');
    unlike($a->{body}, qr/\[DONE\]/, '... no [DONE] reached the client');
    is($t->mock_stats->{aborted_by_mock}, 1, '... counted by the mock');

    # not stored: the same request goes upstream again, and this complete
    # answer is stored
    my $b = stream(%o);
    is($b->{cache}, 'MISS', '... the next request is a MISS');
    is((DSG::Test::sse_data($b->{body}))[-1], '[DONE]', '... and complete');
    is(calls(), 2, '... two upstream calls');
    my $c = stream(%o);
    is($c->{cache}, 'HIT', '... then a HIT');
    is($c->{body}, $b->{body}, '... of the complete stream');
}

# ------------------------------------------------ cut by the client

for my $loc (['/v1/', 'proxy_buffering off'], ['/buf/', 'proxy_buffering on']) {
    my ($prefix, $what) = @$loc;
    $t->mock_reset;
    my %o = (uri => "${prefix}chat/completions", content => "client cut $prefix");

    # the client reads the first event and hangs up while the upstream
    # still has 500 ms of tokens to send
    my $a = stream(%o, abort_after_bytes => 10);
    ok($a->{aborted}, "$what: the client hung up after the first bytes");
    unlike($a->{body}, qr/\[DONE\]/, '... before [DONE]');
    ok($t->wait_until(sub { $t->mock_stats->{client_aborts} >= 1 }, 5),
       '... nginx dropped the upstream (mock client_aborts)');

    my $b = stream(%o);
    is($b->{cache}, 'MISS', '... the next request is a MISS (nothing stored)');
    is((DSG::Test::sse_data($b->{body}))[-1], '[DONE]', '... complete');
    is(calls(), 2, '... two upstream calls');
    is(stream(%o)->{cache}, 'HIT', '... then a HIT');
}

# ------------------------------------------------ [DONE] is required

{
    # both end cleanly (the file is sent whole); only the one with the
    # terminal event is a complete LLM stream
    my @d = map { my $r = $t->get('/static/done.sse');
                  [xcs($r), $r->{body}] } 1 .. 2;
    is("$d[0][0] $d[1][0]", 'MISS HIT', 'a clean stream ending with [DONE]: stored');
    is($d[1][1], $ev x 3 . "data: [DONE]\n\n", '... replayed whole');

    my @n = map { my $r = $t->get('/static/nodone.sse');
                  [xcs($r), $r->{body}] } 1 .. 2;
    is("$n[0][0] $n[1][0]", 'MISS MISS', 'a clean stream without [DONE]: not stored');
    is($n[1][1], $ev x 3, '... passed through whole');
    like($t->error_log, qr/event stream without "data: \[DONE\]" not stored/,
         '... logged');
}

# ------------------------------------------------ [DONE] split over two reads

{
    # The mock writes the stop event, the [DONE] event and the chunked
    # terminator in one go; /split/ reads 256 bytes at a time.  When the
    # stop event's chunk is S bytes long, "data: [DONE]" starts at S + 3 in
    # that write: for S in about 242 .. 252 the 256-byte read ends inside
    # it and nginx hands the text over in two buffers (a few more sizes on
    # each side for safety).  S grows by one byte per X-Mock-Pad byte:
    # measure it at pad 1 straight from the mock.
    my %o = (stream => 1, max_tokens => 2, content => 'split done');
    my $raw = $t->http(%{ $t->chat_req(%o, port => $t->mock_port,
                                       headers => ['X-Mock-Pad' => 1]) })->{raw};
    my $done = index($raw, "e\r\ndata: [DONE]");
    my $stop = rindex($raw, "\r\n", rindex($raw, 'data: {', $done) - 3) + 2;
    my $s1 = $done - $stop;
    cmp_ok($s1, '<', 238, "the stop event's chunk at pad 1: $s1 bytes");

    $t->mock_reset;
    my @pads = map { $_ - $s1 + 1 } 238 .. 256;
    my (@first, @second);
    for my $pad (@pads) {
        my %h = (headers => ['X-Mock-Pad' => $pad, 'X-Mock-Token-Ms' => 30]);
        push @first, stream(%o, %h, uri => '/split/chat/completions',
                            content => "split $pad");
        push @second, stream(%o, %h, uri => '/split/chat/completions',
                             content => "split $pad");
    }
    is(scalar(grep { (DSG::Test::sse_data($_->{body}))[-1] eq '[DONE]' } @first),
       scalar @pads, scalar(@pads) . ' streams whose [DONE] straddles two reads: complete');
    is(join(' ', map { $_->{cache} } @second), join(' ', ('HIT') x @pads),
       '... all stored: HIT')
        or diag "pads @pads";
    is(scalar(grep { $second[$_]{body} eq $first[$_]{body} } 0 .. $#pads),
       scalar @pads, '... replayed identically');
}

# ------------------------------------------------ too big to store

{
    $t->mock_reset;

    # 8 events of > 300 bytes: > 2 KB, past max_entry_size mid-stream
    my %o = (uri => '/small/chat/completions', content => 'big stream',
             headers => ['X-Mock-Pad' => 300, 'X-Mock-Token-Ms' => 5]);
    my @r = map { stream(%o) } 1 .. 2;
    cmp_ok(length $r[0]{body}, '>', 2048, 'a stream over max_entry_size');
    is("$r[0]{cache} $r[1]{cache}", 'MISS MISS', '... not stored');
    is(scalar(grep { (DSG::Test::sse_data($_->{body}))[-1] eq '[DONE]' } @r), 2,
       '... but reaches the client whole');
    is($r[1]{body}, $r[0]{body}, '... identically');
    is(calls(), 2, '... two upstream calls');

    # a small one on the same location is stored
    my @s = map { stream(%o, content => 'small', max_tokens => 3,
                         headers => ['X-Mock-Token-Ms' => 5]) }
            1 .. 2;
    is("$s[0]{cache} $s[1]{cache}", 'MISS HIT', 'a stream under 2 KB is stored');
}

$t->done;
