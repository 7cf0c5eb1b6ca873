#!/usr/bin/perl
# Harness self-test helper (run by t/02-harness-sanitizer.t, not by prove):
# appends the first line of a sanitizer report (argument "asan" or
# "ubsan") to error.log, as a worker's stderr would; $t->done must then
# fail, unless the argument "allow" follows and declares the line.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../lib";
use Test::More;
use DSG::Test;

my ($kind, $allow) = @ARGV;
$kind ||= 'asan';

my %line = (
    asan  => "==4242==ERROR: AddressSanitizer: heap-use-after-free on address"
             . " 0x602000000010 at pc 0x7f0000000000 (injected by the"
             . " harness self-test)",
    ubsan => "ngx_deepseek_guard_module/dsg_bucket.c:42:7: runtime error:"
             . " signed integer overflow (injected by the harness self-test)",
);

my $t = DSG::Test->new(workers => 1);
$t->write_config(<<'EOF_CONF');
    server {
        listen 127.0.0.1:%%PORT%%;
        location / { return 200 "ok"; }
    }
EOF_CONF
$t->start;
is($t->get('/')->{status}, 200, 'nginx serves');

open(my $fh, '>>', $t->prefix . '/logs/error.log') or die "error.log: $!";
print {$fh} "$line{$kind}\n";
close $fh;

$t->allow_log(qr/injected/) if $allow;
$t->done;
