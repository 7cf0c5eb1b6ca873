#!/usr/bin/perl
# deepseek_guard_fleet and fleet=on: configuration errors fail "nginx -t"
# with a message naming the problem and the directive's file:line; valid
# configurations pass.  Then one live instance (2 workers) with a real
# redis-server: the fleet metric families, one agent connection per
# instance (not per worker), the redis keys "<prefix>:<zone>:<hex>"
# (hashes, prefix= honoured, none for a local zone), and a reload.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# %%F%% the fleet line(s), %%Z%% the zone line, %%S%% a line in server{}
my $base = <<'EOF';
%%F%%
    deepseek_guard_class critical reserve=20%;
    deepseek_guard_class normal;
%%Z%%
    deepseek_guard_zone local:1m key=$http_authorization rate=60r/m status=429;
    deepseek_guard_zone b:1m key=all inflight=12 status=503 fleet=on;

    server {
        listen 127.0.0.1:%%PORT%%;
        root %%PREFIX%%/html;
%%S%%
        location /q { deepseek_guard q; }
        location /l { deepseek_guard local; }
        location /b { deepseek_guard b; }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
EOF
my $fleet = '    deepseek_guard_fleet redis=127.0.0.1:6399 interval=100ms nodes=3;';
my $zone = '    deepseek_guard_zone q:1m key=$http_authorization rate=600r/m '
         . 'status=429 fleet=on;';

sub conf {
    my (%o) = @_;
    my $c = $base;
    $c =~ s/%%F%%/$o{F} \/\/ $fleet/e;
    $c =~ s/%%Z%%/$o{Z} \/\/ $zone/e;
    $c =~ s/%%S%%/$o{S} \/\/ ''/e;
    return $c;
}

sub good {
    my ($name, %o) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $t->write_config(conf(%o));
    my ($ok, $out) = $t->test_config;
    ok($ok, "$name: nginx -t passes") or diag $out;
}

sub bad {
    my ($name, $msg, $line_re, %o) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $t->config_fails($name, conf(%o), $msg, $line_re);
    my (undef, $out) = $t->test_config;
    note("$name: $_") for grep { /\[emerg\]/ } split /\n/, $out;
}

# ------------------------------------------------------------ valid

# nginx -t does not need redis (nothing listens on 6399)
good('the base configuration');
good('every parameter',
     F => '    deepseek_guard_fleet redis=127.0.0.1:6399 password=s3cr3t '
        . 'prefix=dsg-test interval=250ms nodes=5 node=edge-1;');
good('interval=10ms (the least)',
     F => '    deepseek_guard_fleet redis=127.0.0.1:6399 interval=10ms nodes=3;');
good('interval=1s', F => '    deepseek_guard_fleet redis=127.0.0.1:6399 interval=1s;');
good('nodes=1', F => '    deepseek_guard_fleet redis=127.0.0.1:6399 nodes=1;');
good('no fleet zone but the fleet directive',
     Z => '    deepseek_guard_zone q:1m key=$http_authorization rate=600r/m '
        . 'status=429;',
     F => "$fleet\n");
# fleet=off (and no fleet=on anywhere) needs no deepseek_guard_fleet
{
    my $c = conf(F => '',
                 Z => '    deepseek_guard_zone q:1m key=$http_authorization '
                    . 'rate=600r/m status=429 fleet=off;');
    $c =~ s/ fleet=on;/;/g;
    $t->write_config($c);
    my ($ok, $out) = $t->test_config;
    ok($ok, 'fleet=off and local zones without deepseek_guard_fleet: nginx -t passes')
        or diag $out;
}

# ------------------------------------------------------------ errors

bad('fleet=on without deepseek_guard_fleet',
    qr/deepseek_guard_zone "q" is fleet=on but there is no deepseek_guard_fleet/,
    [qr/zone q:1m .*fleet=on/, qr/zone b:1m .*fleet=on/], F => '');

bad('fleet=maybe', qr/invalid parameter "fleet=maybe"/, qr/fleet=maybe/,
    Z => '    deepseek_guard_zone q:1m key=$http_authorization rate=600r/m '
       . 'fleet=maybe;');

bad('redis= port out of range', qr/invalid redis address "127\.0\.0\.1:99999"/, qr/redis=127\.0\.0\.1:99999/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:99999;');
bad('redis= port not a number', qr/invalid redis address "127\.0\.0\.1:abc"/, qr/redis=127\.0\.0\.1:abc/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:abc;');
bad('redis= empty', qr/invalid redis address ""/, qr/deepseek_guard_fleet redis= /,
    F => '    deepseek_guard_fleet redis= interval=100ms;');
bad('no redis=', qr/"redis=" is required/, qr/deepseek_guard_fleet interval=100ms nodes=3;/,
    F => '    deepseek_guard_fleet interval=100ms nodes=3;');

bad('interval=5ms (below 10ms)', qr/invalid interval "5ms"/, qr/interval=5ms/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 interval=5ms;');
bad('interval=9ms (below 10ms)', qr/invalid interval "9ms"/, qr/interval=9ms/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 interval=9ms;');
bad('interval=0', qr/invalid interval "0"/, qr/interval=0;/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 interval=0;');
bad('interval=abc', qr/invalid interval "abc"/, qr/interval=abc/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 interval=abc;');

bad('nodes=0', qr/invalid nodes "nodes=0"/, qr/nodes=0/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 nodes=0;');
bad('nodes=abc', qr/invalid nodes "nodes=abc"/, qr/nodes=abc/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 nodes=abc;');
bad('nodes=-1', qr/invalid nodes "nodes=-1"/, qr/nodes=-1/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 nodes=-1;');

bad('unknown parameter', qr/invalid parameter "foo=bar"/, qr/foo=bar/,
    F => '    deepseek_guard_fleet redis=127.0.0.1:6399 foo=bar;');

bad('deepseek_guard_fleet twice', qr/"deepseek_guard_fleet" directive is duplicate/,
    qr/redis=127\.0\.0\.1:6400/,
    F => "$fleet\n    deepseek_guard_fleet redis=127.0.0.1:6400;");

bad('deepseek_guard_fleet in server{}', qr/"deepseek_guard_fleet" directive is not allowed here/,
    qr/redis=127\.0\.0\.1:6401/,
    S => '        deepseek_guard_fleet redis=127.0.0.1:6401;');

# ------------------------------------------------------------ live

unless (DSG::Test::have_redis()) {
    diag('redis-server and redis-cli are needed for the rest (apt-get '
         . 'install redis-server)');
    $t->done;
    exit;
}

my $rport = $t->redis_start;
$t->html_files(qw(q l b));
$t->write_config(conf(F => '    deepseek_guard_fleet redis=%%REDIS%% '
                         . 'prefix=tst interval=100ms nodes=3 node=%%NODE%%;'));
$t->start;

ok($t->wait_until(sub { ($t->metric('deepseek_guard_fleet_up') // 0) == 1 }, 10),
   'live: fleet_up 1');

# three API keys on the fleet quota, one on the local zone
for my $k (qw(k1 k2 k3)) {
    is($t->get('/q', Authorization => "Bearer $k")->{status}, 200, "live: /q $k: 200");
}
is($t->get('/l', Authorization => 'Bearer k1')->{status}, 200, 'live: /l: 200');
is($t->get('/b')->{status}, 200, 'live: /b (the fleet in-flight zone): 200');

my @keys;
ok($t->wait_until(sub {
    @keys = sort grep { length } split /\n/,
        $t->redis_cli('--scan', '--pattern', 'tst:q:*');
    @keys == 3;
}, 3), 'live: redis has the 3 keys of zone q') or diag $t->redis_cli('--scan');
is(scalar(grep { /^tst:q:[0-9a-f]+$/ } @keys), 3, '... named tst:q:<hex>')
    or diag "@keys";
is(scalar(grep { $t->redis_cli('TYPE', $_) eq 'hash' } @keys), 3, '... hashes');
ok($t->wait_until(sub {
    grep { length } split /\n/, $t->redis_cli('--scan', '--pattern', 'tst:b:*')
}, 3), '... and the key of the in-flight zone b');
is($t->redis_cli('--scan', '--pattern', 'tst:local:*'), '',
   '... none of the local zone');
is($t->redis_cli('--scan', '--pattern', 'dsg:*'), '',
   '... nothing under the default prefix');

# the families, each with a series: the fleet's own labelled with the
# redis address, the zones' with the zone
my $m = $t->scrape;
my %f;
for my $f (qw(up fallbacks_total syncs_total errors_total commands_total
              sync_seconds_sum sync_seconds_count)) {
    my $k = "deepseek_guard_fleet_$f\{redis=\"127.0.0.1:$rport\"}";
    ok(defined $m->{$k}, "live: $k")
        or diag join "\n", grep { /fleet/ } sort keys %$m;
    $f{$f} = $m->{$k};
}
for my $f (qw(share_requests share_slots demand_requests keys)) {
    for my $z (qw(q b)) {
        ok(defined $m->{"deepseek_guard_fleet_$f\{zone=\"$z\"}"},
           "live: deepseek_guard_fleet_$f\{zone=\"$z\"}");
    }
}
is(scalar(grep { /^deepseek_guard_fleet_\w+\{zone="local"\}/ } keys %$m), 0,
   '... no fleet series of the local zone');
is($f{up}, 1, '... up is 1');
is($f{fallbacks_total}, 0, '... no fallback');
is($f{errors_total}, 0, '... no error');
cmp_ok($f{syncs_total} // 0, '>', 0, '... syncs counted');
cmp_ok($f{commands_total} // 0, '>', 0, '... commands counted');
cmp_ok($f{sync_seconds_count} // 0, '>', 0, '... sync time counted');
cmp_ok(($f{sync_seconds_sum} // 1e9) / ($f{sync_seconds_count} || 1), '<', 0.1,
       '... a sync takes less than an interval on average');
# keys synced in the last sync: the 3 keys in use all the time
my $kmax = 0;
my $kok = $t->wait_until(sub {
    $t->parallel([map { { uri => '/q', headers => [Authorization => "Bearer $_"] } }
                  qw(k1 k2 k3)]);
    my $k = $t->metric('deepseek_guard_fleet_keys', 'q') // 0;
    $kmax = $k if $k > $kmax;
    $k >= 3;
}, 3, 0.02);
ok($kok, "... deepseek_guard_fleet_keys{zone=\"q\"}: the 3 keys in use are synced ($kmax)");
my $s0 = $f{syncs_total} // 0;
ok($t->wait_until(sub { ($t->metric('deepseek_guard_fleet_syncs_total') // 0) > $s0 + 2 }, 3),
   '... syncs_total grows');

# one agent per instance: one worker holds one connection to redis
sub redis_conns {
    return map { [$_, (DSG::Test::tcp_conns($_, $rport, 0))[0]] } $t->worker_pids;
}
my @c = redis_conns();
is(scalar(grep { $_->[1] == 1 } @c), 1, 'live: one worker has a redis connection')
    or diag explain \@c;
is(scalar(grep { $_->[1] > 1 } @c), 0, '... just one')
    or diag explain \@c;

# a reload: the new generation's agent takes over, the old one lets go
ok($t->reload, 'reload');
ok($t->wait_until(sub {
    my @c = redis_conns();
    (grep { $_->[1] == 1 } @c) == 1 && !(grep { $_->[1] > 1 } @c)
        && ($t->metric('deepseek_guard_fleet_up') // 0) == 1
}, 5), '... one agent connection again, fleet_up 1');
ok($t->wait_until(sub {
    my $n = () = grep { !/cmd=client/ } split /\n/, $t->redis_cli('CLIENT', 'LIST');
    $n == 1;
}, 5), '... redis sees one client besides redis-cli')
    or diag $t->redis_cli('CLIENT', 'LIST');
is($t->get('/q', Authorization => 'Bearer k4')->{status}, 200, '... and serves');

# turning fleet= off for a running zone is refused at reload: the old
# workers keep serving with the fleet
{
    my @before = sort { $a <=> $b } $t->worker_pids;
    my $c = conf(F => '    deepseek_guard_fleet redis=%%REDIS%% '
                    . 'prefix=tst interval=100ms nodes=3 node=%%NODE%%;',
                 Z => '    deepseek_guard_zone q:1m key=$http_authorization '
                    . 'rate=600r/m status=429 fleet=off;');
    $t->write_config($c);
    $t->allow_log(qr/\[emerg\].*deepseek_guard_zone "q"/);
    my $off = $t->error_log_size;
    ok(!$t->reload, 'reload turning fleet=off for zone q: refused');
    my @e = $t->error_log_since($off, qr/\[emerg\]/);
    like($e[0] // '', qr/deepseek_guard_zone "q".*fleet/, '... the [emerg] says why')
        or diag join "\n", @e;
    is_deeply([sort { $a <=> $b } $t->worker_pids], \@before,
              '... the old workers still run');
    is($t->metric('deepseek_guard_fleet_up'), 1, '... synced');
}

$t->done;
