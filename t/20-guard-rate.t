#!/usr/bin/perl
# deepseek_guard rate limits: a per-key token bucket shared by all workers,
# exact burst, 1r/m, independent and empty keys, and the reserved share of
# a higher class.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# The API key is the zone key, as in a real gateway: "Bearer <key>" gives
# <key>, no Authorization header gives "" (not limited at all).  The access
# log records, per request, the worker's cached time ($msec: nginx updates
# it together with the millisecond clock the module's buckets run on, and
# for a static file it is logged in the same event as the decision), the
# worker that served it and the module's decision.
my $common = <<'EOF';
    map $http_authorization $api_key {
        "~^Bearer\s+(?<k>\S+)$"  $k;
        default                  "";
    }
    log_format guard '$msec $pid $status $deepseek_guard_status '
                     'k=$api_key c=$deepseek_guard_class $uri';
EOF

# reuseport gives each worker its own listening socket: the kernel spreads
# the connections over both workers, so every limit below is checked from
# two processes at once and only the shared-memory bucket can hold it.
$t->write_config($common . <<'EOF');
    deepseek_guard_zone rate:1m   key=$api_key rate=10r/s burst=5 status=429;
    deepseek_guard_zone minute:1m key=$api_key rate=1r/m status=429;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log guard;

        # static files: "return" would answer in the rewrite phase,
        # before the access phase where the guard runs
        root %%PREFIX%%/html;
        location /rate   { deepseek_guard rate; }
        location /minute { deepseek_guard minute; }
    }
EOF
mkdir $t->prefix . '/html';
for my $f (qw(rate minute tier)) {
    open(my $fh, '>', $t->prefix . "/html/$f") or die "$f: $!";
    print {$fh} "ok\n";
    close $fh;
}
$t->start;

# access log lines of one key and location, as hashes
sub entries {
    my ($key, $uri) = @_;
    my @e;
    for (split /\n/, $t->access_log) {
        my ($ms, $pid, $st, $gs, $k, $c, $u) = split ' ';
        next unless defined $u && $k eq "k=$key" && $u eq $uri;
        push @e, { ms => $ms, pid => $pid, status => $st, guard => $gs };
    }
    return @e;
}

sub count { my ($st, @r) = @_; scalar grep { $_->{status} == $st } @r }

my @workers = $t->worker_pids;
is(scalar @workers, 2, 'two workers');

# ------------------------------------------- rate and burst across workers

# 4 concurrent clients every 10 ms for 3 s, all with the same key: about
# 400 r/s against a 10r/s limit, the key is saturated all the time.
{
    my @reqs;
    for my $tick (0 .. 299) {
        push @reqs, map { { uri => '/rate', at_ms => $tick * 10,
                            headers => [Authorization => 'Bearer k-rate'] } }
                    1 .. 4;
    }
    my @res = $t->parallel(\@reqs, timeout => 30);
    is(scalar(grep { $_->{status} != 200 && $_->{status} != 429 } @res), 0,
       'saturated key: every answer is 200 or 429')
        or diag explain [map { $_->{error} || $_->{status} } @res[0 .. 9]];

    # the last lines are written just after their clients have the answer
    $t->wait_until(sub { entries('k-rate', '/rate') == @res }, 5);
    my @e = sort { $a->{ms} <=> $b->{ms} } entries('k-rate', '/rate');
    is(scalar @e, scalar @res, '... every request is in the access log');
    is(count(200, @e), count(200, @res), '... the log agrees with the client');

    # Both workers served the key and both admitted some of it: had each
    # worker its own bucket, the sum below would be about twice the limit.
    my %served = map { $_->{pid} => 1 } @e;
    my %admitted = map { $_->{pid} => 1 } grep { $_->{status} == 200 } @e;
    is(scalar keys %served, 2, '... requests were served by both workers');
    is(scalar keys %admitted, 2, '... and both workers admitted some');

    # The exact bound.  The bucket is created full when the key is first
    # seen (t0, the first log line): burst + 1 = 6 requests at once.  It
    # then gains one request every 100 ms (integer arithmetic, plus less
    # than 1 ms of slack), so by a time t at most 6 + floor(10 * (t - t0))
    # requests can have been admitted: an upper bound.  While clients keep
    # asking every few ms the bucket never overflows (that would need 600
    # ms without a request), so each token is taken as soon as it exists:
    # at the last rejection (tl) no whole token was left, so exactly
    # 6 + floor(10 * (tl - t0)) requests were admitted by then.  Hence
    # rate * elapsed + burst + 1, within 1 (the floor, and the 1 ms ticks
    # of two workers' cached clocks).  Counting only up to the last 429
    # keeps a slow client at the very end (a late request that finds
    # saved-up tokens) from breaking the lower bound.
    my ($last429) = grep { $_->{status} == 429 } reverse @e;
    $last429 ||= $e[-1];    # no 429 at all: not limited, fails below
    my $t0 = $e[0]{ms};
    my $elapsed = $last429->{ms} - $t0;
    my $admitted = grep { $_->{status} == 200 && $_->{ms} <= $last429->{ms} } @e;
    my $want = 10 * $elapsed + 5 + 1;
    my $maxgap = 0;
    for my $i (1 .. $#e) {
        my $g = $e[$i]{ms} - $e[$i - 1]{ms};
        $maxgap = $g if $g > $maxgap;
    }
    cmp_ok($elapsed, '>', 2.5, '... the load lasted about 3 s')
        or diag "elapsed $elapsed s";
    ok(abs($admitted - $want) <= 1,
       sprintf('... admitted %d in %.3f s: rate * elapsed + burst + 1 = %.2f'
               . ' (within 1)', $admitted, $elapsed, $want))
        or diag "max gap between requests ${maxgap} s";
    cmp_ok(count(200, @e), '<=', 10 * ($e[-1]{ms} - $t0) + 6 + 1,
           '... never more than the bucket allows up to the last request');
    is(scalar(grep { $_->{guard} eq 'REJECTED' } grep { $_->{status} == 429 } @e),
       count(429, @e), '... each 429 logged as REJECTED');
}

# ------------------------------------------------------------------ 1r/m

# 20 requests over 3 s from one key, spread over both workers: the
# first takes the only token, the next one would come 60 s later.
{
    my @res = $t->parallel([map { { uri => '/minute', at_ms => $_ * 150,
                                    headers => [Authorization => 'Bearer k-min'] } }
                            0 .. 19], timeout => 20);
    is(count(200, @res), 1, '1r/m: 20 requests in 3 s, exactly one 200');
    is(count(429, @res), 19, '... the other 19 get 429');
    is($res[0]{status}, 200, '... the first one is the admitted one');
    my %pids = map { $_->{pid} => 1 } entries('k-min', '/minute');
    is(scalar keys %pids, 2, '... requests went to both workers');
}

# ------------------------------------------------- independent and empty keys

# Another key has its own full bucket: k-min being exhausted (and k-rate
# too) does not affect it.
{
    my @res = $t->parallel([map { { uri => '/minute',
                                    headers => [Authorization => 'Bearer k-other'] } }
                            1 .. 5]);
    is(count(200, @res), 1, 'another key: its own token, one 200');
    is(count(429, @res), 4, '... then its own 429s');
    is($t->get('/minute', Authorization => 'Bearer k-third')->{status}, 200,
       'a third key: 200');
    is($t->get('/minute', Authorization => 'Bearer k-min')->{status}, 429,
       'k-min is still limited');
}

# An empty key is not limited by the zone: requests without an API key
# (another layer authenticates them) all pass, on both limits.
{
    my @res = $t->parallel([(map { { uri => '/minute' } } 1 .. 20),
                            (map { { uri => '/rate' } } 1 .. 30)]);
    is(count(200, @res), 50, 'empty key: 50 requests, all 200');
    $t->wait_until(sub {
        entries('', '/minute') + entries('', '/rate') == 50 }, 5);
    my @e = (entries('', '/minute'), entries('', '/rate'));
    is(scalar(grep { $_->{guard} ne 'REJECTED' } @e), 50,
       '... none rejected in the log');
}

# ------------------------------------------------- reserved share on rate

# Classes are global to http{}: a second configuration.  critical reserves
# 20% of every zone: normal (and anything below) may use 80% of it.  The
# zone allows 10 requests at once (burst=9) per tenant: normal gets 8 of
# them, critical the 2 left and, on a fresh tenant, all 10.  A rate per
# minute keeps the next token 6 s (critical) / 7.5 s (normal) away, so the
# counts below are exact however slowly a loaded machine runs them; the
# arithmetic of the shares is the same as with r/s.
$t->stop;
unlink $t->access_log_file;
$t->write_config($common . <<'EOF');
    deepseek_guard_class critical reserve=20%;
    deepseek_guard_class normal;

    map $api_key $dsg_class {
        k-crit   critical;
        default  normal;
    }

    deepseek_guard_zone tenant:1m key=$http_x_tenant rate=10r/m burst=9
                        status=429;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log guard;

        root %%PREFIX%%/html;

        location /tier {
            deepseek_guard tenant;
            deepseek_guard_classify $dsg_class default=normal;
        }
    }
EOF
$t->start;

{
    my %normal = (uri => '/tier', headers => ['X-Tenant' => 'A',
                                              Authorization => 'Bearer k-norm']);
    my %crit = (uri => '/tier', headers => ['X-Tenant' => 'A',
                                            Authorization => 'Bearer k-crit']);

    # 20 normal requests at t = 0: 80% of burst + 1 = 8 pass
    my @res = $t->parallel([map { {%normal} } 1 .. 20]);
    is(count(200, @res), 8,
       'reserve 20%: 20 normal requests at once, 8 admitted');
    is(count(429, @res), 12, '... 12 rejected');

    # the reserve is still there for critical: exactly the 2 left
    @res = $t->parallel([map { {%crit} } 1 .. 5]);
    is(count(200, @res), 2, '... critical still gets the remaining 2');
    is(count(429, @res), 3, '... and no more');

    is($t->http(%normal)->{status}, 429, '... normal is still rejected');

    my @e = entries('k-crit', '/tier');
    is(scalar(grep { $_->{guard} eq 'ADMITTED' } @e), 2,
       '... logged as ADMITTED');
    like($t->access_log, qr/ 200 ADMITTED k=k-crit c=critical /,
         '... in class critical');

    # critical may use 100%: on a fresh tenant all 10 pass
    @res = $t->parallel([map { { uri => '/tier',
                                 headers => ['X-Tenant' => 'B',
                                             Authorization => 'Bearer k-crit'] } }
                         1 .. 15]);
    is(count(200, @res), 10, 'critical alone: burst + 1 = 10 admitted');
    is(count(429, @res), 5, '... 5 rejected');
}

$t->done;
