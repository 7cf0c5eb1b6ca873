#!/usr/bin/perl
# Token settlement across a reload and a kill -9 (2 workers):
#
#   - a stream admitted before a reload that changes the zone's
#     tokens_output ends on the old worker after it: it is settled by its
#     lease's own record, at the upstream's usage, and for the key
#     reserved - refunded + charged = used = what the mock counted;
#   - a stream whose worker is killed mid-stream: the reaper frees its
#     lease, and its reservation stays charged as reserved (nobody can say
#     what it used): the counters keep it outstanding, the key's bucket
#     does not get it back (x-ratelimit-remaining-tokens), and the next
#     requests are served and settled as usual.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);
$t->allow_log(qr/worker process \d+ exited on signal 9/);
$t->allow_log(qr/shared memory zone "tpm" was locked by \d+/);

my $mport = $t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 20);

my $conf = <<'EOF2';
    deepseek_guard_zone tpm:1m key=$http_authorization tokens=600/m
                        tokens_output=%%OUT%% status=429;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        listen 127.0.0.1:%%PORT_1%%;
        proxy_http_version 1.1;
        proxy_buffering off;

        location /v1/ {
            deepseek_guard tpm;
            deepseek_guard_openai_headers on;
            proxy_pass http://%%MOCK%%;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
EOF2
(my $c1 = $conf) =~ s/%%OUT%%/200/;
(my $c2 = $conf) =~ s/%%OUT%%/100/;
$t->write_config($c1);
$t->start;
my $P1 = $t->port(1);

sub tok {
    my ($m, $kind) = @_;
    return $m->{"deepseek_guard_tokens_total{zone=\"tpm\",class=\"default\",kind=\"$kind\"}"} // 0;
}
sub counters {
    my $m = $t->scrape($P1) or return {};
    return { map { $_ => tok($m, $_) } qw(reserved refunded charged used) };
}
sub stream_req {
    my ($key, $ms, $port) = @_;
    return $t->chat_req(key => $key, content => "a slow stream for $key",
                        stream => 1, port => $port // $P1, timeout => 30,
                        extra => { stream_options => { include_usage => JSON::PP::true } },
                        headers => { 'X-Mock-Token-Ms' => $ms });
}

# ------------------------------------------------------------ reload

my $bg = $t->bg_parallel([stream_req('reload', 100)], timeout => 40);
ok($t->wait_until(sub { $t->mock_stats->{inflight} == 1 }, 10),
   'a 2 s stream is in flight');
my $during = counters();
$t->write_config($c2);
$t->reload;
my $r = $t->bg_wait($bg)->[0];
is($r->{status}, 200, '... it ends after the reload, on the old worker');
ok($t->wait_until(sub {
    my $c = counters();
    $c->{used} && $c->{reserved} - $c->{refunded} + $c->{charged} == $c->{used};
}, 10), '... settled: reserved - refunded + charged = used');
my $after = counters();
my $mk = $t->mock_stats->{tokens_by_key}{'Bearer reload'} || {};
is($after->{used}, ($mk->{prompt} // 0) + ($mk->{completion} // 0),
   "... used = the mock's usage ($after->{used})");
cmp_ok($during->{reserved}, '>', 200, "... its reservation ($during->{reserved}) "
       . 'had the old tokens_output of 200 in it');

# outstanding: reserved - refunded + charged - used.  A request is settled
# in its cleanup, just after its client has the answer: wait for that.
sub outstanding {
    my $c = counters();
    return ($c->{reserved} // 0) - ($c->{refunded} // 0)
           + ($c->{charged} // 0) - ($c->{used} // 0);
}

# ------------------------------------------------------------ kill -9

my $c0 = counters();
my ($kbg, $victim) = $t->place(stream_req('killed', 500, $t->port),
                               mock_port => $mport,
                               admitted => 1, timeout => 40);
my $c1_ = counters();
my $res_k = $c1_->{reserved} - $c0->{reserved};
cmp_ok($res_k, '>', 100, "a 10 s stream admitted on worker $victim reserved $res_k");
my $h0 = $t->chat(key => 'killed', content => 'x', max_tokens => 1, port => $P1)
         ->{headers}{'x-ratelimit-remaining-tokens'};
# that probe is settled in its cleanup, just after its answer: let it be,
# or a kill that lands first keeps its reservation too
$t->wait_until(sub { outstanding() == $res_k }, 5);
kill 'KILL', $victim;
my $t0 = time;
ok($t->wait_until(sub {
    my $m = $t->scrape($P1) or return 0;
    DSG::Test::zone_sum($m, 'deepseek_guard_inflight', 'tpm') == 0;
}, 5), 'the dead worker\'s lease is reaped');
$t->bg_wait($kbg);

my $out;
$t->wait_until(sub { ($out = outstanding()) == $res_k }, 5);
is($out, $res_k, "... its reservation stays outstanding: reserved - "
   . "refunded + charged - used = $res_k");
my $h1 = $t->chat(key => 'killed', content => 'x', max_tokens => 1, port => $P1)
         ->{headers}{'x-ratelimit-remaining-tokens'} // -1;
my $refill = 10 * (time - $t0 + 1);
cmp_ok($h1, '<=', $h0 + $refill + 10,
       "... and the key's bucket did not get it back (remaining $h0 before "
       . "the kill, $h1 after, refill at most $refill)");
$t->wait_until(sub { ($out = outstanding()) == $res_k }, 5);
is($out, $res_k, '... the requests after it are settled as usual');

$t->done;
