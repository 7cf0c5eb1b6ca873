#!/usr/bin/perl
# Stores through nginx's thread pool (deepseek_guard_cache_path threads=):
# an entry of threads_min bytes or more is written by a thread of the
# pool, not on the worker's event loop.
#
#  - nginx -t names a bad threads= or threads_min= with file:line;
#  - an entry stored by one worker's thread is a HIT from the other
#    worker (the workers are told apart by their pid, on keepalive
#    connections, so nothing depends on which worker accepts);
#  - smaller entries are still stored inline;
#  - kill -9 of a worker in the middle of a pooled store: another process
#    (mdb_load, blocked reading its input) holds LMDB's write lock, so the
#    thread's store is in flight, deterministically, when the worker is
#    killed.  The answer went out whole all the same; once the lock is
#    released only that entry is missing: the others are still hits, the
#    lost one is fetched again and stored.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);
$t->allow_log(qr/worker process \d+ exited on signal 9/);
$t->allow_log(qr/shared memory zone "(?:llm)" was locked by \d+/);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 8);

# ---------------------------------------------------------------- nginx -t

$t->config_fails('unknown pool', <<'EOF', qr/unknown thread pool "nosuch"/,
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m threads=nosuch;
EOF
    qr/threads=nosuch/);

$t->config_fails('bad threads_min', <<'EOF', qr/invalid threads_min "threads_min=lots"/,
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m threads_min=lots;
EOF
    qr/threads_min=lots/);

# ---------------------------------------------------------------- running

$t->write_config(<<'EOF', main => 'thread_pool dsgstore threads=2;');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m max_size=64m
                              threads=dsgstore threads_min=8k;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        add_header X-Worker $pid always;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache_valid 200 10m;
        proxy_http_version 1.1;

        location = /pid {
            return 200 "$pid";
        }

        location = /metrics {
            deepseek_guard_metrics;
        }

        location /v1/ {
            deepseek_guard_cache llm;
            proxy_pass http://%%MOCK%%;
        }
    }
EOF
$t->start;

my $port = $t->port;

# one HTTP/1.1 request on a keepalive connection; the body by
# Content-Length or chunked
sub req {
    my ($s, $method, $uri, $body) = @_;
    $body //= '';
    my $h = "$method $uri HTTP/1.1\r\nHost: localhost\r\n";
    $h .= "Content-Type: application/json\r\nContent-Length: "
          . length($body) . "\r\n" if $method eq 'POST';
    print $s "$h\r\n$body";
    local $/ = "\r\n";
    my $status = <$s>;
    return { status => 0 } unless defined $status;
    my ($code) = $status =~ m{^HTTP/1\.1 (\d+)};
    my %hd;
    while (my $l = <$s>) {
        last if $l eq "\r\n";
        $l =~ s/\r\n$//;
        my ($k, $v) = split /:\s*/, $l, 2;
        $hd{ lc $k } = $v;
    }
    my $data = '';
    if (defined $hd{'content-length'}) {
        read($s, $data, $hd{'content-length'});
    } elsif (($hd{'transfer-encoding'} // '') =~ /chunked/) {
        while (defined(my $n = <$s>)) {
            $n = hex $n;
            last if $n == 0;
            my $c;
            read($s, $c, $n);
            $data .= $c;
            scalar <$s>;
        }
        scalar <$s>;
    }
    return { status => $code, headers => \%hd, body => $data };
}

sub chat_body {
    my ($content, $max) = @_;
    return DSG::Test::json_encode({
        model => 'deepseek-chat', max_tokens => $max,
        messages => [{ role => 'user', content => $content }] });
}

sub post_chat {
    my ($s, $content, $max) = @_;
    return req($s, 'POST', '/v1/chat/completions', chat_body($content, $max));
}

# a keepalive connection to each worker
sub worker_conns {
    my %conn;
    for (1 .. 400) {
        last if keys %conn == 2;
        my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port",
                                      Timeout => 10) or next;
        my $r = req($s, 'GET', '/pid');
        $conn{ $r->{body} } //= $s if $r->{status} == 200;
    }
    return %conn;
}

sub metric {
    my ($name) = @_;
    my $m = $t->scrape or return undef;
    return $m->{"deepseek_guard_cache_${name}{cache=\"llm\"}"} // 0;
}

my %conn = worker_conns();
is(scalar keys %conn, 2, 'a keepalive connection to each of the two workers');
my ($wa, $wb) = sort keys %conn;
my ($ca, $cb) = @conn{$wa, $wb};

# 2000 tokens of the mock: about 30 KB, above threads_min
my $one = post_chat($ca, 'pooled one', 2000);
is($one->{status}, 200, 'large answer: 200');
is($one->{headers}{'x-cache-status'}, 'MISS', 'large answer: MISS');
is($one->{headers}{'x-worker'}, $wa, 'large answer: from worker A');
cmp_ok(length $one->{body}, '>', 16384, 'large answer: above threads_min');

ok($t->wait_until(sub { (metric('thread_stores_total') // 0) == 1 }, 10),
   'stored by the thread pool (thread_stores_total 1)');

my $hit = post_chat($cb, 'pooled one', 2000);
is($hit->{headers}{'x-worker'}, $wb, 'asked again of worker B');
is($hit->{headers}{'x-cache-status'}, 'HIT', 'worker B: HIT');
ok($hit->{body} eq $one->{body}, 'worker B: the same bytes');

# a small answer is stored inline
my $small = post_chat($cb, 'inline one', 2);
is($small->{headers}{'x-cache-status'}, 'MISS', 'small answer: MISS');
cmp_ok(length $small->{body}, '<', 8192, 'small answer: below threads_min');
ok($t->wait_until(sub { (metric('stores_total') // 0) == 2 }, 10),
   'small answer stored');
is(metric('thread_stores_total'), 1, 'small answer: not by the pool');
is(post_chat($ca, 'inline one', 2)->{headers}{'x-cache-status'}, 'HIT',
   'small answer: HIT from worker A');

# ---------------------------------------------------------------- kill -9

# mdb_load takes the write lock once it has read its header, then blocks
# reading its first record: the lock stays held until it is killed
my $dir = $t->prefix . '/cache';
my $ml = open(my $mlh, '|-', 'mdb_load', $dir) or die "mdb_load: $!";
select((select($mlh), $| = 1)[0]);
print $mlh "VERSION=3\nformat=bytevalue\ntype=btree\nHEADER=END\n";

sub holds_lock {
    my ($pid) = @_;
    my $fd = grep { (readlink($_) // '') =~ m{/data\.mdb$} }
             glob("/proc/$pid/fd/*");
    my $wchan = DSG::Test::_slurp("/proc/$pid/wchan");
    return $fd && $wchan =~ /pipe|wait_woken/;
}

ok($t->wait_until(sub { holds_lock($ml) }, 10),
   'mdb_load holds the LMDB write lock');

my $th0 = metric('thread_stores_total');
my $two = post_chat($ca, 'pooled two', 2500);
is($two->{status}, 200, 'while the lock is held: 200');
is($two->{headers}{'x-cache-status'}, 'MISS', 'while the lock is held: MISS');
cmp_ok(length $two->{body}, '>', 16384,
       'while the lock is held: the whole answer went out');
like($two->{body}, qr/"finish_reason"/, 'while the lock is held: it is whole');

# the thread's store cannot commit
select(undef, undef, undef, 0.3);
is(metric('thread_stores_total'), $th0, 'its store is still in flight');

kill 'KILL', $wa;
ok($t->wait_until(sub { !kill(0, $wa) }, 5), 'worker A killed mid-store');
kill 'KILL', $ml;
close $mlh;

ok($t->wait_until(sub {
        my @w = $t->worker_pids;
        @w == 2 && !grep { $_ == $wa } @w }, 10),
   'a new worker replaces A');

my $calls = $t->mock_stats->{requests};
ok(defined $calls, 'the mock counts requests');

my $again = $t->chat(content => 'pooled one', max_tokens => 2000);
is(DSG::Test::cache_status($again), 'HIT', 'the earlier pooled entry: HIT');
ok($again->{body} eq $one->{body}, 'the earlier pooled entry: same bytes');
is(DSG::Test::cache_status($t->chat(content => 'inline one', max_tokens => 2)),
   'HIT', 'the inline entry: HIT');

my $lost = $t->chat(content => 'pooled two', max_tokens => 2500, timeout => 20);
is($lost->{status}, 200, 'the entry of the killed store: 200');
isnt(DSG::Test::cache_status($lost), 'HIT',
     'the entry of the killed store was not stored');
is($t->mock_stats->{requests}, $calls + 1, 'it was asked of the upstream again');
ok($lost->{body} eq $two->{body}, 'and answered the same bytes');

ok($t->wait_until(sub {
        DSG::Test::cache_status($t->chat(content => 'pooled two',
                                         max_tokens => 2500)) eq 'HIT' }, 10),
   'stored again, through the pool: HIT');

$t->check_log;
done_testing;
