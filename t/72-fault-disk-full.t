#!/usr/bin/perl
# Fault injection: the cache's file system fills up.  The cache directory
# is a 256 KB tmpfs (or, where tmpfs cannot be mounted, a loop-mounted
# ext2 image of the same size) with max_size=16m, far above what fits: the
# data file's growth runs into ENOSPC, as on a real disk that is full.
# Stores then fail cleanly: every response is still served whole (JSON
# and SSE, same bytes as upstream), stored entries keep being hit, the
# failure is counted and logged, no worker crashes.  When space frees (a
# filler file deleted; later the file system grown with a remount) the
# cache stores and hits again without a restart.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

plan skip_all => 'mounting a file system needs root' if $> != 0;

my $t = DSG::Test->new(workers => 2);
my $p = $t->prefix;
my $dir = "$p/cachefs";
my ($how, $loopdev, $image);

mkdir $dir or die "$dir: $!";

sub run { system(@_) == 0 }

# the cache directory as a tiny file system: tmpfs first, else a loop
# device with a 256 KB ext2 image
if (run('mount', '-t', 'tmpfs', '-o', 'size=256k,mode=0755', 'tmpfs', $dir)) {
    $how = 'tmpfs';
} else {
    $image = "$p/cachefs.img";
    if (run("dd if=/dev/zero of=$image bs=1k count=256 status=none")
        && run("mkfs.ext2 -q -F -m 0 -N 32 $image >/dev/null 2>&1")
        && run("mount -o loop $image $dir 2>/dev/null"))
    {
        $how = 'loop ext2';
    }
}
plan skip_all => 'cannot mount a small file system here (tmpfs and loop '
                 . 'both refused): the disk-full path cannot be produced'
    unless $how;

# unmount whatever happens; nginx first, or the mount is busy
END {
    if ($how) {
        eval { $t->stop(timeout => 3) } if $t;
        system('umount', '-l', $dir);
    }
}

diag "cache directory on a 256 KB $how";

# the filler takes most of the space before nginx starts: the cache gets
# the rest, ~120 KB: a handful of 12 KB entries
sub filler {
    my ($kb) = @_;
    open(my $fh, '>', "$dir/filler") or die "filler: $!";
    print {$fh} "\0" x ($kb * 1024) or die "filler: $!";
    close $fh or die "filler: $!";
}
filler(96);

$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 3);

$t->write_config(<<"EOF");
    # max_size far above the file system: the data file's growth, not
    # LMDB's map, is what runs out
    deepseek_guard_cache_path $dir keys_zone=cache:1m max_size=16m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache cache;
        deepseek_guard_cache_valid 200 10m;
        proxy_http_version 1.1;
        proxy_buffering off;

        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
EOF
$t->start;
my @workers = sort $t->worker_pids;

# ------------------------------------------------------------ helpers

sub metric {
    my ($name) = @_;
    my $r = $t->get('/metrics');
    return $r->{body} =~ /^\Q$name\E\{cache="cache"\} (\d+)$/m ? $1 : undef;
}

# the cache status a client saw ('-': none), COALESCED counted as a HIT
sub xcs { DSG::Test::cache_status($_[0], '-') }

# a 12 KB answer (X-Mock-Pad: the mock pads the JSON, or every SSE event)
my $PAD = 12000;
sub ask {
    my ($c, %o) = @_;
    return $t->chat(content => $c, timeout => 10, %o,
                    headers => ['X-Mock-Pad' => $o{stream} ? 5000 : $PAD]);
}

# complete: the JSON parses and carries the whole pad; a stream has its
# 3 tokens, the stop event and [DONE]
sub whole {
    my ($r, $stream) = @_;
    return 0 unless $r->{status} == 200;
    if ($stream) {
        my @d = DSG::Test::sse_data($r);
        return @d == 5 && $d[-1] eq '[DONE]';
    }
    my $j = DSG::Test::json_decode($r->{body}) or return 0;
    return length($j->{pad} // '') == $PAD
        && ($j->{choices}[0]{finish_reason} // '') eq 'stop';
}

sub df_free {
    my @s = split ' ', (`df -k --output=avail $dir`)[1] // '';
    return $s[0] // -1;
}

# ------------------------------------------------ fill it up

# New prompts, one at a time, until a store fails (bounded: 40).  Every
# answer must be whole and, while there was space, stored.
my (@stored, @unstored, $first_fail);
my $off = length $t->error_log;
my $fail0 = metric('deepseek_guard_cache_store_failures_total') // 0;
my $broken = 0;
for my $i (1 .. 40) {
    my $c = "fill $i";
    my $a = ask($c);
    $broken++ unless whole($a);
    # ask again: a HIT if the first answer was stored
    my $b = ask($c);
    $broken++ unless whole($b) && $b->{body} eq $a->{body};
    if (xcs($b) eq 'HIT') {
        push @stored, [$c, $a->{body}];
    } else {
        push @unstored, [$c, $a->{body}];
        $first_fail //= $i;
        last if @unstored >= 5;
    }
}
ok(@stored >= 1, scalar(@stored) . ' entries stored before the file system was full');
ok($first_fail, 'then stores failed (file system full after '
                . scalar(@stored) . ' entries, ' . df_free() . ' KB free)');
is($broken, 0, 'every answer, stored or not, was a complete 200 with the upstream\'s bytes');

# a stream while full (25 KB: larger than the 12 KB entries that no
# longer fit): passed through whole, not stored
{
    my $a = ask('stream while full', stream => 1);
    my $b = ask('stream while full', stream => 1);
    ok(whole($a, 1) && whole($b, 1) && $a->{body} eq $b->{body},
       'streams while full: complete, same bytes');
    is(xcs($b), 'MISS', '... and not stored');
}

# 20 concurrent misses while full, from both workers: all whole
{
    my @res = $t->parallel([map { $t->chat_req(content => "full burst $_",
                                               headers => ['X-Mock-Pad' => $PAD],
                                               timeout => 10) } 1 .. 20],
                           timeout => 20);
    is(scalar(grep { whole($_) } @res), 20, '20 concurrent misses while full: all whole 200s');
}

# the entries stored before keep being served
is(scalar(grep { my $r = ask($_->[0]); xcs($r) eq 'HIT' && $r->{body} eq $_->[1] } @stored),
   scalar @stored, 'entries stored before keep being hits');

my $fails = (metric('deepseek_guard_cache_store_failures_total') // 0) - $fail0;
cmp_ok($fails, '>=', @unstored, "store_failures_total counted them (+$fails)");

my $log = substr($t->error_log, $off);
like($log, qr/\[(?:error|warn)\].*deepseek_guard cache "cache": response not stored: /,
     'logged: "response not stored"');
{
    # the line says why: a file system error, with the errno.  (LMDB turns
    # a short write on a full file system into EIO, so the errno is 28
    # "No space left on device" or 5 "Input/output error".)
    like($log, qr/response not stored: cache file system error \((?:28|5): [^)]+\)/,
         '... naming the file system error and its errno');
}
my @lines = grep { /response not stored/ } split /\n/, $log;
diag 'log: ' . ($lines[0] // 'none');
unlike($log, qr/\[(?:alert|crit|emerg)\]|exited on signal/, '... no alert, no crash');
is_deeply([sort $t->worker_pids], \@workers, '... the same workers are running');

# ------------------------------------------------ space frees: delete the filler

unlink "$dir/filler" or die "unlink filler: $!";
diag 'filler deleted: ' . df_free() . ' KB free';
{
    # the prompts that could not be stored are stored at their next miss
    my $ok = 0;
    for my $u (@unstored) {
        my $a = ask($u->[0]);
        my $b = ask($u->[0]);
        $ok++ if xcs($a) eq 'MISS' && xcs($b) eq 'HIT' && $b->{body} eq $u->[1];
    }
    is($ok, scalar @unstored,
       'filler deleted: the ' . scalar(@unstored) . ' unstored prompts are stored and hit now');
    my $a = ask('after the filler');
    my $b = ask('after the filler');
    is(xcs($a) . ' ' . xcs($b), 'MISS HIT', '... and so is a new one, without a restart');
    ok(whole($b) && $b->{body} eq $a->{body}, '... same bytes');
}

# ------------------------------------------------ full again, then a bigger file system

{
    # fill what the filler freed (bounded: 40 prompts)
    my $full;
    for my $i (1 .. 40) {
        ask("refill $i");
        if (xcs(ask("refill $i")) ne 'HIT') {
            $full = $i;
            last;
        }
    }
    ok($full, "full again after " . ($full // 0) . " more entries");

    # grow the file system under the running nginx: a tmpfs remount (an
    # ext2 loop image cannot grow in place)
    SKIP: {
        skip 'the loop image cannot grow in place', 4 unless $how eq 'tmpfs';
        ok(run('mount', '-o', 'remount,size=4m', $dir), 'tmpfs remounted with 4 MB');
        my $a = ask("refill $full");
        my $b = ask("refill $full");
        is(xcs($a) . ' ' . xcs($b), 'MISS HIT', '... the cache stores again');
        my $more = 0;
        for my $i (1 .. 30) {
            ask("grown $i");
            $more++ if xcs(ask("grown $i")) eq 'HIT';
        }
        is($more, 30, '... 30 more 12 KB entries (360 KB: more than the old file system)');
        cmp_ok(-s "$dir/data.mdb", '>', 256 * 1024,
               '... in a data file now larger than the old file system');
    }
}

unlike(substr($t->error_log, $off), qr/\[(?:alert|crit|emerg)\]|exited on signal|was recreated/,
       'no alert, no crash, the data file was never recreated');
is_deeply([sort $t->worker_pids], \@workers, 'the same two workers served the whole test');

$t->done;
