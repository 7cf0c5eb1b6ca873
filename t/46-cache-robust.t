#!/usr/bin/perl
# deepseek_guard_cache robustness: a cache path that cannot be a writable
# directory fails startup naming it; a garbage, oversized or foreign
# data.mdb (or a garbage lock.mdb) found at startup is replaced, logged,
# and the cache works; corrupting the file between a stop and a start the
# same; a worker killed while it fills an entry does not leave the others
# waiting for its lock.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use List::Util qw(max);
use POSIX ();
use Time::HiRes qw(sleep time);

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 3);

my $p = $t->prefix;

sub spew {
    my ($file, $data) = @_;
    open(my $fh, '>', $file) or die "$file: $!";
    binmode $fh;
    print {$fh} $data;
    close $fh or die "$file: $!";
}

sub random_bytes {
    my ($n) = @_;
    open(my $fh, '<', '/dev/urandom') or die $!;
    read($fh, my $buf, $n) == $n or die "urandom: $!";
    close $fh;
    return $buf;
}

sub config {
    my ($path, $extra) = @_;
    $extra //= '';
    $t->write_config(<<"EOF");
    deepseek_guard_cache_path $path keys_zone=llm:1m $extra;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache llm;
        deepseek_guard_cache_valid 200 10m;
        proxy_http_version 1.1;

        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }
    }
EOF
}


# the cache status a client saw, COALESCED counted as a HIT (see
# DSG::Test::cache_status)
sub xcs { DSG::Test::cache_status($_[0]) }

sub status_of {
    my $r = $t->chat(@_);
    return "$r->{status} " . (xcs($r) || '-');
}

# the cache must store and answer: a new prompt MISS then HIT, and the
# answer is the upstream's
sub works {
    my ($what) = @_;
    my $c = "works $what " . time();
    my $a = $t->chat(content => $c);
    my $b = $t->chat(content => $c);
    is((xcs($a) || '-') . ' ' . (xcs($b) || '-'),
       'MISS HIT', "$what: the cache stores and hits");
    is("$a->{status} $b->{status}", '200 200', '... 200s');
    is($b->{body}, $a->{body}, '... same answer');
}

# ------------------------------------------------ unwritable paths

{
    # the parent of the cache directory is a regular file: mkdir fails,
    # whatever the permissions (the tests may run as root)
    # these startups fail on purpose: their [emerg] lines are expected
    $t->allow_log(qr/\[emerg\].*\Q$p\E\/afile/);
    spew("$p/afile", "not a directory\n");
    config("$p/afile/cache");
    my ($ok, $out) = $t->test_config;
    ok(!$ok, 'cache path under a regular file: nginx -t fails');
    like($out, qr/\Q$p\E\/afile\/cache/, '... naming the path')
        or diag $out;
    like($out, qr/\[emerg\]/, '... as [emerg]');
    ok(!eval { $t->start; 1 }, '... and nginx does not start');
    like($@, qr/\Q$p\E\/afile\/cache/, '... naming the path') or diag $@;

    # the cache path itself is a regular file
    config("$p/afile");
    ($ok, $out) = $t->test_config;
    ok(!$ok, 'cache path is a regular file: nginx -t fails');
    like($out, qr/deepseek_guard_cache_path "\Q$p\E\/afile" is not writable/,
         '... "is not writable", naming it') or diag $out;
    ok(!eval { $t->start; 1 }, '... and nginx does not start');
    like($@, qr/"\Q$p\E\/afile" is not writable/, '... naming it') or diag $@;
}

# a directory the workers cannot write: permissions do not stop root (the
# master, and the tests may run as root), a read-only file system does
SKIP: {
    my $ro = "$p/ro";
    mkdir $ro or die "$ro: $!";
    skip 'a read-only tmpfs needs root', 5
        unless $> == 0 && system("mount -t tmpfs -o ro,size=64k tmpfs $ro 2>/dev/null") == 0;
    $t->allow_log(qr/\[emerg\].*\Q$ro\E/);
    config($ro);
    my ($ok, $out) = $t->test_config;
    ok(!$ok, 'cache directory on a read-only file system: nginx -t fails');
    like($out, qr/\Q$ro\E/, '... naming the directory') or diag $out;
    like($out, qr/\[emerg\]/, '... as [emerg]');
    ok(!eval { $t->start; 1 }, '... and nginx does not start');
    like($@, qr/\Q$ro\E/, '... naming it') or diag $@;
    system('umount', $ro);
}

# ------------------------------------------------ a bad file found at start

my $dir = "$p/cache";
mkdir $dir or die "$dir: $!";

my @bad = (
    # what, how to spoil the directory, cache path parameters
    ['1 MB of random bytes as data.mdb',
     sub { spew("$dir/data.mdb", random_bytes(1024 * 1024)) }, ''],
    ['a 2 MB random data.mdb, larger than max_size=1m',
     sub { spew("$dir/data.mdb", random_bytes(2 * 1024 * 1024)) }, 'max_size=1m'],
    ['a truncated data.mdb (its first 3 KB)',
     sub { spew("$dir/data.mdb", random_bytes(3 * 1024)) }, ''],
    ['a garbage lock.mdb',
     sub { spew("$dir/lock.mdb", random_bytes(8192)) }, ''],
);

for my $case (@bad) {
    my ($what, $spoil, $params) = @$case;
    unlink glob("$dir/*.mdb");
    $spoil->();
    config($dir, $params);
    my $off = length $t->error_log;
    $t->start;

    # the workers open the store in init_process, possibly just after the
    # harness saw them: wait for what they log
    my $re = qr/the data file in "\Q$dir\E" was corrupt or incompatible and was recreated/;
    $t->wait_until(sub { substr($t->error_log, $off) =~ $re }, $what =~ /lock/ ? 1 : 5);
    my $log = substr($t->error_log, $off);
    if ($what =~ /lock/) {
        # LMDB rebuilds its lock file on its own when no process uses it;
        # either way the cache must work
        pass("$what: nginx started");
    } else {
        like($log, qr/\[warn\].*deepseek_guard cache "llm": the data file in "\Q$dir\E" was corrupt or incompatible and was recreated/,
             "$what: replaced and logged (warn)");
    }
    unlike($log, qr/cannot open/, '... opened by every worker');
    works($what);
    $t->stop;
}

# a valid LMDB environment of another program: not a response cache
{
    unlink glob("$dir/*.mdb");
    my $in = "$p/foreign.txt";
    spew($in, "VERSION=3\nformat=print\ntype=btree\nmapsize=1048576\n"
              . "HEADER=END\n some-key\n some-value\nDATA=END\n");
    system('mdb_load', '-f', $in, $dir) == 0 or diag "mdb_load failed: $?";
    ok(-s "$dir/data.mdb", 'a foreign LMDB environment (mdb_load)');
    config($dir);
    $t->start;
    works('foreign LMDB file');
    $t->stop;
}

# ------------------------------------------------ corrupt between runs

# the "recreated" warning, logged by a worker after error.log offset $off
sub recreated {
    my ($off) = @_;
    return $t->wait_until(sub {
        substr($t->error_log, $off)
            =~ /\[warn\].*the data file in "\Q$dir\E" was corrupt or incompatible and was recreated/
    }, 5);
}

{
    unlink glob("$dir/*.mdb");
    config($dir);
    $t->start;
    my $c = 'survives a clean restart';
    is(status_of(content => $c), '200 MISS', 'stored an entry');
    $t->restart;
    is(status_of(content => $c), '200 HIT', '... kept across a clean restart');

    # stop, overwrite the file with garbage of the same size, start
    $t->stop;
    my $size = -s "$dir/data.mdb";
    ok($size, "data.mdb is $size bytes");
    spew("$dir/data.mdb", random_bytes($size));
    my $off = length $t->error_log;
    $t->start;
    ok(recreated($off), 'corrupted while stopped: replaced and logged');
    is(status_of(content => $c), '200 MISS', '... the old entry is gone (MISS)');
    is(status_of(content => $c), '200 HIT', '... and stored again (HIT)');
    works('after corruption between runs');

    # the same with the first page only (the meta pages) overwritten
    $t->stop;
    open(my $fh, '+<', "$dir/data.mdb") or die $!;
    binmode $fh;
    print {$fh} random_bytes(8192);
    close $fh;
    $off = length $t->error_log;
    $t->start;
    ok(recreated($off), 'meta pages overwritten while stopped: replaced and logged');
    works('after meta page corruption');
}

# ------------------------------------------------ a filler's worker dies

{
    # The filler waits 4 s for the mock; 10 identical requests wait for it
    # (some on each worker).  Its worker is killed with SIGKILL: no cleanup
    # runs, its fill lock stays in the keys zone.  The waiters on the other
    # worker must notice the dead owner (checked every second) and take
    # over, not wait for the 60 s lock_timeout.
    $t->allow_log(qr/exited on signal 9/);
    $t->mock_reset;
    my $mport = $t->mock_port;
    my $c = 'filler dies';

    # which worker holds the connection to the mock: the socket inode of
    # the ESTABLISHED connection to the mock port, found among the fds
    my $owner = sub {
        my %ino;
        for my $f ('/proc/net/tcp', '/proc/net/tcp6') {
            open(my $fh, '<', $f) or next;
            while (<$fh>) {
                my @c = split ' ';
                next unless @c > 9 && $c[3] eq '01';
                $ino{ $c[9] } = 1 if $c[2] =~ /:([0-9A-F]+)$/ && hex($1) == $mport;
            }
        }
        for my $pid ($t->worker_pids) {
            opendir(my $d, "/proc/$pid/fd") or next;
            for (readdir $d) {
                my $l = readlink("/proc/$pid/fd/$_") // '';
                return $pid if $l =~ /^socket:\[(\d+)\]$/ && $ino{$1};
            }
        }
        return undef;
    };

    # start the filler on its own and find its worker
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if (!$pid) {
        $t->{owner} = 0;    # the child must not clean up the parent's nginx
        $t->http(%{ $t->chat_req(content => $c, timeout => 10,
                                 headers => ['X-Mock-Delay-Ms' => 4000]) });
        POSIX::_exit(0);
    }
    my $victim = $t->wait_until($owner, 3);
    ok($victim, 'found the filler\'s worker (' . ($victim // 'none') . ')');

    # the waiters, then the kill 300 ms later
    my @reqs = map { $t->chat_req(content => $c, timeout => 15) } 1 .. 10;
    my @res;
    {
        # kill from a child at +300 ms while parallel() runs
        my $k = fork();
        die "fork: $!" unless defined $k;
        if (!$k) {
            $t->{owner} = 0;
            sleep 0.3;
            kill 'KILL', $victim if $victim;
            POSIX::_exit(0);
        }
        @res = $t->parallel(\@reqs, timeout => 20);
        waitpid($k, 0);
    }
    waitpid($pid, 0);

    my @ok = grep { $_->{status} == 200 } @res;
    my @gone = grep { $_->{status} != 200 } @res;
    cmp_ok(scalar @ok, '>=', 1, scalar(@ok) . ' waiters on the surviving worker answered 200');
    is(scalar(grep { ($_->{error} // '') !~ /closed|reset/ } @gone), 0,
       '... the others were on the killed worker (connection closed)')
        or diag explain [map { $_->{error} // $_->{status} } @gone];
    cmp_ok(max(map { $_->{ms} } @ok), '<', 3000,
           '... within ' . int(max(map { $_->{ms} } @ok)) . ' ms: not the 60 s lock_timeout');
    is(scalar(grep { $_->{body} eq $ok[0]{body} } @ok), scalar @ok, '... same answer');
    cmp_ok($t->mock_stats->{chat_requests}, '<=', 2, '... one takeover upstream call');

    # the master replaced the worker; everything still works
    ok($t->wait_until(sub { $t->worker_pids == 2 }, 5), 'a new worker replaced it');
    is(status_of(content => $c), '200 HIT', '... the takeover\'s answer was stored');
    works('after a worker was killed');
}

$t->done;
