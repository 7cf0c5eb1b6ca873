#!/usr/bin/perl
# Fleet zones and priority classes: critical reserve=20% over 3 nginx
# instances ("nodes", 2 workers each) sharing one redis-server.  Under 3x
# overload split over the 3 nodes:
#
#   * a fleet-wide quota of 1200r/m: critical traffic within its reserve
#     (15% of the quota, on every node) gets at least 99% admitted, and
#     normal traffic never uses the reserve fleet-wide: it is admitted at
#     most 80% of the quota + the bound of docs/fleet.md (the normal
#     tier's bucket + every node's credit), and not much less;
#   * a fleet-wide inflight=10: critical requests on every node are all
#     served, and normal requests never hold more than 8 slots fleet-wide
#     (normal and critical go to two different mocks, so the normal mock's
#     max_inflight counts normal requests only).
#
# Classes come from a request header through a map (a test shortcut: a
# gateway classifies by API key).

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use POSIX qw(ceil);

plan skip_all => 'redis-server and redis-cli are needed (apt-get install '
               . 'redis-server)' unless DSG::Test::have_redis();

my $NODES = 3;
my @n = DSG::Test->fleet_nodes($NODES, workers => 2);
my $t = $n[0];

$t->redis_start;
$t->mock_start(capacity => 0, first_token_ms => 0, token_ms => 0, tokens => 1);
$t->mock_start(name => 'crit', capacity => 0, first_token_ms => 0,
               token_ms => 0, tokens => 1);

my $conf = <<'EOF';
    deepseek_guard_fleet redis=%%REDIS%% interval=100ms nodes=3 node=%%NODE%%;

    deepseek_guard_class critical reserve=20% queue=16 queue_timeout=15s;
    deepseek_guard_class normal queue=16 queue_timeout=3s;

    map $http_x_class $dsg_class {
        critical  critical;
        default   normal;
    }

    # 20 a second, 10 at once; normal may use 16 a second, 8 at once
    deepseek_guard_zone quota:1m key=$http_authorization rate=1200r/m
                        burst=9 status=429 fleet=on;
    # normal may hold 8 of the 10 slots
    deepseek_guard_zone backend:1m key=all inflight=10 status=503 fleet=on;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        root %%PREFIX%%/html;
        deepseek_guard_classify $dsg_class default=normal;

        location /q {
            deepseek_guard quota;
        }

        location /v1/ {
            deepseek_guard backend;
            proxy_pass http://%%MOCK%%;
            proxy_http_version 1.1;
            proxy_read_timeout 30s;
        }

        location /crit/ {
            deepseek_guard backend;
            proxy_pass http://%%MOCK_crit%%/;
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
    $node->html_files('q');
    $node->write_config($conf);
    $node->start;
}

ok(DSG::Test::fleet_all(\@n, 'deepseek_guard_fleet_up', 1, 10),
   'every node is synced with redis')
    or diag explain [map { $_->scrape } @n];

sub count { my ($st, @r) = @_; scalar grep { $_->{status} == $st } @r }

sub span {
    my @r = @_;
    my ($s) = sort { $a <=> $b } map { $_->{start} } @r;
    my ($e) = sort { $b <=> $a } map { $_->{end} } @r;
    return $e - $s;
}

# ------------------------------------------------ quota, 3x overload

{
    # 30 s of 60 requests a second (3x the quota of 20/s), 20 a second to
    # each node, one API key: on every node 1 a second is critical (3/s in
    # all, 15% of the quota, within the 20% reserve), 19 are normal
    my $SECS = 30;
    my (@reqs, @cls);
    for my $tick (0 .. $SECS * 20 - 1) {        # every 50 ms
        for my $i (0 .. $NODES - 1) {
            my $crit = $tick % 20 == 7 * $i % 20;   # once a second a node
            push @reqs, { uri => '/q', port => $n[$i]->port,
                          at_ms => $tick * 50 + $i * 15, timeout => 10,
                          headers => [Authorization => 'Bearer tenant-r',
                                      $crit ? ('X-Class' => 'critical') : ()] };
            push @cls, $crit ? 'critical' : 'normal';
        }
    }
    my @res = $t->parallel(\@reqs, timeout => $SECS + 30);
    my $elapsed = span(@res);
    my (%ok, %all, %node_crit);
    for my $k (0 .. $#res) {
        $all{ $cls[$k] }++;
        $ok{ $cls[$k] }++ if $res[$k]{status} == 200;
        if ($cls[$k] eq 'critical') {
            my $i = $reqs[$k]{port};
            $node_crit{$i}[0]++;
            $node_crit{$i}[1]++ if $res[$k]{status} == 200;
        }
    }
    $ok{$_} //= 0 for qw(critical normal);
    diag(sprintf 'quota 1200r/m, critical reserve 20%%, 3x overload over '
         . '%d nodes in %.2f s: critical %d/%d admitted, normal %d/%d '
         . '(80%% of the quota: %.0f)', $NODES, $elapsed, $ok{critical},
         $all{critical}, $ok{normal}, $all{normal}, 16 * $elapsed);

    is(count(200, @res) + count(429, @res), scalar @res,
       'reserve, quota: every answer is 200 or 429')
        or diag explain [grep { defined } (map { $_->{error} } @res)[0 .. 9]];
    my ($s0) = sort { $a <=> $b } map { $_->{start} } @res;
    my %node_of = map { $n[$_]->port => $_ + 1 } 0 .. $#n;
    cmp_ok($ok{critical}, '>=', ceil(0.99 * $all{critical}),
           '... critical: at least 99% admitted')
        or diag join "\n", map {
               sprintf 'critical %d from node%d at %.3f s (retry-after-ms %s)',
                   $res[$_]{status}, $node_of{ $reqs[$_]{port} },
                   $res[$_]{start} - $s0,
                   $res[$_]{headers}{'retry-after-ms'} // '-' }
           grep { $cls[$_] eq 'critical' && $res[$_]{status} != 200 } 0 .. $#res;
    is(scalar(grep { $_->[1] && $_->[1] >= ceil(0.99 * $_->[0]) }
              values %node_crit), $NODES,
       '... on every node')
        or diag explain \%node_crit;
    # the normal tier: 80% of the rate, its bucket 80% of burst + 1 = 8,
    # its credit on each node (docs/fleet.md), +1 for the clocks' ms
    # rounding
    my $bound = DSG::Test::fleet_rate_bound(rate => 20, secs => $elapsed,
                    burst => 9, share => 80, interval => 0.1,
                    nodes => $NODES) + 1;
    cmp_ok($ok{normal}, '<=', $bound,
           sprintf('... normal never uses the reserve: at most 80%% of the '
                   . 'quota + bound = %.1f', $bound));
    cmp_ok($ok{normal}, '>=', 0.85 * 16 * $elapsed,
           '... and gets at least 85% of its 80%');
}

# ------------------------------------------------ in flight, 3x overload

{
    # 10 s: each node gets 10 normal requests a second of 1 s each (30 a
    # second: 3x the cap of 10, in the normal tier's 8 almost 4x) and one
    # critical request a second of 300 ms, to the other mock
    $t->settle('before the in-flight overload');
    $t->settle('... critical mock', 15, 'crit');
    $t->mock_reset;
    $t->mock_reset('crit');
    my $SECS = 10;
    my (@reqs, @cls);
    for my $sec (0 .. $SECS - 1) {
        for my $i (0 .. $NODES - 1) {
            for my $k (0 .. 9) {
                push @reqs, { %{ $t->chat_req(stream => 0, timeout => 30,
                                  headers => { 'X-Mock-Delay-Ms' => 1000 }) },
                              port => $n[$i]->port,
                              at_ms => $sec * 1000 + $k * 100 + $i * 7 };
                push @cls, 'normal';
            }
            push @reqs, { %{ $t->chat_req(stream => 0, timeout => 30,
                              uri => '/crit/v1/chat/completions',
                              headers => { 'X-Class' => 'critical',
                                           'X-Mock-Delay-Ms' => 300 }) },
                          port => $n[$i]->port,
                          at_ms => $sec * 1000 + 450 + $i * 100 };
            push @cls, 'critical';
        }
    }
    my @res = $t->parallel(\@reqs, timeout => $SECS + 40);
    my $sn = $t->mock_stats;
    my $sc = $t->mock_stats('crit');
    my (%ok, %all, %st, %node_crit);
    for my $k (0 .. $#res) {
        $all{ $cls[$k] }++;
        $ok{ $cls[$k] }++ if $res[$k]{status} == 200;
        $st{ $cls[$k] }{ $res[$k]{status} }++;
        if ($cls[$k] eq 'critical') {
            $node_crit{ $reqs[$k]{port} }[0]++;
            $node_crit{ $reqs[$k]{port} }[1]++ if $res[$k]{status} == 200;
        }
    }
    $ok{$_} //= 0 for qw(critical normal);
    diag(sprintf 'inflight=10, critical reserve 20%%, 3x overload: critical '
         . '%d/%d served (max %d in flight), normal %d/%d served (max %d in '
         . 'flight, cap 8)', $ok{critical}, $all{critical},
         $sc->{max_inflight}, $ok{normal}, $all{normal}, $sn->{max_inflight});

    is(scalar(grep { $_->{status} != 200 && $_->{status} != 503 } @res), 0,
       'reserve, in flight: every answer is 200 or 503')
        or diag explain \%st;
    cmp_ok($ok{critical}, '>=', ceil(0.99 * $all{critical}),
           '... critical: at least 99% served');
    is(scalar(grep { $_->[1] && $_->[1] >= ceil(0.99 * $_->[0]) }
              values %node_crit), $NODES, '... on every node')
        or diag explain \%node_crit;
    cmp_ok($sn->{max_inflight}, '<=', 8,
           '... normal never held more than 8 slots fleet-wide');
    cmp_ok($sn->{max_inflight}, '>=', 6, '... and was not starved either');
    is($sn->{rejected_503} + $sc->{rejected_503}, 0,
       '... every 503 came from the guard');
}

$_->check_log for @n[1 .. $#n];
$t->done;
