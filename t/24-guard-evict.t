#!/usr/bin/perl
# deepseek_guard zone eviction: a spent key is not evicted while a full one
# can be.
#
# When a zone's shared memory is full and a new key needs a node, the
# eviction looks at up to 16 least recently used idle keys and takes one
# whose buckets have filled up again (evicting it loses nothing: a new key
# starts full); only when none of them is full does the least recently
# used idle key go.  Evicting the least recently used key regardless would
# hand a client that spent its quota a fresh one, as soon as enough other
# keys pass through the zone.
#
# Zone "small" (32 KB, about 128 keys) is a per-key quota of 1r/m.  Zone
# "gate" is one global token a minute.  /victim applies "small" only,
# /flood applies "small" and then "gate": once gate's token is taken, every
# /flood request creates its key in "small", is charged there, is refused
# by "gate" (503) and is refunded in "small", so that it leaves behind an
# idle key whose bucket is full.  A flood of distinct keys fills the zone
# and forces evictions; the victim (spent, the least recently used key of
# all) must keep its spent quota: 429, not a fresh 200.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# /victim and /flood answer from a second server of the same nginx (the
# guard runs in the access phase, before its content handler)
$t->write_config(<<'EOF');
    deepseek_guard_zone small:32k key=$http_authorization rate=1r/m status=429;
    deepseek_guard_zone gate:32k  key=global rate=1r/m status=503;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /victim {
            deepseek_guard small;
            proxy_pass http://127.0.0.1:%%PORT_1%%/;
        }

        location /flood {
            deepseek_guard small;
            deepseek_guard gate;
            proxy_pass http://127.0.0.1:%%PORT_1%%/;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        access_log off;
        location / {
            return 200 "ok\n";
        }
    }
EOF
$t->start;

sub metric {
    my ($name, $zone) = @_;
    return $t->metrics->{"$name\{zone=\"$zone\"}"} // -1;
}

sub req {
    my ($uri, $key) = @_;
    return { method => 'GET', uri => $uri, timeout => 20,
             headers => [Authorization => "Bearer $key"] };
}

sub status { $t->http(%{ req(@_) })->{status} }

# ------------------------------------------------ the victim spends its quota

is(status('/victim', 'victim'), 200, 'the victim key: 200, its 1r/m quota spent');
is(status('/victim', 'victim'), 429, '... a second request at once: 429');

# gate's only token of the minute
is(status('/flood', 'first'), 200, 'the first /flood request takes gate\'s token: 200');
is(status('/flood', 'second'), 503, '... the next one is refused by gate: 503');

is(metric('deepseek_guard_zone_evictions_total', 'small'), 0,
   'no key evicted from small yet');

# ------------------------------------------------ the flood

# 400 distinct keys, 4 at a time: more than three times what the zone
# holds, so the least recently used order cycles past the victim (the
# oldest key) again and again.  Every one is refused by gate and refunded
# in small: its key stays behind idle and full.
my $N = 400;
my @res = $t->parallel([map { req('/flood', "flood-$_") } 1 .. $N],
                       timeout => 120, concurrency => 4);
my %st;
$st{ $_->{status} }++ for @res;
is($st{503} // 0, $N, "$N distinct keys on /flood: every one refused by gate, 503")
    or diag explain \%st;

my $keys = metric('deepseek_guard_zone_keys', 'small');
my $ev = metric('deepseek_guard_zone_evictions_total', 'small');
cmp_ok($keys, '>', 16, "small is full with $keys keys");
cmp_ok($keys, '<', $N, '... fewer than the flood brought');
# every key that was in the zone when the flood began would have been
# evicted, had the order been the least recently used one alone
cmp_ok($ev, '>', $keys, "... evictions ($ev) went past every key of a full zone");
# keys are only ever removed by eviction: victim, first, second and the
# flood made N + 3 keys
is($ev, $N + 3 - $keys, '... one for each key the zone could not hold');

# ------------------------------------------------ the spent keys were kept

my $v = $t->http(%{ req('/victim', 'victim') });
is($v->{status}, 429, 'the victim after the flood: still 429, its spent quota kept');
like($v->{headers}{'retry-after'} // '', qr/^[1-9]\d*$/, '... with Retry-After');
is(status('/victim', 'first'), 429,
   'the key of the first /flood request (spent in small, not full): 429 too');

# the zone still works: a fresh key is admitted once, then limited
is(status('/victim', 'fresh'), 200, 'a fresh key on /victim: 200');
is(status('/victim', 'fresh'), 429, '... then 429');

$t->done;
