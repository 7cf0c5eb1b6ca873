#!/usr/bin/perl
# deepseek_guard_cache eviction order: the least recently USED entry goes
# first, not the least recently stored one.
#
# Each worker remembers its cache hits and touches them in LMDB (the
# entry's access time) in one write transaction per second, on its sweep
# tick.  The eviction, by the sweep above 90% of max_size or by a store
# that finds the map full, removes the entries with the oldest access time
# first.
#
# Entry A is stored first, then B, C, ... (never hit).  A is hit several
# times and, once the touch has landed, new entries are stored one at a
# time until the cache evicts.  A, the oldest stored but recently used,
# must still be a HIT; B, stored after A and never used, must be the one
# evicted (MISS).
#
# Sizes: max_size=4m and answers of about 100 KB (25 pages each).  The
# first stores fill about 60% of the map, far from any eviction.  Stored
# one at a time with a sweep in between, the live data crosses the sweep's
# 90% high-water mark while a store still leaves LMDB's reserve free, so
# the sweep evicts, down to 80%: a handful of entries, far fewer than the
# entries older than A's touch.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Time::HiRes qw(sleep time);

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

my $PAD = 100_000;     # bytes of padding per answer
my $OLD = 24;          # entries stored before A is used: A + 23

$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m max_size=4m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        deepseek_guard_cache_status_header X-Cache-Status;
        proxy_http_version 1.1;

        location /v1/ {
            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 10m;
            proxy_pass http://%%MOCK%%;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
EOF
$t->start;

# one chat request of prompt $name, answered with $PAD bytes of padding
sub ask {
    my ($name) = @_;
    my $r = $t->chat(content => "lru prompt $name", timeout => 20,
                     headers => ['X-Mock-Pad' => $PAD]);
    $r->{cache} = DSG::Test::cache_status($r);
    return $r;
}

sub whole {
    my ($r) = @_;
    my $d = DSG::Test::json_decode($r->{body});
    return $r->{status} == 200 && ref $d && length($d->{pad} // '') == $PAD;
}

sub cache_metric {
    my ($name) = @_;
    return $t->metrics->{"$name\{cache=\"llm\"}"} // 0;
}

sub entries   { cache_metric('deepseek_guard_cache_entries') }
sub evictions { cache_metric('deepseek_guard_cache_evictions_total') }

# ------------------------------------------------ A first, then B, C, ...

my @old = ('A', 'B', map { "old-$_" } 3 .. $OLD);
my @first = map { ask($_) } @old;
is(scalar(grep { whole($_) && $_->{cache} eq 'MISS' } @first), $OLD,
   "$OLD distinct prompts, A first then B: each a whole answer, MISS");

# the gauges come from the once-a-second sweep
ok($t->wait_until(sub { entries() == $OLD }, 10),
   "... all $OLD stored (deepseek_guard_cache_entries)")
    or diag 'entries: ' . entries();
my $bytes = cache_metric('deepseek_guard_cache_bytes');
my $cap = cache_metric('deepseek_guard_cache_capacity_bytes');
cmp_ok($bytes, '<', $cap * 0.75,
       sprintf('... %.0f%% of max_size: far from eviction', 100 * $bytes / ($cap || 1)));
is(evictions(), 0, '... nothing evicted');

# ------------------------------------------------ A is used

# reuseport spreads the connections: both workers are likely to serve some
# of the hits, and each touches A on its own next tick
my @hits = map { ask('A') } 1 .. 8;
is(scalar(grep { $_->{cache} eq 'HIT' && whole($_) } @hits), 8, 'A used 8 times: HIT');

# the touch lands on the worker's next sweep tick, within a second: no
# gauge shows it, so wait well past two ticks
sleep 3;

# ------------------------------------------------ new entries until eviction

# one at a time; after each, wait for a sweep to see it (the entries
# gauge counts it) or to have evicted
my ($stored, $new, $evicted) = ($OLD, 0, 0);
while ($new < 40) {
    $new++;
    my $r = ask("new-$new");
    ok(whole($r) && $r->{cache} eq 'MISS', "new-$new: a whole answer, MISS")
        or last;
    $stored++;
    $t->wait_until(sub {
        my $e = entries();
        $evicted = 1 if $e < $stored - 1 || evictions() > 0;
        return $evicted || $e == $stored;
    }, 10);
    last if $evicted;
    # a gauge a store behind: caught up by the next round's wait
}
ok($evicted, "the cache evicted after $new new entries");
diag sprintf('live %d, file %d of %d bytes',
             map { cache_metric("deepseek_guard_cache_$_") }
             qw(bytes file_bytes capacity_bytes));
ok($t->wait_until(sub { evictions() > 0 }, 5),
   '... deepseek_guard_cache_evictions_total counts it (' . evictions() . ')');
my $left = entries();
cmp_ok($left, '<', $stored, "... $left of $stored entries left");
cmp_ok($stored - $left, '<', $OLD - 1,
       '... fewer evicted than the entries older than A\'s use');

# ------------------------------------------------ used kept, unused evicted

$t->mock_reset;
my $ra = ask('A');
is($ra->{cache}, 'HIT', 'A, stored first but used since: still a HIT');
ok(whole($ra), '... a whole answer');
is($ra->{body}, $first[0]{body}, '... the same answer as when first stored');

my $rb = ask('B');
is($rb->{cache}, 'MISS', 'B, stored after A and never used: evicted, MISS');
ok(whole($rb), '... answered whole from the upstream');
is($t->mock_stats->{chat_requests}, 1, '... only B went upstream');

$t->done;
