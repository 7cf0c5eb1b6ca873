#!/usr/bin/perl
# deepseek_guard in the request life cycle: an admission never grants
# access (NGX_DECLINED, not NGX_OK), internal redirects and subrequests are
# not charged again, dry run decides and logs without blocking, and the
# class comes from a map over the API key, not from a client header.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# Every zone below allows one request per minute and key: a second charge
# for the same request shows up at once as a 429.  The key is the API key
# (a header), which survives internal redirects (error_page drops the
# query string).  Static files answer in the content phase, after the
# guard's access phase.
$t->write_config(<<'EOF');
    map $http_authorization $api_key {
        "~^Bearer\s+(?<k>\S+)$"  $k;
        default                  "";
    }

    deepseek_guard_class critical reserve=20%;
    deepseek_guard_class normal;
    deepseek_guard_class low;

    # the documented setup: the class follows the API key
    map $api_key $dsg_class {
        k-crit   critical;
        k-mixed  Critical;
        k-norm   normal;
        k-low    low;
        default  "";
    }

    log_format guard '$msec $pid $status $deepseek_guard_status '
                     'k=$api_key c=$deepseek_guard_class $uri';

    deepseek_guard_zone once:1m key=$api_key rate=1r/m status=429;
    deepseek_guard_zone dry:1m  key=$api_key rate=1r/m status=429;
    deepseek_guard_zone cls:1m  key=$api_key rate=100r/s burst=100;
    deepseek_guard_zone ir:1m   key=all inflight=5;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log guard;
        root %%PREFIX%%/html;
        log_not_found off;

        location /deny {
            satisfy any;
            deny all;
            deepseek_guard once;
        }

        location /er {
            deepseek_guard once;
            error_page 404 = /b;
        }

        location /tf {
            deepseek_guard once;
            try_files /nonexistent /b;
        }

        location /b {
            deepseek_guard once;
        }

        location /ar {
            deepseek_guard once;
            auth_request /auth;
        }

        location /ar-only {
            auth_request /auth;
        }

        location = /auth {
            deepseek_guard once;
        }

        # in-flight slots across internal redirects: held from admission in
        # /ir-* until the response of /ir-b is done, then given back once
        location /ir-er {
            deepseek_guard ir;
            error_page 404 = /ir-b;
        }

        location /ir-named {
            deepseek_guard ir;
            error_page 404 = @ir;
        }

        location @ir {
            deepseek_guard ir;
            rewrite ^ /ir-b break;
        }

        location /ir-tf {
            deepseek_guard ir;
            try_files /nonexistent /ir-b;
        }

        # nginx's own 502 (nothing listens on port 1) redirected
        location /ir-up {
            deepseek_guard ir;
            proxy_pass http://127.0.0.1:1;
            error_page 502 = /ir-b;
        }

        location /ir-b {
            deepseek_guard ir;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }

        location /dry {
            deepseek_guard dry;
            deepseek_guard_dry_run on;
        }

        location /cls {
            deepseek_guard cls;
            deepseek_guard_classify $dsg_class default=normal;
        }
    }
EOF

mkdir $t->prefix . '/html';
for my $f (qw(deny b ar ar-only auth dry cls ir-b)) {
    open(my $fh, '>', $t->prefix . "/html/$f") or die "$f: $!";
    print {$fh} "ok $f\n";
    close $fh;
}
$t->start;

sub get_key {
    my ($uri, $key, %h) = @_;
    return $t->get($uri, (defined $key ? (Authorization => "Bearer $key") : ()),
                   %h);
}

# access log lines of a key: [status, guard status, class, uri]
sub log_entries {
    my ($key) = @_;
    my @e;
    for (split /\n/, $t->access_log) {
        my (undef, undef, $st, $gs, $k, $c, $u) = split ' ';
        next unless defined $u && $k eq "k=$key";
        $c =~ s/^c=//;
        push @e, [$st, $gs, $c, $u];
    }
    return @e;
}

# nginx writes the access log line after the response went out: wait until
# the key's lines are there and stop changing before reading them
sub log_of {
    my ($key) = @_;
    my @e;
    my $n = -1;
    $t->wait_until(sub {
        @e = log_entries($key);
        my $stable = (@e && @e == $n);
        $n = @e;
        $stable;
    }, 3, 0.1);
    return @e;
}

# ----------------------------------------------- admission is not access

# With "satisfy any", the first access handler that returns NGX_OK grants
# access and skips the rest.  An admitted request must still be denied by
# "deny all": the guard has to return NGX_DECLINED ("no opinion").
{
    my $r = get_key('/deny', 'k-deny');
    is($r->{status}, 403, 'satisfy any + deny all + guard: 403');
    is_deeply([map { $_->[1] } log_of('k-deny')], ['ADMITTED'],
              '... although the guard admitted it');
}

# ------------------------------------------- internal redirects: one charge

# /er has no file: 404, error_page redirects to /b, which uses the same
# 1r/m zone.  Charged again there, the first request would end in 429.
{
    my $r = get_key('/er', 'k-er');
    is($r->{status}, 200, 'error_page redirect into the same zone: 200');
    is($r->{body}, "ok b\n", '... served by /b');
    is(get_key('/er', 'k-er')->{status}, 429, '... the next request: 429');
    is(get_key('/b', 'k-er')->{status}, 429, '... /b too: one zone, one token');
}

# try_files falls back to /b after the access phase of /tf: same thing
{
    my $r = get_key('/tf', 'k-tf');
    is($r->{status}, 200, 'try_files redirect into the same zone: 200');
    is($r->{body}, "ok b\n", '... served by /b');
    is(get_key('/tf', 'k-tf')->{status}, 429, '... the next request: 429');
    my @l = log_of('k-tf');
    is($l[0][1], 'ADMITTED', '... logged as ADMITTED');
}

# ------------------------- internal redirects: one in-flight slot, released

# Zone ir caps in-flight requests at 5.  Each request below is redirected
# once (error_page to a URI and to a named location, try_files, nginx's own
# 502 from proxy_pass); a slot taken twice or never given back would turn
# requests away (503) within a few rounds, and the gauge would stay up.
{
    my %metric;
    my $read = sub {
        %metric = ();
        for (split /\n/, $t->get('/metrics')->{body}) {
            $metric{$1} += $2 if /^(deepseek_guard_\w+)\{zone="ir"[^}]*\} (\d+)/
                                 && !/decision="(?!admitted)/;
        }
    };
    my @paths = qw(/ir-er /ir-named /ir-tf /ir-up);
    my @res = map { my $p = $_; map { $t->get($p) } 1 .. 8 } @paths;
    is(scalar(grep { $_->{status} == 200 && $_->{body} eq "ok ir-b\n" } @res),
       scalar @res, scalar(@res) . ' redirected requests under inflight=5: all 200 from /ir-b')
        or diag explain [map { $_->{status} } @res];
    ok($t->wait_until(sub {
        $read->();
        ($metric{deepseek_guard_requests_total} // 0) == @res
            && ($metric{deepseek_guard_inflight} // -1) == 0;
    }, 5), '... admitted once each (' . ($metric{deepseek_guard_requests_total} // 0)
           . '), and the in-flight gauge is back to 0')
        or diag explain \%metric;
}

# --------------------------------------------- subrequests: never charged

# auth_request sends a subrequest to /auth, guarded by the same 1r/m zone:
# charged there, it would get 429 and auth_request would answer 500.
{
    my $r = get_key('/ar', 'k-ar');
    is($r->{status}, 200, 'auth_request subrequest into the same zone: 200');
    is(get_key('/ar', 'k-ar')->{status}, 429,
       '... the next main request: 429');
}

# the subrequest alone is not limited either: only main requests count
{
    my @res = map { get_key('/ar-only', 'k-sub') } 1 .. 3;
    is(scalar(grep { $_->{status} == 200 } @res), 3,
       'guarded auth_request location, unguarded main: 3 x 200');
    is(get_key('/auth', 'k-sub')->{status}, 200,
       '... the key still has its token for a main request');
}

# ------------------------------------------------------------- dry run

# 1r/m in dry run: every request passes; the first is ADMITTED, the other
# four would have been rejected: DRY_RUN, and a "dry run" error.log line
{
    my @res = map { get_key('/dry', 'k-dry') } 1 .. 5;
    is(scalar(grep { $_->{status} == 200 } @res), 5, 'dry run: 5 x 200');
    ok(!(grep { exists $_->{headers}{'retry-after'} } @res),
       '... no Retry-After on any');
    my @gs = map { $_->[1] } log_of('k-dry');
    is(scalar(grep { $_ eq 'ADMITTED' } @gs), 1, '... one ADMITTED');
    is(scalar(grep { $_ eq 'DRY_RUN' } @gs), 4, '... four DRY_RUN');
    my @lines = grep { /dry run/ && /"dry"/ } split /\n/, $t->error_log;
    is(scalar @lines, 4, '... four "dry run" lines naming the zone in error.log');
    like($lines[0] // '', qr/\[warn\]/, '... at the default level, warn');
}

# ------------------------------------------------------------ classes

# The class is the map of the API key; keys the map does not know get the
# classify default (normal, not the lowest class); a client header cannot
# pick a class in this setup.
{
    my %want = (
        'k-crit'  => 'critical',
        'k-mixed' => 'critical',    # class names are case-insensitive
        'k-norm'  => 'normal',
        'k-low'   => 'low',
        'k-who'   => 'normal',      # unknown key: default=normal
    );
    for my $k (sort keys %want) {
        is(get_key('/cls', $k)->{status}, 200, "class of $k: 200");
    }
    for my $k (sort keys %want) {
        is_deeply([map { $_->[2] } log_of($k)], [$want{$k}],
                  "... $k is $want{$k}");
    }

    # no key at all: default class too
    is($t->get('/cls')->{status}, 200, 'no API key: 200');
    my @l = log_of('');
    is($l[-1][2], 'normal', '... class normal');

    # asking for a class in a header changes nothing
    get_key('/cls', 'k-spoof', 'X-Priority' => 'critical',
            'X-Class' => 'critical');
    get_key('/cls', 'k-low', 'X-Priority' => 'critical');
    is_deeply([map { $_->[2] } log_of('k-spoof')], ['normal'],
              'unknown key with X-Priority: critical: still normal');
    is((log_of('k-low'))[-1][2], 'low',
       'k-low with X-Priority: critical: still low');
}

$t->done;
