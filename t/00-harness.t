#!/usr/bin/perl
# Self-test of the integration harness t/lib/DSG/Test.pm: module loading,
# the automatic error.log check, reload, and the raw HTTP client.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use POSIX ();
use lib 't/lib';
use DSG::Test;

my $REPO = DSG::Test->repo;

# run a helper script under the harness: (exit code, combined output)
sub run_script {
    my ($env, @args) = @_;
    my $pid = open(my $fh, '-|');
    die "fork: $!" unless defined $pid;
    if (!$pid) {
        $ENV{$_} = $env->{$_} for keys %$env;
        open(STDERR, '>&', \*STDOUT);
        exec { $^X } $^X, "-I$REPO/t/lib", @args
            or POSIX::_exit(127);
    }
    local $/;
    my $out = <$fh>;
    close $fh;
    return ($? >> 8, defined $out ? $out : '');
}

# ------------------------------------------------ a module test needs the module

{
    my $script = "$REPO/t/harness/needs-module.pl";
    my ($rc, $out) = run_script({ DSG_NO_MODULE => '' }, $script);
    is($rc, 0, 'module test passes with the module loaded')
        or diag $out;

    ($rc, $out) = run_script({ DSG_NO_MODULE => 1 }, $script);
    isnt($rc, 0, 'module test fails without the module')
        or diag $out;
    like($out, qr/unknown "deepseek_guard_status" variable/,
         '... because nginx does not know the variable')
        or diag $out;
}

# ------------------------------------------------ automatic error.log check

{
    my $script = "$REPO/t/harness/injected-alert.pl";
    my ($rc, $out) = run_script({}, $script);
    isnt($rc, 0, 'an injected [alert] line fails the test script');
    like($out, qr/^not ok \d+ - error\.log has no alerts$/m,
         '... in the test "error.log has no alerts"') or diag $out;
    like($out, qr/injected by the harness self-test/,
         '... which shows the offending line') or diag $out;

    ($rc, $out) = run_script({}, $script, 'allow');
    is($rc, 0, 'the same line declared with allow_log passes') or diag $out;
    like($out, qr/^ok \d+ - error\.log has no alerts$/m,
         '... in the test "error.log has no alerts"') or diag $out;
}

my $t = DSG::Test->new(workers => 2);

# ------------------------------------------------ config errors

$t->write_config(<<'EOF');
    server {
        listen 127.0.0.1:%%PORT%%;
        bogus_directive on;
    }
EOF
{
    my ($ok, $err) = $t->test_config;
    ok(!$ok, 'nginx -t fails on a bad config');
    my $line = $t->conf_line(qr/bogus_directive/);
    my $file = $t->conf_file;
    like($err, qr/unknown directive "bogus_directive" in \Q$file\E:$line\b/,
         'nginx -t output has the message and file:line') or diag $err;
    ok(!eval { $t->start; 1 }, 'start dies on a bad config');
    like($@, qr/unknown directive/, '... with the reason');
}

# ------------------------------------------------ start, reload, restart

my $big = 'x' x (1024 * 1024);
mkdir $t->prefix . '/html';
open(my $fh, '>', $t->prefix . '/html/big') or die $!;
print {$fh} $big;
close $fh;

$t->write_config(<<'EOF');
    server {
        listen 127.0.0.1:%%PORT%%;
        root %%PREFIX%%/html;

        location / { return 200 "ok"; }
        location /big { }
        location /echo {
            return 200 "$request_method $request_uri $http_host $http_x_test $content_length";
        }
        location /chunked {
            sub_filter_types *;
            sub_filter 'a' 'b';
            return 200 "aaaa";
        }
        location /close { return 444; }
    }
EOF
{
    my ($ok, $err) = $t->test_config;
    ok($ok, 'nginx -t succeeds') or diag $err;
}
$t->start;
ok($t->master_pid, 'master running');
my @w1 = $t->worker_pids;
is(scalar @w1, 2, 'two workers');
my $r = $t->get('/');
is($r->{status}, 200, 'GET / 200');
is($r->{body}, 'ok', 'GET / body');

ok($t->reload, 'reload');
my @w2 = $t->worker_pids;
is(scalar @w2, 2, 'two workers after reload');
ok(!(grep { my $o = $_; grep { $_ == $o } @w2 } @w1), 'worker pids changed');
is($t->get('/')->{body}, 'ok', 'serves after reload');

my $m1 = $t->master_pid;
$t->restart;
isnt($t->master_pid, $m1, 'restart: new master');
is($t->get('/')->{status}, 200, 'serves after restart');

# ------------------------------------------------ HTTP client

$r = $t->http(method => 'POST', uri => '/echo?a=1', body => 'abc',
              headers => ['X-Test' => 'one']);
is($r->{body}, 'POST /echo?a=1 localhost one 3', 'request line, Host, headers, Content-Length');
is($r->{headers}{'content-length'}, length $r->{body}, 'Content-Length header');
is($r->{header_list}[0][0], 'Server', 'header_list keeps names');
like($r->{raw}, qr{^HTTP/1\.1 200 OK\r\n}, 'raw response');
ok($r->{ms} > 0 && $r->{end} >= $r->{start}, 'timing');

$r = $t->post('/echo', '', 'Host' => 'example.org', 'X-Test' => 'two');
is($r->{body}, 'POST /echo example.org two 0', 'post() shortcut, Host override');

$r = $t->get('/chunked');
is($r->{headers}{'transfer-encoding'}, 'chunked', 'chunked response');
is($r->{body}, 'baaa', '... decoded');

$r = $t->http(uri => '/chunked', proto => 'HTTP/1.0');
ok(!exists $r->{headers}{'transfer-encoding'}, 'HTTP/1.0: close-delimited');
is($r->{body}, 'baaa', '... body');

$r = $t->http(method => 'HEAD', uri => '/big');
is($r->{status}, 200, 'HEAD');
is($r->{body}, '', '... no body');

$r = $t->get('/big');
ok($r->{body} eq $big, '1 MB body');

$r = $t->http(uri => '/big', abort_after_bytes => 1000);
ok($r->{aborted}, 'abort_after_bytes: aborted');
is($r->{status}, 200, '... status kept');
ok(length $r->{body} >= 1000 && length $r->{body} < length $big,
   '... body cut');

$r = $t->get('/close');
is($r->{status}, 0, 'closed connection: status 0');
like($r->{error} || '', qr/closed/, '... error');

$r = $t->http(port => $t->port(1), timeout => 2);
is($r->{status}, 0, 'connection refused: status 0');
like($r->{error} || '', qr/connect/, '... error');

{
    my $ls = IO::Socket::INET->new(Listen => 5, LocalAddr => '127.0.0.1',
                                   LocalPort => $t->port(2), ReuseAddr => 1)
        or die "listen: $!";
    $r = $t->http(port => $t->port(2), timeout => 0.5);
    is($r->{status}, 0, 'silent server: status 0');
    like($r->{error} || '', qr/timeout/, '... timeout');
}

$r = $t->chat(content => 'hi', key => 'sk-1', uri => '/echo', max_tokens => 3,
              headers => { 'X-Test' => 'c' });
my $len = length $t->chat_req(content => 'hi', max_tokens => 3)->{body};
is($r->{body}, "POST /echo localhost c $len", 'chat() builds a POST');
is_deeply(DSG::Test->json_decode($t->chat_req(content => 'hi', stream => 1,
                                              max_tokens => 3)->{body}),
          { model => 'deepseek-chat', stream => JSON::PP::true, max_tokens => 3,
            messages => [{ role => 'user', content => 'hi' }] },
          'chat JSON body');

is_deeply([DSG::Test->sse_data("data: a\n\n: c\n\ndata: {\"x\":1}\r\n\r\ndata: [DONE]\n\n")],
          ['a', '{"x":1}', '[DONE]'], 'sse_data');

# ------------------------------------------------ parallel

my @res = $t->parallel([map { { uri => "/echo?$_" } } 1 .. 1000], timeout => 30);
is(scalar(grep { $_->{status} == 200 } @res), 1000, '1000 parallel requests');
is(scalar(grep { $res[$_ - 1]{body} eq "GET /echo?$_ localhost  " } 1 .. 1000),
   1000, '... answers in request order');

@res = $t->parallel([map { { uri => '/', at_ms => $_ * 100 } } 0 .. 3]);
my $t0 = $res[0]{start};
ok((grep { abs(($res[$_]{start} - $t0) - $_ * 0.1) < 0.05 } 0 .. 3) == 4,
   'at_ms offsets') or diag join ' ', map { $_->{start} - $t0 } @res;

@res = $t->parallel([map { { uri => '/' } } 1 .. 20], concurrency => 3);
is(scalar(grep { $_->{status} == 200 } @res), 20, 'concurrency cap');

$t->done;
