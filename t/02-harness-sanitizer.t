#!/usr/bin/perl
# Self-test of the harness's sanitizer report check: the first line of an
# ASan or UBSan report in error.log (a worker's stderr goes there) fails
# the test script like an [alert] does; lines that merely mention such
# words do not.  Under ./build.sh test-asan (DSG_NGINX_PRELOAD set) also
# end to end: the runtime is mapped in the workers, a worker killed by
# SIGSEGV leaves an AddressSanitizer report in error.log that the harness
# catches, and exits with the code that ASAN_OPTIONS asked for.

use strict;
use warnings;
use Test::More;
use POSIX ();
use Time::HiRes qw(sleep);
use lib 't/lib';
use DSG::Test;

my $REPO = DSG::Test->repo;

sub run_script {
    my (@args) = @_;
    my $pid = open(my $fh, '-|');
    die "fork: $!" unless defined $pid;
    if (!$pid) {
        open(STDERR, '>&', \*STDOUT);
        exec { $^X } $^X, "-I$REPO/t/lib", @args
            or POSIX::_exit(127);
    }
    local $/;
    my $out = <$fh>;
    close $fh;
    return ($? >> 8, defined $out ? $out : '');
}

# ------------------------------------------------ injected report lines

for my $kind (qw(asan ubsan)) {
    my $script = "$REPO/t/harness/injected-sanitizer.pl";
    my ($rc, $out) = run_script($script, $kind);
    isnt($rc, 0, "$kind: an injected report line fails the test script");
    like($out, qr/^not ok \d+ - error\.log has no alerts$/m,
         "$kind: ... in the test \"error.log has no alerts\"") or diag $out;
    like($out, qr/injected by the harness self-test/,
         "$kind: ... which shows the offending line") or diag $out;

    ($rc, $out) = run_script($script, $kind, 'allow');
    is($rc, 0, "$kind: the same line declared with allow_log passes")
        or diag $out;
}

# ------------------------------------------------ what is and is not a report

# under ASan: an exit code of our own, to see that the options given to
# the master at exec are those of its workers (nginx empties a worker's
# environment, but the runtime read ASAN_OPTIONS before the fork)
local $ENV{ASAN_OPTIONS} = ($ENV{ASAN_OPTIONS} || '') . ':exitcode=42'
    if $ENV{DSG_NGINX_PRELOAD};

my $t = DSG::Test->new(workers => 1);
$t->write_config(<<'EOF_CONF');
    server {
        listen 127.0.0.1:%%PORT%%;
        location / { return 200 "ok"; }
    }
EOF_CONF
$t->start;

my @reports = (
    '==17==ERROR: AddressSanitizer: stack-buffer-overflow on address 0x1',
    '==17== ERROR: LeakSanitizer: detected memory leaks',
    'SUMMARY: AddressSanitizer: heap-buffer-overflow dsg_entry.c:12 in f',
    'SUMMARY: UndefinedBehaviorSanitizer: undefined-behavior x.c:1:2 in',
    '/work/x/ngx_http_deepseek_guard_limit.c:812:31: runtime error: '
        . 'shift exponent 64 is too large',
);
my @benign = (
    '2026/01/01 00:00:00 [info] 1#1: *1 client sent "runtime error: x" '
        . 'while reading client request line',
    '2026/01/01 00:00:00 [error] 1#1: *2 open() "/ERROR: AddressSanitizer"'
        . ' failed (2: No such file or directory)',
    '2026/01/01 00:00:00 [notice] 1#1: worker process 7 exited with code 1',
);
open(my $fh, '>>', $t->prefix . '/logs/error.log') or die "error.log: $!";
print {$fh} "$_\n" for @reports, @benign;
close $fh;

my %bad = map { $_ => 1 } $t->bad_log_lines;
ok($bad{$_}, "flagged: $_") for @reports;
ok(!$bad{$_}, "not flagged: $_") for @benign;
$t->allow_log(map { qr/^\Q$_\E$/ } @reports);

# ------------------------------------------------ end to end, under ASan

SKIP: {
    skip 'not an ASan run (DSG_NGINX_PRELOAD unset)', 5
        unless $ENV{DSG_NGINX_PRELOAD};

    my ($w) = $t->worker_pids;
    my $maps = do {
        open(my $m, '<', "/proc/$w/maps") or die "maps: $!";
        local $/;
        <$m>;
    };
    like($maps, qr{/libasan\.so}, 'the ASan runtime is mapped in a worker');
    like($maps, qr{/libubsan\.so}, '... and the UBSan runtime');

    kill 'SEGV', $w;
    ok($t->wait_until(sub { grep { /^==$w==ERROR: AddressSanitizer: SEGV/ }
                                 $t->bad_log_lines }, 15),
       'its ASan report reached error.log and is flagged')
        or diag $t->error_log;
    ok($t->wait_until(sub { $t->error_log
                            =~ /worker process $w exited with code 42\b/ }, 10),
       '... and it exited with the code set in ASAN_OPTIONS')
        or diag $t->error_log;
    is($t->get('/')->{status}, 200, 'a new worker serves');
    $t->allow_log(qr/^==$w==ERROR: AddressSanitizer: SEGV/,
                  qr/^SUMMARY: AddressSanitizer: SEGV/);
}

$t->done;
