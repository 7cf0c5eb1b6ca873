#!/usr/bin/perl
# Fault injection: requests that used to hang on the cache (issue 20).
#
#   1  a request nginx proxies back into itself with the same key (a
#      second server block of the same nginx, Host kept): the inner
#      request must not wait for the fill lock its own outer request
#      holds; stock nginx answers at once, so must the guard
#   2  a request-body error (413 from client_max_body_size) followed by
#      error_page into a cached location: the request finishes, its
#      connection closes, nothing is left parked

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(time);
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

$t->write_config(<<'EOF');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m;
    deepseek_guard_cache llm;
    deepseek_guard_cache_valid 200 1s;
    deepseek_guard_cache_lock_timeout 20s;
    deepseek_guard_cache_status_header X-Cache-Status;

    server {
        listen 127.0.0.1:%%PORT%%;

        # the outer request: proxied to the inner server, Host kept
        location /loop/ {
            proxy_pass http://127.0.0.1:%%PORT_1%%;
            proxy_set_header Host $host;
            proxy_read_timeout 30s;
        }

        location /small/ {
            client_max_body_size 4;
            error_page 413 /err413;
            proxy_pass http://127.0.0.1:%%PORT_1%%;
        }

        # the error page goes through the cache too (inherited)
        location = /err413 {
            proxy_pass http://127.0.0.1:%%PORT_2%%;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;

        # the inner request arrives here with the outer one's key, and
        # goes through the cache too
        location / {
            proxy_pass http://127.0.0.1:%%PORT_2%%;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_2%%;

        location / {
            return 200 "inner $request_uri\n";
        }

        location = /err413 {
            return 200 "too large\n";
        }
    }
EOF
$t->start;

# ------------------------------------------------ 1 self-proxy

{
    my $t0 = time;
    my $r = $t->http(method => 'GET', uri => '/loop/a', timeout => 25,
                     headers => [Host => 'localhost']);
    my $secs = time - $t0;
    is($r->{status}, 200, '1 proxied back into itself with the same key: 200');
    like($r->{body} // '', qr{^inner /loop/a}, "... the inner server's answer");
    cmp_ok($secs, '<', 5, sprintf('... in %.2f s, not after the 20 s lock timeout', $secs));
    like($t->error_log, qr/\[info\].*proxied it here, not waiting/,
         '... the inner request saw the mark and did not wait');
}

# ------------------------------------------------ 2 body error + error_page

{
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $t->port,
                                  Timeout => 5) or die "connect: $!";
    # a chunked 10-byte body over a 4-byte limit
    print {$s} "POST /small/x HTTP/1.1\r\nHost: localhost\r\n"
             . "Transfer-Encoding: chunked\r\n\r\n"
             . "a\r\n0123456789\r\n0\r\n\r\n";
    my $got = '';
    my $t0 = time;
    $s->blocking(0);
    while (time - $t0 < 10) {
        my $n = sysread($s, my $buf, 65536);
        last if defined $n && $n == 0;              # closed: done
        $got .= $buf if $n;
        select(undef, undef, undef, 0.02) unless $n;
    }
    my $secs = time - $t0;
    like($got, qr{^HTTP/1\.1 413 }, '2 a 413 body error, error_page into a cached location: 413');
    like($got, qr/too large/, '... the error page');
    cmp_ok($secs, '<', 5, sprintf('... and the connection closed, in %.2f s', $secs));
    close $s;
    is($t->get('/loop/b', Host => 'localhost')->{status}, 200, '... the next request is served');
}

# nginx stops cleanly: no "open socket ... left" alert
$t->stop;
unlike($t->error_log, qr/open socket .* left/, 'no connection left open at shutdown');

$t->done;
