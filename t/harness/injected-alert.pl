#!/usr/bin/perl
# Harness self-test helper (run by t/00-harness.t, not by prove): appends
# an [alert] line to error.log; $t->done must then fail, unless the
# argument "allow" declares the line with allow_log.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../lib";
use Test::More;
use DSG::Test;

my $allow = @ARGV && $ARGV[0] eq 'allow';

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
print {$fh} "2026/01/01 00:00:00 [alert] 1#1: injected by the harness self-test\n";
close $fh;

$t->allow_log(qr/injected/) if $allow;
$t->done;
