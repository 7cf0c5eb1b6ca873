#!/usr/bin/perl
# Cache differential (issue 13): a seeded generator sends 3,000 steps of
# mixed requests (over 6,000 requests) both to cached locations and to an
# identical uncached one, in front of the same deterministic upstream
# (t/mock/diff_upstream.py: every answer is a pure function of the request,
# never of time or of a counter).  Whatever the cache does, every answer of
# a cached location must equal what the uncached location gives for the
# same request: status, body bytes, Content-Type and Content-Encoding.
#
# The locations (all proxy_http_version 1.1 to the same upstream, the
# prefix stripped so that the upstream sees the same target):
#   /u/  no cache, proxy_buffering off: the reference of /c/, /k/, /e/
#   /c/  deepseek_guard_cache with the default key
#   /k/  a key WITHOUT $deepseek_guard_auth_sha256 and without the method
#        ("$request_uri|$deepseek_guard_body_sha256"), json_canonical on.
#        Only credentialed requests are sent here, so an entry may exist
#        only for an answer the upstream declared shareable (public,
#        s-maxage, must-revalidate: the upstream then answers the same for
#        every credential); anything else stored here hands one
#        credential's answer to another.  HEAD shares the GET's entry.
#   /e/  the default key, json_canonical on, and $deepseek_guard_body_sha256
#        evaluated early by `set` in the rewrite phase (it must not freeze)
#   /v/  no cache, proxy_buffering on: the reference of /b/
#   /b/  the default key, proxy_buffering on
# All cache with deepseek_guard_cache_valid 200 201 206 404 10m (206 on
# purpose: the cache must still refuse to store it), use_stale on /c/, and
# deepseek_guard_cache_max_entry_size 64k (some answers are bigger).
#
# The mix (gen_fresh, mutate): GET, POST, HEAD; HTTP/1.1 and 1.0 clients;
# request bodies with Content-Length or chunked; no credential, two bearer
# tokens, x-api-key, api-key, Cookie, two of them, an empty Authorization,
# A's token split over two headers; Accept-Encoding none, gzip, GZIP, "gzip,
# deflate, br", x-gzip, identity, *, br, "gzip;q=0", "deflate, gzip;q=0.5";
# Accept-Language; Range none or a valid single range; JSON prompts (some
# equal once canonical, one with a duplicate key, one not JSON, 24 kB ones
# that spill to a temporary file); upstream status 200, 201, 404, 500, 503;
# JSON, SSE and plain text (Accept-Ranges, 206 to Range); Content-Length,
# chunked, close-delimited HTTP/1.1 and HTTP/1.0 framing; cut answers;
# gzip and br answers; Cache-Control (max-age, max-age=1, no-store,
# private, public, s-maxage, no-cache, must-revalidate); Vary
# Accept-Encoding, none, *, Accept-Language (one line or two); Set-Cookie.
# The space is small on purpose: a step repeats an earlier request (a hit
# when the cache stored it), repeats it with ONE dimension changed
# (credential, Accept-Encoding, Range, method, location, body,
# Accept-Language, protocol: where a cache that keys too little hands out a
# wrong answer), or draws a fresh one.  A few steps send three copies to
# the cached location at once (coalescing).  Halfway nginx is reloaded (the
# LMDB cache outlives the workers).
#
# Comparison: an answer is (complete?, status, body, Content-Type,
# Content-Encoding).  An incomplete answer (the upstream cut a
# Content-Length or chunked body, so nginx closed the client connection
# early) compares the status of its status line and the body bytes the
# client got before the close: both sides must be incomplete alike.  A cut
# close-delimited answer looks complete to both sides, the reason why the
# cache must never store it; the comparison cannot see that with a
# deterministic upstream, so a separate test checks that no cut and no
# close-delimited answer (an event stream: no cut one, its own [DONE] rule)
# ever came from the cache.  Another one checks that an answer from the
# cache that passed the comparison also carries the upstream's end-to-end
# headers (all but Date, Server, framing and connection headers and the
# status header), except the Accept-Ranges that nginx's range filter never
# writes on the 206 it makes from a stored body.
#
# Allowed differences (printed, not failures): an answer marked STALE or
# COALESCED that is the upstream's answer (seen in this run) to the same
# request with another Range or another Accept-Encoding of the same
# encoding class: the answer of the request whose entry it was.  Anything
# else on a STALE or COALESCED answer fails like any difference (with a
# deterministic upstream, a stale or coalesced answer is the same answer).
#
# Seed: DSG_DIFF_SEED (default: time-based), printed at the start and with
# every failure; the same seed replays the same request sequence (only the
# timing of coalescing may differ).  DSG_DIFF_STEPS (default 3000) sets the
# number of steps, DSG_DIFF_TRACE=<file> writes one line per step (step,
# kind of step, cache statuses, upstream status, request).  The PRNG is an
# xorshift32 of our own, independent of perl's rand() (the harness uses
# that for ports).

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Time::HiRes qw(time);
use Digest::SHA qw(sha1_hex);

my $SEED = defined $ENV{DSG_DIFF_SEED} && $ENV{DSG_DIFF_SEED} =~ /^\d+$/
         ? $ENV{DSG_DIFF_SEED} + 0
         : (int(time() * 1000) ^ ($$ << 8)) & 0x7FFFFFFF;
my $STEPS = $ENV{DSG_DIFF_STEPS} && $ENV{DSG_DIFF_STEPS} =~ /^\d+$/
          ? $ENV{DSG_DIFF_STEPS} + 0 : 3000;
my $REPLAY = "replay with DSG_DIFF_SEED=$SEED"
           . ($STEPS != 3000 ? " DSG_DIFF_STEPS=$STEPS" : '');
diag("cache differential: seed $SEED, $STEPS steps ($REPLAY)");

my $t;
{
    # the deterministic upstream instead of the mock LLM: mock_start runs
    # DSG_MOCK with --listen, --portfile and --quiet
    local $ENV{DSG_MOCK} = DSG::Test->repo . '/t/mock/diff_upstream.py';
    $t = DSG::Test->new(workers => 2);
}
$t->mock_start;

$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=diff:4m;
    # answers over 64 kB pass through, not stored: the mix has some
    deepseek_guard_cache_max_entry_size 64k;
    log_format diff '$pid $status "$deepseek_guard_cache_status" '
                    '$request_method $request_uri step=$http_x_step';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log diff;

        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_connect_timeout 5s;
        proxy_read_timeout 10s;

        # the reference
        location /u/ {
            proxy_pass http://%%MOCK%%/;
        }

        location /c/ {
            deepseek_guard_cache diff;
            deepseek_guard_cache_valid 200 201 206 404 10m;
            deepseek_guard_cache_methods GET HEAD POST;
            deepseek_guard_cache_use_stale error timeout updating http_500 http_503;
            deepseek_guard_cache_status_header X-Cache-Status;
            proxy_pass http://%%MOCK%%/;
        }

        location /k/ {
            deepseek_guard_cache diff;
            deepseek_guard_cache_key "$request_uri|$deepseek_guard_body_sha256";
            deepseek_guard_cache_json_canonical on;
            deepseek_guard_cache_valid 200 201 206 404 10m;
            deepseek_guard_cache_methods GET HEAD POST;
            deepseek_guard_cache_status_header X-Cache-Status;
            proxy_pass http://%%MOCK%%/;
        }

        location /e/ {
            set $early_body_sha $deepseek_guard_body_sha256;
            deepseek_guard_cache diff;
            deepseek_guard_cache_json_canonical on;
            deepseek_guard_cache_valid 200 201 206 404 10m;
            deepseek_guard_cache_methods GET HEAD POST;
            deepseek_guard_cache_status_header X-Cache-Status;
            proxy_pass http://%%MOCK%%/;
        }

        # the reference of /b/: nginx buffers the upstream's answer
        location /v/ {
            proxy_buffering on;
            proxy_pass http://%%MOCK%%/;
        }

        location /b/ {
            proxy_buffering on;
            deepseek_guard_cache diff;
            deepseek_guard_cache_valid 200 201 206 404 10m;
            deepseek_guard_cache_status_header X-Cache-Status;
            proxy_pass http://%%MOCK%%/;
        }
    }
EOF
$t->start;

# ------------------------------------------------ the PRNG

my $S = ((($SEED & 0xFFFFFFFF) * 2654435761) ^ 0x9E3779B9) & 0xFFFFFFFF;
$S ||= 0x1234567;

sub rnd32 {
    $S ^= ($S << 13) & 0xFFFFFFFF;
    $S ^= $S >> 17;
    $S ^= ($S << 5) & 0xFFFFFFFF;
    return $S;
}

# an integer in [0, n)
sub rnd { my ($n) = @_; return $n > 0 ? rnd32() % $n : 0 }

# pick(w1 => v1, w2 => v2, ...): a weighted choice
sub pick {
    my @p = @_;
    my $sum = 0;
    for (my $i = 0; $i < @p; $i += 2) { $sum += $p[$i] }
    my $x = rnd($sum);
    for (my $i = 0; $i < @p; $i += 2) {
        return $p[$i + 1] if ($x -= $p[$i]) < 0;
    }
    return $p[-1];
}

# ------------------------------------------------ the request space

my %CRED = (
    none   => [],
    bearA  => [Authorization => 'Bearer sk-user-A'],
    bearB  => [Authorization => 'Bearer sk-user-B'],
    xkey   => ['X-Api-Key' => 'K1-secret'],
    apikey => ['Api-Key' => 'K2-secret'],
    cookie => [Cookie => 'session=c00kie'],
    both   => [Authorization => 'Bearer sk-user-A', Cookie => 'session=c00kie'],
    # an empty credential is still one; A's token split over two headers
    # is not A
    empty  => [Authorization => ''],
    split  => [Authorization => 'Bearer sk-', 'Api-Key' => 'user-A'],
);
my @BODIES = (
    '{"model":"deepseek-chat","messages":[{"role":"user","content":"p1"}]}',
    # the same once canonical
    "{ \"messages\": [ {\"content\": \"p1\", \"role\": \"user\"} ],\n  \"model\": \"deepseek-chat\" }",
    '{"model":"deepseek-chat","messages":[{"role":"user","content":"p2"}],"temperature":0}',
    '{"model":"deepseek-chat","messages":[{"role":"user","content":"p3"}],"stream":true}',
    # a duplicate key: keyed on its raw bytes (by the upstream too)
    '{"model":"deepseek-chat","model":"other","messages":[]}',
    'not json at all',
    # 24 kB, over client_body_buffer_size: read from a temporary file, and
    # the same once canonical
    '{"model":"deepseek-chat","messages":[{"role":"user","content":"'
        . ('long prompt ' x 2000) . '"}]}',
    '{ "messages" : [ { "content" : "' . ('long prompt ' x 2000)
        . '", "role" : "user" } ], "model" : "deepseek-chat" }',
);

sub pick_cred {
    my ($loc) = @_;
    my @any = (4 => 'bearA', 3 => 'bearB', 2 => 'xkey', 2 => 'apikey',
               2 => 'cookie', 1 => 'both', 1 => 'empty', 1 => 'split');
    # /k/ gets credentialed requests only (see the header)
    return $loc eq 'k' ? pick(@any) : pick(10 => 'none', @any);
}

sub pick_ae {
    return pick(30 => '', 25 => 'gzip', 20 => 'gzip, deflate, br',
                5 => 'x-gzip', 8 => 'identity', 7 => 'gzip;q=0',
                5 => 'deflate, gzip;q=0.5', 4 => 'br', 2 => 'GZIP',
                2 => '*');
}

sub pick_lang { pick(60 => '', 25 => 'en', 15 => 'fr, en;q=0.5') }
sub pick_proto { pick(95 => 'HTTP/1.1', 5 => 'HTTP/1.0') }

# first byte below 20: inside every representation, even a gzipped one
# (no 416, whose page nginx and the upstream word differently)
sub gen_range {
    my $k = pick(80 => '', 14 => 'r', 6 => 'open');
    return '' if $k eq '';
    my $a = rnd(20);
    return $k eq 'r' ? "bytes=$a-" . ($a + rnd(60)) : "bytes=$a-";
}

sub gen_fresh {
    my $loc = pick(45 => 'c', 20 => 'k', 20 => 'e', 15 => 'b');
    my %q = (
        loc     => $loc,
        method  => pick(45 => 'GET', 40 => 'POST', 15 => 'HEAD'),
        status  => pick(55 => 200, 10 => 201, 15 => 404, 10 => 500, 10 => 503),
        framing => pick(40 => 'length', 35 => 'chunked', 15 => 'close',
                        10 => 'http10'),
        kind    => pick(40 => 'json', 35 => 'text', 25 => 'sse'),
        n       => pick(30 => 64, 40 => 300, 20 => 2000, 7 => 9000,
                        3 => 100000),
        cc      => pick(40 => '', 12 => 'ma', 5 => 'ma1', 6 => 'ns', 6 => 'pr',
                        10 => 'pu', 7 => 'sm', 7 => 'nc', 7 => 'mr'),
        vary    => pick(62 => 'ae', 17 => 'none', 5 => 'star', 9 => 'lang',
                        7 => 'lang2'),
        sc      => pick(95 => 0, 5 => 1),
        br      => pick(90 => 0, 10 => 1),
        cred    => pick_cred($loc),
        ae      => pick_ae(),
        lang    => pick_lang(),
        proto   => pick_proto(),
        te      => pick(85 => 0, 15 => 1),
        range   => gen_range(),
        body    => rnd(scalar @BODIES),
    );
    # /k/ stores only shareable answers: give it more of them
    $q{cc} = pick(1 => 'pu', 1 => 'sm', 1 => 'mr') if $loc eq 'k' && rnd(2);
    $q{cut} = pick(85 => -1, 15 => 'y') eq 'y' ? rnd($q{n}) : -1;
    return \%q;
}

# the same request with one dimension changed
sub mutate {
    my ($q) = @_;
    my %m = %$q;
    my $dim = pick(28 => 'cred', 22 => 'ae', 13 => 'range', 10 => 'method',
                   10 => 'loc', 10 => 'body', 5 => 'lang', 2 => 'proto');
    if ($dim eq 'cred') {
        $m{cred} = pick_cred($m{loc});
    } elsif ($dim eq 'ae') {
        $m{ae} = pick_ae();
    } elsif ($dim eq 'range') {
        $m{range} = $m{range} eq '' ? gen_range() || 'bytes=0-9' : '';
    } elsif ($dim eq 'method') {
        $m{method} = pick(45 => 'GET', 40 => 'POST', 15 => 'HEAD');
    } elsif ($dim eq 'loc') {
        $m{loc} = pick(45 => 'c', 20 => 'k', 20 => 'e', 15 => 'b');
        $m{cred} = pick_cred('k') if $m{loc} eq 'k' && $m{cred} eq 'none';
    } elsif ($dim eq 'lang') {
        $m{lang} = pick_lang();
    } elsif ($dim eq 'proto') {
        $m{proto} = pick_proto();
    } else {
        $m{body} = rnd(scalar @BODIES);
    }
    $m{mut} = $dim;
    return \%m;
}

sub target {
    my ($q) = @_;
    my $s = "d/$q->{status}/$q->{framing}/$q->{kind}?n=$q->{n}";
    $s .= "&cut=$q->{cut}" if $q->{cut} >= 0;
    $s .= "&cc=$q->{cc}" if $q->{cc} ne '';
    $s .= "&vary=$q->{vary}" if $q->{vary} ne 'ae';
    $s .= "&sc=1" if $q->{sc};
    $s .= "&br=1" if $q->{br};
    return $s;
}

# http() options of request $q at location $loc
sub req_opts {
    my ($q, $loc, $step) = @_;
    my @h = (@{ $CRED{ $q->{cred} } }, 'X-Step' => $step);
    push @h, 'Accept-Encoding' => $q->{ae} if $q->{ae} ne '';
    push @h, Range => $q->{range} if $q->{range} ne '';
    push @h, 'Accept-Language' => $q->{lang} if $q->{lang} ne '';
    my %o = (method => $q->{method}, uri => "/$loc/" . target($q),
             headers => \@h, timeout => 15, proto => $q->{proto});
    if ($q->{method} eq 'POST') {
        $o{body} = $BODIES[ $q->{body} ];
        push @h, 'Content-Type' => 'application/json';
        if ($q->{te} && $q->{proto} eq 'HTTP/1.1') {
            # the same body in chunks of 1000 bytes
            push @h, 'Transfer-Encoding' => 'chunked';
            $o{body} = join('', map { sprintf("%x\r\n%s\r\n", length, $_) }
                                $o{body} =~ /(.{1,1000})/gs) . "0\r\n\r\n";
        }
    }
    return \%o;
}

sub describe {
    my ($q) = @_;
    my $o = req_opts($q, $q->{loc}, 'N');
    my @h = @{ $o->{headers} };
    my $s = "$o->{method} $o->{uri}";
    for (my $i = 0; $i < @h; $i += 2) {
        next if $h[$i] eq 'X-Step' || $h[$i] eq 'Content-Type';
        $s .= " [$h[$i]: $h[$i + 1]]";
    }
    $s .= " body#$q->{body}"
        . ($q->{te} && $q->{proto} eq 'HTTP/1.1' ? ' chunked ' : ' ')
        . substr($BODIES[ $q->{body} ], 0, 40) if defined $o->{body};
    $s .= " ($q->{proto})" if $q->{proto} ne 'HTTP/1.1';
    return $s;
}

# ------------------------------------------------ comparison

sub outcome {
    my ($r) = @_;
    return {
        complete => $r->{error} ? 0 : 1,
        status   => $r->{status} || $r->{got_status} || 0,
        body     => $r->{body} // '',
        ct       => $r->{headers}{'content-type'} // '',
        ce       => $r->{headers}{'content-encoding'} // '',
        xcs      => $r->{headers}{'x-cache-status'} // '',
        upid     => $r->{headers}{'x-up-id'} // '',
        error    => $r->{error} // '',
        e2e      => e2e_headers($r->{headers}),
    };
}

# the end-to-end headers as one string: what nginx itself writes (Date,
# Server, framing, connection) and the cache status left out; repeated
# headers joined by ", " (the harness does that), names in order
my %NOT_E2E = map { $_ => 1 } qw(date server connection keep-alive
    transfer-encoding content-length x-cache-status);
sub e2e_headers {
    my ($h) = @_;
    return join("\n", map { "$_: $h->{$_}" } grep { !$NOT_E2E{$_} } sort keys %$h);
}

sub diffs {
    my ($c, $u) = @_;
    return grep { $c->{$_} ne $u->{$_} } qw(complete status body ct ce);
}

# the Accept-Encoding class: gzip when gzip or x-gzip is listed with q > 0
sub ae_class {
    my ($ae) = @_;
    for my $item (split /,/, $ae // '') {
        my ($c, @p) = map { s/^\s+|\s+$//gr } split /;/, $item;
        next unless lc($c // '') =~ /^(?:x-)?gzip$/;
        my $qv = 1;
        for (@p) { $qv = $1 if /^q=([\d.]+)$/i }
        return 'gzip' if $qv > 0;
    }
    return 'identity';
}

# a guess at what went wrong, for the summary
sub cause {
    my ($c, $u) = @_;
    return $c->{complete} ? 'a complete answer where the upstream cut it'
                          : 'an incomplete answer where the upstream sent it whole'
        if $c->{complete} != $u->{complete};
    return "status $c->{status} instead of $u->{status}"
        if $c->{status} != $u->{status};
    my $cg = $c->{body} =~ /^\x1f\x8b/ ? 1 : 0;
    my $ug = $u->{body} =~ /^\x1f\x8b/ ? 1 : 0;
    if ($c->{body} eq $u->{body}) {
        return join(' and ', map { "$_ \"$c->{$_}\" instead of \"$u->{$_}\"" }
                             grep { $c->{$_} ne $u->{$_} } qw(ct ce));
    }
    return 'gzip bytes where the upstream answers identity' if $cg && !$ug;
    return 'identity bytes where the upstream answers gzip' if !$cg && $ug;
    return 'a truncated body' if index($u->{body}, $c->{body}) == 0;
    return 'a longer body' if index($c->{body}, $u->{body}) == 0;
    return 'another request\'s answer (other body)';
}

sub show {
    my ($o) = @_;
    my $b = $o->{body};
    my $bs = length($b) > 48 ? substr($b, 0, 48) . '...' : $b;
    $bs =~ s/([^\x20-\x7e])/sprintf('\\x%02x', ord $1)/ge;
    return sprintf('%s %d ct="%s" ce="%s" len=%d xcs=%s up=%s%s body="%s"',
                   $o->{complete} ? 'complete' : 'INCOMPLETE', $o->{status},
                   $o->{ct}, $o->{ce}, length $b, $o->{xcs} || '-',
                   $o->{upid} || '-', $o->{error} ? " ($o->{error})" : '', $bs);
}

# ------------------------------------------------ the run

my %genuine;         # request without AE/Range => upstream answers seen
my (%hdr_fail, @hdr_ex);
my (@pool, %xcs, %fail_class, %allowed_class, @fail_ex, @allowed_ex);
my ($fails, $allowed, $sent, $hits, $range_hits, $bursts) = (0, 0, 0, 0, 0, 0);
my @replayed_bad;    # close-delimited or cut answers served from the cache
my $t0 = time();
my $POOL = 120;
# DSG_DIFF_TRACE=<file>: one line per step (step, how, cache status,
# upstream status, request), to see what a seed did
my $TRACE;
if ($ENV{DSG_DIFF_TRACE}) {
    open($TRACE, '>', $ENV{DSG_DIFF_TRACE})
        or die "DSG_DIFF_TRACE $ENV{DSG_DIFF_TRACE}: $!";
}
my $reloaded = 0;

# the allowed exceptions: a STALE or COALESCED answer that the upstream
# gave (in this run) to the same request with another Range header or
# another Accept-Encoding of the same class, i.e. the answer of the request
# whose entry it was, differing only in what the cache legitimately shares
sub genuine_key {
    my ($q) = @_;
    return join('|', $q->{method}, target($q), $q->{cred}, $q->{lang},
                $q->{method} eq 'POST' ? $q->{body} : '', ae_class($q->{ae}));
}

sub signature {
    my ($o) = @_;
    return join('|', @{$o}{qw(complete status ct ce)}, sha1_hex($o->{body}));
}

sub check {
    my ($step, $q, $c, $u, $how) = @_;
    $xcs{ $c->{xcs} || '(none)' }++;
    my $from_cache = $c->{xcs} =~ /^(?:HIT|COALESCED|STALE)$/;
    $hits++ if $from_cache;
    $range_hits++ if $from_cache && $c->{status} == 206;
    # what the comparison cannot see: the cache must never replay a cut
    # answer, nor a close-delimited one (but a whole close-delimited event
    # stream: it ends with data: [DONE], the rule of event streams)
    push @replayed_bad, "step $step: " . describe($q) . " => $c->{xcs}"
        if $from_cache
           && (!$u->{complete}
               || ($q->{framing} =~ /^(?:close|http10)$/
                   # (cut is always below n, an event stream longer than n)
                   && !($q->{kind} eq 'sse' && $q->{cut} < 0)));
    my @d = diffs($c, $u);
    if (!@d && $from_cache && $c->{e2e} ne $u->{e2e}) {
        # the same answer, other headers: the entry did not keep them
        my %cu = map { /^([^:]+): (.*)$/s ? ($1 => $2) : () } split /\n/, $u->{e2e};
        my %cc = map { /^([^:]+): (.*)$/s ? ($1 => $2) : () } split /\n/, $c->{e2e};
        # nginx's range filter writes no Accept-Ranges on the 206 it makes
        # from a stored body (as for a static file): not the entry's fault
        delete $cu{'accept-ranges'}
            if $c->{status} == 206 && !defined $cc{'accept-ranges'};
        for my $n (sort keys %{ { %cu, %cc } }) {
            next if ($cu{$n} // "\0") eq ($cc{$n} // "\0");
            my $k = "$n: \"" . ($cc{$n} // '(none)') . "\" instead of \""
                  . ($cu{$n} // '(none)') . '"';
            $k =~ s/[0-9a-f]{16}/<id>/g;
            $hdr_fail{$k}++;
            push @hdr_ex, "step $step: " . describe($q) . " => $k"
                if @hdr_ex < 10;
        }
    }
    return unless @d;
    my $class = cause($c, $u) . " | /$q->{loc}/ | " . ($c->{xcs} || '-');
    my $ex = "step $step ($how"
           . ($q->{mut} && $how =~ /^mutated/ ? ": $q->{mut} changed" : '')
           . "): " . describe($q)
           . "\n      cached:   " . show($c)
           . "\n      uncached: " . show($u);
    if (($c->{xcs} eq 'STALE' || $c->{xcs} eq 'COALESCED')
        && $genuine{ genuine_key($q) }{ signature($c) })
    {
        $allowed++;
        $allowed_class{$class}++;
        push @allowed_ex, $ex if @allowed_ex < 10;
    } else {
        $fails++;
        $fail_class{$class}++;
        push @fail_ex, $ex if @fail_ex < 25;
    }
}

for my $step (1 .. $STEPS) {
    if (!$reloaded && $step > $STEPS / 2) {
        ok($t->reload, "reload at step $step");
        $reloaded = 1;
    }
    my ($q, $how);
    my $r = rnd(100);
    if (@pool && $r < 50) {
        $q = $pool[ rnd(scalar @pool) ];
        $how = 'repeat';
    } else {
        ($q, $how) = @pool && $r < 75 ? (mutate($pool[ rnd(scalar @pool) ]), 'mutated')
                                      : (gen_fresh(), 'fresh');
        # a bounded pool, so that requests come back often enough to hit
        if (@pool < $POOL) {
            push @pool, $q;
        } else {
            $pool[ rnd($POOL) ] = $q;
        }
    }
    my $burst = rnd(100) < 4;

    my @c;
    if ($burst) {
        $bursts++;
        @c = map { outcome($_) }
             $t->parallel([map { req_opts($q, $q->{loc}, "$step.$_") } 1 .. 3],
                          timeout => 30);
    } else {
        @c = (outcome($t->http(%{ req_opts($q, $q->{loc}, $step) })));
    }
    my $u = outcome($t->http(%{ req_opts($q, $q->{loc} eq 'b' ? 'v' : 'u',
                                         "$step.u") }));
    $genuine{ genuine_key($q) }{ signature($u) } = 1;
    if ($TRACE) {
        printf {$TRACE} "%d\t%s\t%s\t%s\t%s\n", $step, $how,
            join(',', map { $_->{xcs} || '-' } @c), $u->{status}, describe($q);
    }
    $sent += @c + 1;
    check($step, $q, $_, $u, $how . ($burst ? ' burst' : '')) for @c;
}

my $secs = time() - $t0;
diag(sprintf('%d steps, %d requests (%d bursts of 3) in %.1f s; cached '
             . 'side: %s; %d answers from the cache (%d of them 206 by the '
             . 'range filter)',
             $STEPS, $sent, $bursts, $secs,
             join(' ', map { "$_=$xcs{$_}" } sort keys %xcs),
             $hits, $range_hits));

if ($allowed) {
    diag("$allowed differences on STALE/COALESCED answers (allowed):");
    diag("  $allowed_class{$_} x $_") for sort { $allowed_class{$b} <=> $allowed_class{$a} }
                                         keys %allowed_class;
    diag("  $_") for @allowed_ex;
}

ok(!$fails, "every cached answer equals the uncached one ($STEPS steps)")
    or do {
        diag("$fails differences; $REPLAY");
        diag("classes (count x what differed | location | X-Cache-Status):");
        diag("  $fail_class{$_} x $_")
            for sort { $fail_class{$b} <=> $fail_class{$a} || $a cmp $b }
                keys %fail_class;
        diag("first examples:");
        diag("  $_") for @fail_ex;
    };

cmp_ok($hits, '>=', int($STEPS / 10),
       'the cached locations answered many requests from the cache')
    or diag($REPLAY);

ok(!@replayed_bad, 'no cut or close-delimited answer was replayed from the cache')
    or diag(join("\n", "$REPLAY:", (@replayed_bad > 15 ? @replayed_bad[0 .. 14] : @replayed_bad),
                 @replayed_bad > 15 ? ('... ' . (@replayed_bad - 15) . ' more') : ()));

ok(!%hdr_fail, 'the answers from the cache carry the upstream\'s end-to-end headers')
    or diag(join("\n", "$REPLAY:",
                 map({ "  $hdr_fail{$_} x $_" } sort keys %hdr_fail), @hdr_ex));

$t->done;
