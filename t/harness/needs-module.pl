#!/usr/bin/perl
# Harness self-test helper (run by t/00-harness.t, not by prove): a test
# that only passes when the module is loaded, since $deepseek_guard_status
# is unknown to nginx otherwise.  With DSG_NO_MODULE=1 it must fail.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../lib";
use Test::More;
use DSG::Test;

my $t = DSG::Test->new(workers => 1);
$t->write_config(<<'EOF_CONF');
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v { return 200 "$deepseek_guard_status"; }
    }
EOF_CONF
$t->start;
is($t->get('/v')->{status}, 200, 'the module variable is served');
$t->done;
