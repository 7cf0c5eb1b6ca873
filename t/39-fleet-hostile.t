#!/usr/bin/perl
# Fleet zones pointed at a redis that does not work: a wrong password, no
# password where one is required, a port where nothing listens, a server
# that is no redis (an HTTP server, one that answers garbage, one that
# never answers), and a real redis that answers errors (OOM: maxmemory
# reached; WRONGTYPE: a zone's key overwritten with a string).  In each
# case, on one nginx instance with 2 workers (nodes=3 in its config):
#
#   * one clear [error] line, "deepseek_guard: fleet: redis <addr>:
#     <reason>; fleet zones fall back to their static share", naming the
#     cause, and no more of them while the agent keeps trying;
#   * deepseek_guard_fleet_up 0, and requests still served at the static
#     share: the quota zone's 600r/m burst=29 as 200r/m burst=9 (10 of 20
#     at once), inflight=6 as 2 at the mock;
#   * the event loop is not blocked: requests stay fast (interval=300ms: a
#     worker waiting for redis would hold requests for up to 300 ms);
#   * no worker crashes ("exited on signal" fails check_log; the worker
#     pids are the same at the end).
# The error replies of a real redis are then healed: fleet_up 1 again and
# one "answers again" [notice].

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Time::HiRes qw(time);

plan skip_all => 'redis-server and redis-cli are needed (apt-get install '
               . 'redis-server)' unless DSG::Test::have_redis();

my $INT = 0.3;

# the base instance runs no nginx: it owns the mock and a plain redis; a
# second one owns a redis that requires a password
my $base = DSG::Test->new(name => 'base');
my $mport = $base->mock_start(capacity => 0, first_token_ms => 0,
                              token_ms => 0, tokens => 1);
my $rport = $base->redis_start;
my $pw = DSG::Test->new(name => 'pw');
my $pwport = $pw->redis_start(password => 'right-secret');

my $conf = <<'EOF';
    deepseek_guard_fleet redis=__REDIS__ __EXTRA__ interval=300ms nodes=3
                         node=hostile prefix=__PREFIX__;

    deepseek_guard_class normal queue=16 queue_timeout=10s;

    deepseek_guard_zone fast:1m key=$http_authorization rate=6000r/m
                        burst=200 status=429 fleet=on;
    deepseek_guard_zone quota:1m key=$http_authorization rate=600r/m
                        burst=29 status=429 fleet=on;
    deepseek_guard_zone backend:1m key=all inflight=6 status=503 fleet=on;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        root %%PREFIX%%/html;

        location /fast { deepseek_guard fast; }
        location /q    { deepseek_guard quota; }

        location /v1/ {
            deepseek_guard backend;
            proxy_pass http://%%MOCK%%;
            proxy_http_version 1.1;
            proxy_read_timeout 30s;
        }

        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
        }
    }
EOF

sub count { my ($st, @r) = @_; scalar grep { ($_->{status} // 0) == $st } @r }

sub pct {
    my ($p, @v) = @_;
    @v = sort { $a <=> $b } @v;
    return 0 unless @v;
    my $i = int($p / 100 * @v + 0.5) - 1;
    return $v[$i < 0 ? 0 : $i > $#v ? $#v : $i];
}

# a started instance named $label pointed at redis $addr, with $extra
# fleet parameters
sub node {
    my ($label, $addr, $extra) = @_;
    my $c = DSG::Test->new(workers => 2, name => $label);
    $c->share_from($base);
    $c->html_files(qw(fast q));
    (my $cf = $conf) =~ s/__REDIS__/$addr/;
    $cf =~ s/__EXTRA__/$extra \/\/ ''/e;
    (my $prefix = $label) =~ s/\W/_/g;
    $cf =~ s/__PREFIX__/$prefix/;
    $c->write_config($cf);
    $c->start;
    return $c;
}

sub up { $_[0]->metric('deepseek_guard_fleet_up') // -1 }

# what every case checks once the instance $c is in fallback because of
# redis $addr; $why: a regexp the logged reason must match
sub in_fallback {
    my ($label, $c, $addr, $why, $off) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    # nginx appends the errno, when there is one, after the message
    my $fb = qr/\[error\] .*deepseek_guard: fleet: redis \Q$addr\E: (.+); fleet zones fall back to their static share(.*)/;
    my $t0 = time();
    ok($c->wait_until(sub { up($c) == 0 }, 5, 0.02),
       sprintf("$label: fleet_up 0 (after %.0f ms)", 1000 * (time() - $t0)));
    is($c->metric('deepseek_guard_fleet_up'), 0, "$label: ... and stays 0");

    # let the agent fail a few more times: still one line
    my $e0 = $c->metric('deepseek_guard_fleet_errors_total') // 0;
    $c->wait_until(sub {
        ($c->metric('deepseek_guard_fleet_errors_total') // 0) >= $e0 + 3 }, 3);

    # the static share of the quota: 200r/m burst=9, a fresh key
    my @res = $c->parallel([map { { uri => '/q', timeout => 10,
                                    headers => [Authorization => "Bearer q-$label"] } }
                            1 .. 20], timeout => 20);
    my ($s) = sort { $a <=> $b } map { $_->{start} } @res;
    my ($e) = sort { $b <=> $a } map { $_->{end} } @res;
    my $ok = count(200, @res);
    ok($ok >= 10 && $ok <= 10 + int(($e - $s) / 0.3) && $ok + count(429, @res) == 20,
       "$label: the quota's static share: 10 of 20 at once ($ok)");

    # the static share of inflight=6: 2
    $c->settle("$label: before the in-flight share");
    $c->mock_reset;
    @res = $c->parallel([map { $c->chat_req(stream => 0, timeout => 20,
                                   headers => { 'X-Mock-Delay-Ms' => 400 }) }
                         1 .. 6], timeout => 30);
    is(count(200, @res), 6, "$label: 6 slow requests served");
    is($c->mock_stats->{max_inflight}, 2,
       "$label: ... 2 at a time: the static share of inflight=6");

    # the event loop is not blocked by the agent: 40 requests over 1.2 s
    @res = $c->parallel([map { { uri => '/fast', at_ms => $_ * 30, timeout => 5,
                                 headers => [Authorization => 'Bearer probe'] } }
                         0 .. 39], timeout => 20);
    my @ms = map { 1000 * ($_->{end} - $_->{start}) } @res;
    my ($max) = sort { $b <=> $a } @ms;
    is(count(200, @res), 40, "$label: requests served")
        or diag join ' ', 'statuses:', map { $_->{status} || $_->{error} } @res;
    cmp_ok($max, '<', 1000 * $INT / 2,
           sprintf("$label: ... fast: max %.1f ms, median %.2f ms (the "
                   . "interval is %d ms)", $max, pct(50, @ms), 1000 * $INT));

    my @l = $c->error_log_since($off, $fb);
    is(scalar @l, 1, "$label: one fallback [error] line")
        or diag join "\n", $c->error_log_since($off, qr/fleet/);
    my ($reason, $errno) = ($l[0] // '') =~ $fb;
    $reason //= '';
    like("$reason$errno", $why, "$label: ... that says why: $reason$errno");
    # "protocol error: <what the codec says>", not "protocol error: "
    ok($reason =~ /\A[[:print:]]+\z/ && $reason !~ /:\s*\z/,
       "$label: ... its detail is printable text, not empty")
        or diag 'the reason logged, bytes: '
                . join(' ', map { sprintf '%02x', ord } split //, $reason);
    return $reason;
}

my @ALL;

# runs a whole case on a new instance: $addr, the fleet's extra
# parameters, the reason's regexp; inject => sub before the fallback,
# heal => sub after it
sub case {
    my ($label, $addr, $extra, $why, %o) = @_;
    my $c = node($label, $addr, $extra);
    push @ALL, $c;
    my @pids = sort { $a <=> $b } $c->worker_pids;
    my $off = 0;
    if ($o{inject}) {
        ok($c->wait_until(sub { up($c) == 1 }, 5, 0.02),
           "$label: synced before");
        $off = $c->error_log_size;
        $o{inject}->($c);
    }
    in_fallback($label, $c, $addr, $why, $off);
    if ($o{heal}) {
        $off = $c->error_log_size;
        $o{heal}->($c);
        ok($c->wait_until(sub { up($c) == 1 }, 5, 0.02),
           "$label: healed: fleet_up 1 again");
        is(scalar($c->error_log_since($off,
               qr/\[notice\] .*deepseek_guard: fleet: redis \Q$addr\E answers again/)),
           1, "$label: ... one \"answers again\" [notice]");
    }
    is_deeply([sort { $a <=> $b } $c->worker_pids], \@pids,
              "$label: the same workers all along (none crashed)");
    $c->check_log;
    return $c;
}

# ------------------------------------------------ the control case

{
    my $c = node('right-password', "127.0.0.1:$pwport", 'password=right-secret');
    ok($c->wait_until(sub { up($c) == 1 }, 5, 0.02),
       'the right password: fleet_up 1');
    is(scalar($c->error_log_since(0, qr/deepseek_guard: fleet:.*fall back/)), 0,
       '... no fallback logged');
    $c->check_log;
}

# ------------------------------------------------ authentication

case('wrong password', "127.0.0.1:$pwport", 'password=wrong-secret',
     qr/WRONGPASS|AUTH|passw/i);
case('no password', "127.0.0.1:$pwport", '', qr/NOAUTH|auth/i);

# ------------------------------------------------ nothing, or no redis

{
    my $free = DSG::Test::_free_port();
    case('nothing listens', "127.0.0.1:$free", '', qr/refused/i);
}

# the mock LLM: an HTTP server, answers a 400 page and closes
case('an HTTP server', "127.0.0.1:$mport", '',
     qr/protocol|unexpected|invalid|bad|reply|respon|clos/i);

{
    my $junk = $base->fake_server(name => 'junk',
                                  reply => "\x00\xff\x13garbage\r\nmore\r\n");
    case('a server answering garbage', "127.0.0.1:$junk", '',
         qr/protocol|unexpected|invalid|bad|reply|respon/i);
}

{
    my $silent = $base->fake_server(name => 'silent');
    case('a server that never answers', "127.0.0.1:$silent", '',
         qr/tim(?:ed)? ?out/i);
}

# ------------------------------------------------ redis answers errors

# maxmemory reached: every write of the fleet's script is refused (OOM);
# traffic gives the agent keys to sync
case('OOM', "127.0.0.1:$rport", '', qr/OOM/,
     inject => sub {
         my ($c) = @_;
         is($base->redis_cli('CONFIG', 'SET', 'maxmemory', '1'), 'OK',
            'OOM: CONFIG SET maxmemory 1');
         $c->parallel([map { { uri => '/fast', at_ms => 50 * $_,
                               headers => [Authorization => 'Bearer oom'] } }
                       0 .. 9]);
     },
     heal => sub {
         is($base->redis_cli('CONFIG', 'SET', 'maxmemory', '0'), 'OK',
            'OOM: CONFIG SET maxmemory 0');
     });

# a zone's key overwritten with a string: the script's hash commands get
# WRONGTYPE; the key is kept in use (a key idle for 20 intervals is no
# longer synced) until healed
{
    my $bg;
    my $label = 'WRONGTYPE';
    case($label, "127.0.0.1:$rport", '', qr/WRONGTYPE|wrong kind/i,
         inject => sub {
             my ($c) = @_;
             my @res = $c->parallel([map { { uri => '/q',
                 headers => [Authorization => 'Bearer wt'] } } 1 .. 3]);
             my @keys;
             $c->wait_until(sub {
                 @keys = grep { length } split /\n/,
                     $base->redis_cli('--scan', '--pattern', 'WRONGTYPE:quota:*');
             }, 3);
             is(scalar @keys, 1, 'WRONGTYPE: the zone\'s key is in redis')
                 or diag $base->redis_cli('--scan');
             $c->{wt_key} = $keys[0] // 'WRONGTYPE:quota:none';
             is($base->redis_cli('SET', $c->{wt_key}, 'not a hash'), 'OK',
                "WRONGTYPE: SET $c->{wt_key} to a string");
             # the key in use for 20 s (or until killed), 5 a second
             $bg = $c->bg_parallel([map { { uri => '/q', at_ms => 200 * $_,
                 timeout => 5, headers => [Authorization => 'Bearer wt'] } }
                 0 .. 99], timeout => 30);
         },
         heal => sub {
             my ($c) = @_;
             is($base->redis_cli('DEL', $c->{wt_key}), '1',
                'WRONGTYPE: DEL the string');
         });
    if ($bg) {
        kill 'KILL', $bg->{pid};
        waitpid($bg->{pid}, 0);
    }
}

$pw->check_log;
$base->done;
