#!/usr/bin/perl
# A hot key's lease count (issue 15).
#
# Every admitted request holds a lease on its key node, and a key with
# leases is never evicted (its leases point at it).  In a zone with an
# in-flight cap the cap bounds the count (inflight= is at most 65535); in
# a rate-only zone nothing does.  The count was 16 bits: a key with 65,536
# concurrent requests wrapped to 0 and could be evicted while in use, and
# the leases then released a freed node.  It is 32 bits now, and the node
# still fits the slab's 128-byte chunk (a key costs no more memory).
#
# 65,536 concurrent requests to one key are more than a test machine
# holds, so the test compiles the module's own header, as the module is
# built (the include paths of build/nginx/objs/Makefile), counts a node's
# leases past 65,536 and checks the node's size.  It fails on the 16-bit
# field (the count wraps) and on a node that outgrew its chunk.

use strict;
use warnings;
use FindBin;
use File::Temp qw(tempdir);
use Test::More;

my $repo = "$FindBin::Bin/..";
my $nginx = "$repo/build/nginx";
my $mk = "$nginx/objs/Makefile";

plan skip_all => "no $mk: run ./build.sh first" unless -f $mk;

open my $fh, '<', $mk or die "$mk: $!";
my $make = do { local $/; <$fh> };
close $fh;
my ($incs) = $make =~ /^ALL_INCS = (.*?)\n\n/ms
    or BAIL_OUT("no ALL_INCS in $mk");
$incs =~ s/\\\n//g;

my $dir = tempdir(CLEANUP => 1);
open my $c, '>', "$dir/hot.c" or die $!;
print $c <<'EOF';
#include <stdio.h>
#include "ngx_http_deepseek_guard_module.h"

int
main(void)
{
    unsigned long                    i;
    ngx_http_deepseek_guard_node_t   n;

    ngx_memzero(&n, sizeof(n));

    for (i = 0; i < 65537; i++) {
        n.holders++;
    }

    printf("%lu %lu\n", (unsigned long) n.holders,
           (unsigned long) sizeof(ngx_http_deepseek_guard_node_t));

    return 0;
}
EOF
close $c;

my $out = `cd $nginx && cc $incs -o $dir/hot $dir/hot.c 2>&1`;
is($?, 0, 'compiles against the module header') or diag $out;

my ($count, $size) = split ' ', `$dir/hot`;
is($count, 65537, '65,537 leases on one key are counted, not wrapped');
cmp_ok($size, '<=', 128, "a key node is $size bytes: one 128-byte slab chunk");

done_testing;
