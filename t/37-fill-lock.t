#!/usr/bin/perl
# The cache's fill lock and admission (issue 15).  A miss takes the entry's
# fill lock only once it is admitted: while the first miss waits in the
# admission queue, a second miss of the same entry queues for admission
# too (queue depth 2, where the lock taken before admission parked it
# outside the queue, depth 1), and the upstream still sees ONE request
# for the entry, whose answer both get.  A second miss admitted while the
# first fills gives its admission back and waits for it (COALESCED).
# deepseek_guard_cache_lock_timeout defaults to 5 s: waiters behind a
# filler whose upstream takes 9 s go upstream on their own after ~5 s (one
# takes the filler's expired lock over, the other times out behind that
# one: warn "lock timeout, going upstream"), not after the filler's 9 s.
#
# Placement: the in-flight slots of the zone are held by slow requests to
# an uncached location of the same zone, placed (admitted, in flight at
# the mock) before the cached requests are sent; the two cached requests
# are placed in different workers, one after the other.  A holder ends
# when the test kills its client (nginx drops the request, 499, and frees
# its slot), not on a timer.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Digest::SHA qw(sha256_hex);
use Time::HiRes qw(time sleep);

my $t = DSG::Test->new(workers => 2);
my $mport = $t->mock_start(capacity => 0, first_token_ms => 50,
                           token_ms => 0, tokens => 4);

# /one/: zone "one" (inflight=1), cached; /hold1/: the same zone, uncached
# /two/: zone "two" (inflight=2), cached; /hold2/: the same zone, uncached
# /slow/: cached, no zone; the default lock timeout (none is set here)
$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;
    deepseek_guard_class normal queue=16 queue_timeout=60s;
    deepseek_guard_zone one:1m key=global inflight=1;
    deepseek_guard_zone two:1m key=global inflight=2;
    log_format fl 'tag=$http_x_tag pid=$pid status=$status '
                  'cache=$deepseek_guard_cache_status '
                  'st=$deepseek_guard_status wait=$deepseek_guard_wait_ms';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/fl.log fl;
        deepseek_guard_cache llm;
        deepseek_guard_cache_status_header X-Cache-Status;
        proxy_http_version 1.1;
        proxy_read_timeout 60s;

        location /one/ {
            deepseek_guard one;
            deepseek_guard_cache_valid 200 10m;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /hold1/ {
            deepseek_guard one;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /two/ {
            deepseek_guard two;
            deepseek_guard_cache_valid 200 10m;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /hold2/ {
            deepseek_guard two;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /slow/ {
            deepseek_guard_cache_valid 200 10m;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location = /metrics {
            access_log off;
            deepseek_guard_metrics;
        }
    }
EOF
$t->start;

my $LOG = $t->prefix . '/logs/fl.log';

# a chat request (not streamed) tagged $tag to /$loc/chat/completions;
# %h: more headers (X-Mock-Delay-Ms)
sub req {
    my ($loc, $tag, $content, %h) = @_;
    return $t->chat_req(uri => "/$loc/chat/completions", content => $content,
                        timeout => 40,
                        headers => { 'X-Tag' => $tag, %h });
}

# the sum of gauge $name over the classes of zone $zone
sub gauge {
    my ($name, $zone) = @_;
    my $m = $t->metrics;
    my $s = 0;
    $s += $m->{$_} for grep { /^deepseek_guard_\Q$name\E\{zone="\Q$zone\E",/ }
                        keys %$m;
    return $s;
}

# upstream requests the mock saw with the body of request $r
sub upstream_calls {
    my ($r) = @_;
    return $t->mock_stats->{bodies}{ sha256_hex($r->{body}) } // 0;
}

# the access log line of the answered (not 499) request tagged $tag
sub logged {
    my ($tag) = @_;
    my %f;
    $t->wait_until(sub {
        open(my $fh, '<', $LOG) or return 0;
        while (my $l = <$fh>) {
            my %g = $l =~ /(\w+)=(\S*)/g;
            %f = %g if ($g{tag} // '') eq $tag && ($g{status} // '') ne '499';
        }
        return %f ? 1 : 0;
    }, 10);
    return \%f;
}

# a slot holder: admitted and in flight at the mock for up to 30 s, ended
# by release()
sub hold {
    my ($loc, $tag) = @_;
    my ($bg, $pid) = $t->place(req($loc, $tag, "hold $tag",
                                   'X-Mock-Delay-Ms' => 30000),
                               mock_port => $mport, admitted => 1);
    return $bg;
}

sub release {
    my ($bg) = @_;
    kill 'KILL', $bg->{pid};
    waitpid($bg->{pid}, 0);
}

# a request that is queued (accepted by a worker, not in flight at the
# mock); returns ($bg, worker pid); $not: a worker it must not go to
sub queued {
    my ($r, $not) = @_;
    return $t->place($r, mock_port => $mport,
                     accept => sub { !defined $not || $_[0] != $not });
}

# ------------------------------------------------ (1) inflight=1: queued, ONE call

{
    $t->mock_reset;
    my $h = hold('hold1', 'h1');
    is(gauge('inflight', 'one'), 1, 'inflight=1: the holder has the slot');

    my $body = 'queued misses, inflight 1';
    my $ra = req('one', 'a1', $body, 'X-Mock-Delay-Ms' => 300);
    my $rb = req('one', 'b1', $body);
    my ($bga, $wa) = queued($ra);
    ok($t->wait_until(sub { gauge('queue_depth', 'one') >= 1 }, 5),
       '... the first miss waits in the admission queue');
    my ($bgb, $wb) = queued($rb, $wa);
    isnt($wb, $wa, '... the second miss is in the other worker');

    # (with the lock taken before admission, the second one waited for
    # the first one's lock outside the queue: depth stayed 1)
    my $depth;
    $t->wait_until(sub { ($depth = gauge('queue_depth', 'one')) >= 2 }, 3);
    is($depth, 2, '... the second miss of the same entry queues too: '
                  . 'queue depth 2');
    is(upstream_calls($ra), 0, '... neither has gone upstream yet');

    release($h);
    my ($a) = @{ $t->bg_wait($bga) };
    my ($b) = @{ $t->bg_wait($bgb) };
    is($a->{status}, 200, '... the first answered 200 once the slot is free')
        or diag explain $a;
    is($b->{status}, 200, '... the second answered 200') or diag explain $b;
    ok($a->{body} ne '' && $b->{body} eq $a->{body}, '... the same body');
    like($a->{body}, qr/"content":"tok0-/, '... a chat completion');
    is(upstream_calls($ra), 1, '... the upstream saw ONE request for the entry');

    my ($la, $lb) = (logged('a1'), logged('b1'));
    is($la->{cache}, 'MISS', '... the first one filled the entry (MISS)')
        or diag explain $la;
    like($lb->{cache} // '', qr/^(?:COALESCED|HIT)$/,
         "... the second was answered from the cache ("
         . ($lb->{cache} // '?') . ')')
        or diag explain $lb;
    is($la->{st}, 'QUEUED', '... the first one was queued') or diag explain $la;
    my $c = $t->cache_chat('c1', uri => '/one/chat/completions',
                           content => $body);
    is("$c->{status} $c->{cache}", '200 HIT', '... then a HIT');
}

# ------------------------------------------------ (1b) inflight=2: admitted
# while another fills, it gives its admission back and waits

{
    $t->mock_reset;
    my $h1 = hold('hold2', 'h21');
    my $h2 = hold('hold2', 'h22');
    is(gauge('inflight', 'two'), 2, 'inflight=2: two holders have the slots');

    my $body = 'queued misses, inflight 2';
    my $ra = req('two', 'a2', $body, 'X-Mock-Delay-Ms' => 2000);
    my $rb = req('two', 'b2', $body);
    my ($bga, $wa) = queued($ra);
    ok($t->wait_until(sub { gauge('queue_depth', 'two') >= 1 }, 5),
       '... the first miss waits in the admission queue');
    my ($bgb, $wb) = queued($rb, $wa);
    my $depth;
    $t->wait_until(sub { ($depth = gauge('queue_depth', 'two')) >= 2 }, 3);
    is($depth, 2, '... the second miss queues too: queue depth 2');

    # one slot free: the first is admitted and fills (2 s upstream)
    release($h1);
    ok($t->wait_until(sub { upstream_calls($ra) >= 1 }, 5),
       '... one slot freed: the first miss fills');
    # the other slot: the second is admitted, finds the entry being
    # filled, gives its slot back and waits for the filler
    release($h2);
    my $seen = $t->wait_until(sub {
        gauge('inflight', 'two') == 1 && gauge('queue_depth', 'two') == 0
    }, 1.5, 0.02);
    my $filling = !-e $bga->{file};    # bg_parallel writes it at the end
    ok($seen, '... both slots freed: one in flight (the filler), none queued,'
              . ' the second waits for the filler without a slot');
    ok($filling, '... while the filler was still filling');

    my ($a) = @{ $t->bg_wait($bga) };
    my ($b) = @{ $t->bg_wait($bgb) };
    is("$a->{status} $b->{status}", '200 200', '... both answered 200')
        or diag explain [$a, $b];
    ok($a->{body} ne '' && $b->{body} eq $a->{body}, '... the same body');
    is(upstream_calls($ra), 1, '... the upstream saw ONE request for the entry');
    my ($la, $lb) = (logged('a2'), logged('b2'));
    is($la->{cache}, 'MISS', '... the first one filled the entry (MISS)')
        or diag explain $la;
    is($lb->{cache}, 'COALESCED', '... the second one waited for it (COALESCED)')
        or diag explain $lb;
    cmp_ok($b->{end}, '>=', $a->{end} - 0.5,
           '... answered when the filler was done');
}

# ------------------------------------------------ (2) default lock timeout: 5 s

{
    $t->mock_reset;
    my $off = length $t->error_log;

    # The filler's upstream takes 9 s; two more requests for the same
    # entry (X-Mock-Delay-Ms is not in the key: method, URI, credentials,
    # body) arrive while it fills, at 300 and 600 ms.  The filler's lock
    # runs out 5 s after it was taken: one waiter takes it over and goes
    # upstream (1 s); the other, still waiting behind that new lock,
    # reaches its own 5 s ("lock timeout, going upstream") and goes
    # upstream on its own (1 s).  With the 60 s default both waited for
    # the filler's 9 s.
    my $body = 'slow filler';
    my $rf = req('slow', 'f3', $body, 'X-Mock-Delay-Ms' => 9000);
    my @rw = map { req('slow', "w3$_", $body, 'X-Mock-Delay-Ms' => 1000) } 1, 2;
    $rw[0]{at_ms} = 300;
    $rw[1]{at_ms} = 600;
    my ($f, @w) = $t->parallel([$rf, @rw], timeout => 40);
    my @ms = map { int $_->{ms} } @w;

    is(join(' ', map { $_->{status} } $f, @w), '200 200 200',
       'slow filler: all three answered 200')
        or diag explain [$f, @w];
    cmp_ok($f->{ms}, '>=', 8900, '... the filler took its 9 s');
    is(scalar(grep { $_ >= 4500 } @ms), 2,
       "... the two others waited for the lock first (@ms ms)");
    is(scalar(grep { $_ < 8000 } @ms), 2,
       "... then went upstream on their own after the 5 s default, "
       . "not after the filler's 9 s (@ms ms)");
    is(scalar(grep { $_->{body} eq $f->{body} } @w), 2, '... the same answer');
    is(upstream_calls($rf), 3, '... three upstream requests for the entry');
    my $warns = () = substr($t->error_log, $off)
                     =~ /\[warn\].*lock timeout, going upstream/g;
    cmp_ok($warns, '>=', 1, "... logged at warn: lock timeout, going upstream"
                            . " ($warns)");
}

$t->done;
