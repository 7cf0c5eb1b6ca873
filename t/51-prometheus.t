#!/usr/bin/perl
# The module's metrics in a real Prometheus: Debian's /usr/bin/prometheus
# runs with the example scrape configuration (examples/prometheus/
# prometheus.yml, templated to this test's port, 1 s intervals) and the
# example alert rules, scrapes the deepseek_guard_metrics location, and a
# module counter is read back through /api/v1/query, then follows new
# traffic; the 5xx ratio rule goes pending on real upstream 503s.  The
# rules also pass `promtool check rules` and their unit tests
# (`promtool test rules examples/prometheus/alerts_test.yml`).

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use File::Copy qw(copy);
use POSIX qw(WNOHANG);
use Time::HiRes qw(sleep time);

my $PROMETHEUS = '/usr/bin/prometheus';
my $PROMTOOL   = '/usr/bin/promtool';
plan skip_all => "$PROMETHEUS or $PROMTOOL not installed (apt-get install "
               . "prometheus)" unless -x $PROMETHEUS && -x $PROMTOOL;

my $t = DSG::Test->new(workers => 2);
my $ex = $t->repo . '/examples/prometheus';

# ------------------------------------------------------------ promtool

{
    my $out = `$PROMTOOL check rules $ex/alerts.yml 2>&1`;
    is($?, 0, 'promtool check rules examples/prometheus/alerts.yml')
        or diag $out;
    like($out, qr/SUCCESS: 5 rules found/, '... 5 rules');

    $out = `cd $ex/../.. && $PROMTOOL test rules examples/prometheus/alerts_test.yml 2>&1`;
    is($?, 0, 'promtool test rules examples/prometheus/alerts_test.yml')
        or diag $out;
    like($out, qr/SUCCESS/, '... the 5xx alert fires above 5% for 2m, '
                            . 'not below, not on a short burst');
}

# ------------------------------------------------------------ gateway

$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);
$t->write_config(<<'EOF');
    deepseek_guard_class normal queue=8;
    deepseek_guard_zone backend:1m key=backend inflight=8;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;

        location /v1/ {
            deepseek_guard backend;
            proxy_pass http://%%MOCK%%;
        }

        location = /metrics {
            deepseek_guard_metrics;
            allow 127.0.0.1;
            deny all;
        }
    }
EOF
$t->start;

is(scalar(grep { $t->chat(content => "p$_")->{status} == 200 } 1 .. 7), 7,
   '7 chats answered before Prometheus starts');

# ------------------------------------------------------------ Prometheus

# the example configuration, pointed at this nginx and scraping every
# second; its rule file beside it, as in examples/prometheus/
my $dir = $t->prefix . '/prom';
mkdir $dir or die "$dir: $!";
my $yml = do {
    open(my $fh, '<', "$ex/prometheus.yml") or die "prometheus.yml: $!";
    local $/;
    <$fh>;
};
my $port = $t->port;
ok($yml =~ s/'127\.0\.0\.1:8080'/'127.0.0.1:$port'/g,
   'the example scrapes 127.0.0.1:8080: templated to the test port');
ok($yml =~ s/scrape_interval: \d+s/scrape_interval: 1s/,
   '... scrape_interval: 1s');
$yml =~ s/evaluation_interval: \d+s/evaluation_interval: 1s/;
like($yml, qr{metrics_path: /metrics}, '... metrics_path /metrics');
{
    open(my $fh, '>', "$dir/prometheus.yml") or die $!;
    print {$fh} $yml;
    close $fh;
}
copy("$ex/alerts.yml", "$dir/alerts.yml") or die "copy: $!";

my $pport = $t->port(1);
my $plog = $t->prefix . '/logs/prometheus.log';
my $ppid = fork();
die "fork: $!" unless defined $ppid;
if (!$ppid) {
    open(STDIN, '<', '/dev/null');
    open(STDOUT, '>>', $plog) or POSIX::_exit(126);
    open(STDERR, '>&', \*STDOUT) or POSIX::_exit(126);
    exec($PROMETHEUS, "--config.file=$dir/prometheus.yml",
         "--storage.tsdb.path=$dir/data",
         "--web.listen-address=127.0.0.1:$pport")
        or POSIX::_exit(127);
}

sub prom_stop {
    return unless $ppid;
    kill 'TERM', $ppid;
    my $deadline = time() + 10;
    while (time() < $deadline) {
        if (waitpid($ppid, WNOHANG) == $ppid) {
            undef $ppid;
            return 1;
        }
        sleep 0.05;
    }
    kill 'KILL', $ppid;
    waitpid($ppid, 0);
    undef $ppid;
    return 0;
}
END { local $?; prom_stop() if $ppid }

sub uri_escape {
    my ($s) = @_;
    $s =~ s/([^A-Za-z0-9_.~-])/sprintf('%%%02X', ord $1)/ge;
    return $s;
}

# GET an API path of Prometheus, decoded, or undef
sub api {
    my ($path) = @_;
    my $r = $t->http(port => $pport, uri => $path, timeout => 5);
    return undef unless $r->{status} == 200;
    my $d = DSG::Test::json_decode($r->{body});
    return $d && $d->{status} eq 'success' ? $d->{data} : undef;
}

# the value of an instant query with exactly one result, or undef
sub query {
    my ($q) = @_;
    my $d = api('/api/v1/query?query=' . uri_escape($q)) or return undef;
    my $res = $d->{result} || [];
    return @$res == 1 ? $res->[0]{value}[1] : undef;
}

my $ready = $t->wait_until(sub {
    my $r = $t->http(port => $pport, uri => '/-/ready', timeout => 2);
    $r->{status} == 200 }, 30, 0.2);
ok($ready, 'Prometheus is ready') or diag `tail -20 $plog`;

my $admitted = 'deepseek_guard_requests_total{job="deepseek_guard",'
             . 'zone="backend",class="normal",decision="admitted"}';
my $v;
$t->wait_until(sub { $v = query($admitted); defined $v && $v == 7 }, 30, 0.2);
is($v, 7, 'a module counter read back through /api/v1/query: 7 admitted')
    or diag `tail -20 $plog`;
is(query('up{job="deepseek_guard"}'), 1, 'the target is up');
is(query('deepseek_guard_zone_inflight_limit{zone="backend"}'), 8,
   'a gauge: zone_inflight_limit');
is(query('deepseek_guard_queue_wait_seconds_count{zone="backend",'
         . 'class="normal"}'), 0, 'the histogram is ingested');

{
    my $d = api('/api/v1/targets');
    my ($tg) = grep { $_->{labels}{job} eq 'deepseek_guard' }
               @{ $d->{activeTargets} || [] };
    is($tg && $tg->{health}, 'up', 'target health up')
        or diag explain $tg;
    is($tg && $tg->{lastError}, '', '... no scrape error');
    is($tg && $tg->{labels}{gateway}, 'example',
       '... with the example\'s static labels');
}

# new traffic shows up at the next scrapes
$t->chat(content => "q$_") for 1 .. 3;
$t->wait_until(sub { $v = query($admitted); defined $v && $v == 10 }, 15,
               0.2);
is($v, 10, '3 more chats: Prometheus follows, 10 admitted');

# the alert rules are loaded and evaluated; upstream 503s push the 5xx
# ratio over 5%: the alert goes pending (it would fire after 2 minutes)
{
    my $d = api('/api/v1/rules');
    my @rules = map { @{ $_->{rules} } } @{ $d->{groups} || [] };
    is(scalar(grep { $_->{type} eq 'alerting' } @rules), 5,
       'the 5 example alert rules are loaded');

    is(scalar(grep { $t->chat(content => "busy $_",
                              headers => ['X-Mock-Status' => 503])
                         ->{status} == 503 } 1 .. 5), 5,
       '5 upstream 503s');

    my $pending;
    $t->wait_until(sub {
        $pending = query('ALERTS{alertname="DeepseekGuardHigh5xxRatio",'
                         . 'zone="backend",alertstate="pending"}');
        defined $pending }, 20, 0.2);
    is($pending, 1, 'DeepseekGuardHigh5xxRatio is pending for zone backend');

    my $ratio = query('sum by (zone) (rate(deepseek_guard_responses_total'
                      . '{code="5xx"}[2m])) / sum by (zone) '
                      . '(rate(deepseek_guard_responses_total[2m]))');
    ok(defined $ratio && $ratio > 0.05,
       '... the 5xx ratio in Prometheus is over 5%: ' . ($ratio // 'none'));

    @rules = map { @{ $_->{rules} } } @{ api('/api/v1/rules')->{groups} };
    my @bad = map { "$_->{name}: $_->{lastError}" }
              grep { $_->{health} ne 'ok' } @rules;
    is("@bad", '', 'every rule evaluates without error');
}

ok(prom_stop(), 'Prometheus stopped with SIGTERM');

$t->done;
