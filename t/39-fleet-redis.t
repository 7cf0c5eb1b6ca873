#!/usr/bin/perl
# Fleet zones (deepseek_guard_fleet, fleet=on): accuracy of a fleet-wide
# quota and of a fleet-wide in-flight cap over 3 nginx instances ("nodes",
# 2 workers each) that share one real redis-server and one mock upstream.
#
#   * a per-key quota of 600r/m, round-robin traffic at twice the quota
#     over the 3 nodes for 60 s: at most 600 * 1.05 admitted, and within
#     the bound of docs/fleet.md (what the fleet's bucket earns + its
#     capacity + every node's credit: 605 in a minute); at least 600 * 0.9,
#     the demand exceeding it;
#   * all traffic on one node: still at least 90% of the quota (a 300r/m
#     zone over 30 s: 150 allowed, a shorter window than the first to keep
#     the test time down, the same proportions);
#   * inflight=12 fleet-wide (status=503, queued) under 3x overload with
#     slow answers: the mock never sees more than 12 at once, every node
#     gets admissions, and the 12 slots are used (throughput not starved).
#
# Without the fleet (each node on its own) the quota would be admitted
# three times over and the mock would see up to 36 requests at once.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Time::HiRes qw(time);

plan skip_all => 'redis-server and redis-cli are needed (apt-get install '
               . 'redis-server)' unless DSG::Test::have_redis();

my $NODES = 3;
my @n = DSG::Test->fleet_nodes($NODES, workers => 2);
my $t = $n[0];

$t->redis_start;
# unlimited (capacity 0): any over-admission of the in-flight cap shows in
# its max_inflight; a short non-streamed answer by default
$t->mock_start(capacity => 0, first_token_ms => 0, token_ms => 0,
               tokens => 1);

# one config for every node; %%NODE%% is node1..node3, %%PORT%% each
# node's own listener, %%REDIS%% and %%MOCK%% node1's
my $conf = <<'EOF';
    deepseek_guard_fleet redis=%%REDIS%% interval=100ms nodes=3 node=%%NODE%%;

    deepseek_guard_class normal queue=32 queue_timeout=5s;

    deepseek_guard_zone quota:1m key=$http_authorization rate=600r/m
                        status=429 fleet=on;
    deepseek_guard_zone half:1m key=$http_authorization rate=300r/m
                        status=429 fleet=on;
    deepseek_guard_zone backend:1m key=all inflight=12 status=503 fleet=on;

    log_format fleet '$msec $pid $status $deepseek_guard_status '
                     'zone=$deepseek_guard_zone $uri';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log fleet;

        location /v1/ {
            deepseek_guard quota;
            proxy_pass http://%%MOCK%%;
            proxy_http_version 1.1;
        }

        location /half/ {
            deepseek_guard half;
            proxy_pass http://%%MOCK%%/;
            proxy_http_version 1.1;
        }

        location /backend/ {
            deepseek_guard backend;
            proxy_pass http://%%MOCK%%/;
            proxy_http_version 1.1;
            proxy_read_timeout 30s;
        }

        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
        }
    }
EOF

for my $node (@n) {
    $node->write_config($conf);
    $node->start;
}

ok(DSG::Test::fleet_all(\@n, 'deepseek_guard_fleet_up', 1, 10),
   'every node is synced with redis (deepseek_guard_fleet_up 1)')
    or diag explain [map { $_->scrape } @n];

# ------------------------------------------------------------ helpers

# a short non-streamed chat of API key $key to node $i (0-based) at $at_ms
sub chat_to {
    my ($i, $key, $at_ms, %o) = @_;
    return { %{ $t->chat_req(key => $key, stream => 0, timeout => 15, %o) },
             port => $n[$i]->port, at_ms => $at_ms, node => $i };
}

sub count { my ($st, @r) = @_; scalar grep { $_->{status} == $st } @r }

# the 200s of each node (by the node each request was sent to)
sub per_node {
    my ($reqs, $res) = @_;
    my @per = (0) x $NODES;
    $res->[$_]{status} == 200 && $per[ $reqs->[$_]{node} ]++ for 0 .. $#$res;
    return @per;
}

# the client-side span of a run: first request sent .. last answer read
sub span {
    my @r = @_;
    my ($s) = sort { $a <=> $b } map { $_->{start} } @r;
    my ($e) = sort { $b <=> $a } map { $_->{end} } @r;
    return $e - $s;
}

# ------------------------------------------------ 600r/m, round-robin, 60 s

{
    # 20 requests a second, in turn to node1, node2, node3, for 60 s: twice
    # the quota of 10 a second, one API key
    my $key = 'acc-rr';
    my @reqs = map { chat_to($_ % $NODES, $key, $_ * 50) } 0 .. 1199;
    my @res = $t->parallel(\@reqs, timeout => 120);

    my $ok = count(200, @res);
    my $rej = count(429, @res);
    my $elapsed = span(@res);
    my @per = per_node(\@reqs, \@res);
    diag(sprintf 'quota 600r/m, round-robin over %d nodes: %d admitted, '
         . '%d rejected of %d in %.2f s (per node: %s)', $NODES, $ok, $rej,
         scalar @res, $elapsed, join('/', @per));

    is($ok + $rej, scalar @res, '600r/m round-robin: every answer is 200 or 429')
        or diag explain [grep { defined } (map { $_->{error} } @res)[0 .. 9]];
    cmp_ok($ok, '<=', 600 * 1.05, '... at most 600 * 1.05 admitted in a minute');
    # +1 for the ms rounding of the clocks (redis's, the client's)
    my $bound = DSG::Test::fleet_rate_bound(rate => 10, secs => $elapsed,
                    burst => 0, interval => 0.1, nodes => $NODES) + 1;
    cmp_ok($ok, '<=', $bound,
           sprintf('... within the bound: earned + bucket + credits = %.1f',
                   $bound));
    cmp_ok($ok, '>=', 600 * 0.9, '... at least 600 * 0.9 admitted '
                                . '(the demand is twice the quota)');
    is(scalar(grep { $_ > 0 } @per), $NODES, '... every node admitted some');

    # the fleet's state of the key is in redis: "dsg:quota:<hex>" hashes
    my @keys = grep { length } split /\n/,
        $t->redis_cli('--scan', '--pattern', 'dsg:quota:*');
    cmp_ok(scalar @keys, '>=', 1, '... redis holds the zone\'s key')
        or diag $t->redis_cli('--scan');
    like($keys[0] // '', qr/^dsg:quota:[0-9a-f]+$/, '... named dsg:quota:<hex>');
    is($t->redis_cli('TYPE', $keys[0] // 'none'), 'hash', '... a hash');
}

# ------------------------------------------------ all traffic on one node

{
    # 300r/m over 30 s (150 allowed), 10 requests a second, all to node2
    my $key = 'acc-one';
    my @reqs = map { chat_to(1, $key, $_ * 100, uri => '/half/v1/chat/completions') }
               0 .. 299;
    my @res = $t->parallel(\@reqs, timeout => 60);
    my $ok = count(200, @res);
    my $elapsed = span(@res);
    diag(sprintf 'quota 300r/m, all on node2: %d admitted, %d rejected of '
         . '%d in %.2f s', $ok, count(429, @res), scalar @res, $elapsed);

    is($ok + count(429, @res), scalar @res,
       '300r/m on one node: every answer is 200 or 429');
    cmp_ok($ok, '>=', 150 * 0.9, '... at least 90% of the quota admitted');
    my $bound = DSG::Test::fleet_rate_bound(rate => 5, secs => $elapsed,
                    burst => 0, interval => 0.1, nodes => $NODES) + 1;
    cmp_ok($ok, '<=', $bound,
           sprintf('... within the bound: earned + bucket + credits = %.1f',
                   $bound));
}

# ------------------------------------------------ inflight=12, 3x overload

{
    # 36 slow requests (1 s at the mock) a second for 8 s, 12 a second to
    # each node: three times what 12 slots serve.  The queue (32 places a
    # node, 5 s) absorbs some, the rest is refused with 503 at once.
    $t->settle('before the overload');
    $t->mock_reset;
    my @reqs;
    for my $sec (0 .. 7) {
        for my $k (0 .. 35) {
            my $i = $k % $NODES;
            push @reqs, chat_to($i, "inflight-$sec-$k", $sec * 1000 + $k * 25,
                                uri => '/backend/v1/chat/completions',
                                headers => { 'X-Mock-Delay-Ms' => 1000 },
                                timeout => 20);
        }
    }
    my @res = $t->parallel(\@reqs, timeout => 60);
    my $st = $t->mock_stats;
    my $ok = count(200, @res);
    my $busy = count(503, @res);
    my $elapsed = span(@res);
    my @per = per_node(\@reqs, \@res);
    # the share of 12 slots x the run's span that admitted requests used
    my $use = $ok * 1.0 / (12 * $elapsed);
    diag(sprintf 'inflight=12 fleet-wide, 3x overload: %d served, %d '
         . 'refused (503) of %d in %.2f s, per node %s; mock max_inflight '
         . '%d; slot use %.0f%%', $ok, $busy, scalar @res, $elapsed,
         join('/', @per), $st->{max_inflight}, 100 * $use);

    is($ok + $busy, scalar @res, 'inflight=12: every answer is 200 or 503')
        or diag explain [grep { defined } (map { $_->{error} } @res)[0 .. 9]];
    cmp_ok($st->{max_inflight}, '<=', 12,
           '... the mock never saw more than 12 in flight (3 nodes)');
    cmp_ok($st->{max_inflight}, '>=', 10, '... and the cap was (nearly) reached');
    is(scalar(grep { $_ >= 0.1 * $ok } @per), $NODES,
       '... every node got at least a tenth of the admissions');
    cmp_ok($use, '>=', 0.6, '... the 12 slots were used (not starved)');
    is($st->{rejected_503}, 0, '... every 503 came from the guard');
}

# the fleet stayed synced through it all
my @fb = map { $_->metric('deepseek_guard_fleet_fallbacks_total') // -1 } @n;
is_deeply(\@fb, [(0) x $NODES], 'no node fell back to its static share')
    or diag "fallbacks: @fb";
cmp_ok($t->metric('deepseek_guard_fleet_syncs_total') // 0, '>', 100,
       'node1 synced with redis all along');

$_->check_log for @n[1 .. $#n];
$t->done;
