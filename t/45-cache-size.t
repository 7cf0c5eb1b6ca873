#!/usr/bin/perl
# deepseek_guard_cache size limits: with max_size=1m and ~10 MB of distinct
# answers, data.mdb never grows past 1 MB (watched while the traffic runs
# and after), no client ever sees an error, the oldest entries are evicted
# (early prompts MISS again) and the newest are served (HIT); responses over
# max_entry_size or over half the map pass through whole and are not
# stored; a buffered response that spilled to a proxy_temp file is stored.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use POSIX qw(WNOHANG);
use Time::HiRes qw(sleep);

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

my $dir = $t->prefix . '/cache';
my $mdb = "$dir/data.mdb";
my $MB = 1024 * 1024;
my $PAD = 32000;    # ~32 KB answers

$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m max_size=1m;
    log_format sz '$status "$deepseek_guard_cache_status" $body_bytes_sent';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log sz;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 10m;
        proxy_http_version 1.1;

        location /v1/ {
            proxy_pass http://%%MOCK%%;
            proxy_buffering off;
        }

        # answers over 64 KB are passed through, not stored
        location /limited/ {
            deepseek_guard_cache_max_entry_size 64k;
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering off;
        }

        # small buffers and a slowed-down client side: nginx reads the
        # 200 KB answer faster than it may send it, the rest goes to a
        # proxy_temp file
        location /buf/ {
            proxy_pass http://%%MOCK%%/v1/;
            proxy_buffering on;
            limit_rate 400k;
            proxy_buffer_size 4k;
            proxy_buffers 4 4k;
            proxy_busy_buffers_size 8k;
        }
    }
EOF
$t->start;

sub req {
    my ($content, %o) = @_;
    my $pad = delete $o{pad} // $PAD;
    return $t->chat_req(content => $content, timeout => 20,
                        headers => ['X-Mock-Pad' => $pad], %o);
}

# the cache status a client saw, COALESCED counted as a HIT (see
# DSG::Test::cache_status)
sub cache_status { DSG::Test::cache_status($_[0]) }

# a complete answer: valid JSON with the whole pad
sub whole {
    my ($r, $pad) = @_;
    my $d = DSG::Test::json_decode($r->{body});
    return $r->{status} == 200 && ref $d && length($d->{pad} // '') == $pad;
}

# ------------------------------------------------ spilled buffered answer

{
    # 200 KB through 4 KB buffers: nginx writes it to proxy_temp; the
    # capture must still see all of it
    my @r = map { $t->http(%{ req('spilled', pad => 200_000,
                                  uri => '/buf/chat/completions') }) } 1 .. 2;
    ok(whole($r[0], 200_000), 'a 200 KB answer through proxy_temp: whole');
    like($t->error_log, qr/upstream response is buffered to a temporary file/,
         '... it went through a temporary file');
    is(cache_status($r[0]) . ' ' . cache_status($r[1]), 'MISS HIT', '... stored, then a HIT');
    is($r[1]{body}, $r[0]{body}, '... byte-identical');
}

# ------------------------------------------------ not storable

{
    $t->mock_reset;

    # over max_entry_size (64k): Content-Length known up front
    my @l = map { $t->http(%{ req('limited', pad => 100_000,
                                  uri => '/limited/chat/completions') }) } 1 .. 2;
    is(scalar(grep { whole($_, 100_000) } @l), 2, '100 KB over max_entry_size 64k: whole answers');
    is(cache_status($l[0]) . ' ' . cache_status($l[1]), 'MISS MISS', '... not stored');

    # over half the 1 MB map: LMDB could not hold it sensibly
    my @h = map { $t->http(%{ req('huge', pad => 700_000) }) } 1 .. 2;
    is(scalar(grep { whole($_, 700_000) } @h), 2, '700 KB, over half the map: whole answers');
    is(cache_status($h[0]) . ' ' . cache_status($h[1]), 'MISS MISS', '... not stored');
    is($t->mock_stats->{chat_requests}, 4, '... all four went upstream');
    cmp_ok(-s $mdb, '<=', $MB, '... data.mdb still within 1 MB');
}

# ------------------------------------------------ 10 MB through a 1 MB cache

# A child process samples the size of data.mdb every 5 ms while the
# traffic runs and remembers the largest it saw.
my $maxfile = $t->prefix . '/max-size';
my $mon = fork();
die "fork: $!" unless defined $mon;
if (!$mon) {
    my ($max, $n) = (0, 0);
    my $stop = 0;
    $SIG{TERM} = sub { $stop = 1 };
    until ($stop) {
        my $s = -s $mdb;
        $max = $s if defined $s && $s > $max;
        $n++;
        sleep 0.005;
    }
    open(my $fh, '>', $maxfile) or POSIX::_exit(1);
    print {$fh} "$max $n\n";
    close $fh;
    POSIX::_exit(0);
}

my $N = 320;    # 320 distinct prompts x ~32 KB = ~10 MB
my (@all, @between);
{
    $t->mock_reset;

    # 8 batches of 40 distinct prompts, 8 at a time; the file size is also
    # checked between batches
    for my $batch (0 .. 7) {
        my @reqs = map { req("size prompt $_") } $batch * 40 .. $batch * 40 + 39;
        push @all, $t->parallel(\@reqs, timeout => 60, concurrency => 8);
        push @between, -s $mdb // 0;
    }
}
kill 'TERM', $mon;
waitpid($mon, 0);
my ($max_seen, $samples) = split ' ', (DSG::Test::_slurp($maxfile) || '0 0');

is(scalar @all, $N, "$N requests");
is(scalar(grep { whole($_, $PAD) } @all), $N, '... every one a whole 200 answer');
is(scalar(grep { cache_status($_) eq 'MISS' } @all), $N, '... all distinct: MISS');
is($t->mock_stats->{chat_requests}, $N, '... all went upstream');
my $bytes = 0;
$bytes += length $_->{body} for @all;
cmp_ok($bytes, '>', 9.5 * $MB, sprintf('... %.1f MB of answers', $bytes / $MB));

# the sampler only has to have run often enough to see the growth
cmp_ok($samples, '>', 10, "data.mdb sampled $samples times during the run");
cmp_ok($max_seen, '>', $MB / 2, "... it was used (largest $max_seen bytes)");
cmp_ok($max_seen, '<=', $MB, '... and never exceeded 1 MB');
is(scalar(grep { $_ > $MB } @between), 0, '... nor between batches');

# the store kept working when full: evictions, not failures, and only
# WARN-level "not stored" at worst
unlike($t->error_log, qr/\[(?:alert|crit)\]/, 'no alert or crit in error.log');

# ------------------------------------------------ evicted and kept

{
    $t->mock_reset;

    # the newest answers are still there
    my @recent = map { $t->http(%{ req("size prompt $_") }) } $N - 5 .. $N - 1;
    is(scalar(grep { cache_status($_) eq 'HIT' } @recent), 5,
       'the 5 most recent prompts: HIT');
    is(scalar(grep { $recent[$_]{body} eq $all[$N - 5 + $_]{body} } 0 .. 4), 5,
       '... with their answers');
    is($t->mock_stats->{chat_requests}, 0, '... no upstream call');

    # the oldest were evicted to make room: they go upstream again, and
    # are answered whole
    my @old = map { $t->http(%{ req("size prompt $_") }) } 0 .. 4;
    is(scalar(grep { cache_status($_) eq 'MISS' } @old), 5,
       'the 5 oldest prompts: evicted, MISS');
    is(scalar(grep { whole($_, $PAD) } @old), 5, '... whole answers');
    is($t->mock_stats->{chat_requests}, 5, '... fetched again');

    # and stored again: the cache still stores after all that eviction
    is(cache_status($t->http(%{ req('size prompt 0') })), 'HIT', '... and stored again');
}

cmp_ok(-s $mdb, '<=', $MB, 'after the run: data.mdb within 1 MB (' . (-s $mdb) . ' bytes)');

# a restart reopens the full file of the same size: still works
$t->restart;
cmp_ok(-s $mdb, '<=', $MB, 'after a restart: data.mdb within 1 MB');
is(cache_status($t->http(%{ req('size prompt 0') })), 'HIT', '... entries kept over the restart');
my $r = $t->http(%{ req('after restart') });
ok(whole($r, $PAD), '... a new prompt is answered whole');

$t->done;
