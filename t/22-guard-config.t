#!/usr/bin/perl
# deepseek_guard configuration errors: each mistake fails "nginx -t" with a
# message that names the problem and points at the directive's line
# ("in <file>:<line>"); a reload that changes a zone's key is refused and
# the running workers keep serving.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# A valid configuration; every case below changes one thing in it.  %%A%%
# is an extra line at http level (before the zones), %%Z%% the zone line,
# %%L%% a line inside the guarded location (by default a valid classify).
my $base = <<'EOF';
    deepseek_guard_class critical reserve=20%;
    deepseek_guard_class normal;
%%A%%
%%Z%%

    server {
        listen 127.0.0.1:%%PORT%%;
        root %%PREFIX%%/html;

        location / {
            deepseek_guard z;
%%L%%
        }
    }
EOF
my $zone = 'deepseek_guard_zone z:1m key=$arg_key rate=10r/s burst=5;';
my $classify = '            deepseek_guard_classify $http_x_class default=normal;';

sub conf {
    my (%o) = @_;
    my $c = $base;
    $c =~ s/%%A%%/$o{A} \/\/ ''/e;
    $c =~ s/%%Z%%/$o{Z} \/\/ $zone/e;
    $c =~ s/%%L%%/$o{L} \/\/ $classify/e;
    return $c;
}

# writes the configuration, runs nginx -t; it must fail with a message
# matching $msg that points at the line matching $line_re (or any of the
# lines matching one of @$line_re when it is an array: where several lines
# take part in the mistake)
sub bad {
    my ($name, $msg, $line_re, %o) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $t->config_fails($name, conf(%o), $msg, $line_re);
}

# the base configuration is fine: the failures below come from the one
# change each makes
$t->write_config(conf());
my ($ok, $out) = $t->test_config;
ok($ok, 'the base configuration passes nginx -t') or diag $out;

# ------------------------------------------------------------------ zones

# a location refers to a zone nobody declared
bad('unknown zone', qr/unknown zone "nosuch"/, qr/deepseek_guard nosuch;/,
    L => '            deepseek_guard nosuch;');

bad('rate=abc', qr/invalid rate "rate=abc"/, qr/rate=abc/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key rate=abc;');

# only r/s and r/m exist
bad('rate=10r/h', qr/invalid rate "rate=10r\/h"/, qr/rate=10r\/h/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key rate=10r/h;');

bad('rate=0r/s', qr/invalid rate "rate=0r\/s"/, qr/rate=0r\/s/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key rate=0r/s;');

# a zone needs room for its keys and queue: at least 32k
bad('zone too small', qr/zone "z:4k" is too small/, qr/z:4k/,
    Z => 'deepseek_guard_zone z:4k key=$arg_key rate=10r/s;');

bad('duplicate zone', qr/duplicate zone "z"/, qr/key=\$arg_other/,
    Z => "$zone\n    deepseek_guard_zone z:1m key=\$arg_other rate=1r/s;");

bad('invalid zone parameter', qr/invalid parameter "foo=bar"/, qr/foo=bar/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key rate=10r/s foo=bar;');

bad('missing key', qr/"deepseek_guard_zone" must have "key" parameter/,
    qr/deepseek_guard_zone z:1m rate=10r\/s;/,
    Z => 'deepseek_guard_zone z:1m rate=10r/s;');

bad('none of rate, tokens and inflight', qr/has none of rate=, tokens= and inflight=/,
    qr/deepseek_guard_zone z:1m key=\$arg_key burst=5;/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key burst=5;');

bad('status out of range', qr/invalid status "status=302"/, qr/status=302/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key rate=1r/s status=302;');

bad('burst=abc', qr/invalid burst value "burst=abc"/, qr/burst=abc/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key rate=1r/s burst=abc;');

# critical reserves 20%: normal's share of inflight=4 is 80% of 4 = 3
# slots, fine; with 50% reserved, inflight=1 leaves normal 0 slots: it
# could never be admitted
$base =~ s/reserve=20%/reserve=50%/;
bad('inflight too small for the reserve',
    qr/inflight=1 is too small for the reserved shares/, qr/inflight=1/,
    Z => 'deepseek_guard_zone z:1m key=$arg_key inflight=1;');
$base =~ s/reserve=50%/reserve=20%/;

# ---------------------------------------------------------------- classes

# the default= of a classify must be a declared class
bad('undeclared class', qr/undeclared class "nosuch"/, qr/default=nosuch/,
    L => '            deepseek_guard_classify $http_x_class default=nosuch;');

# deepseek_guard_classify_keys (t/29-guard-classify-keys.t): each
# mistake names the key's own line
my $keys = sub {
    my ($body, $args) = @_;
    $args //= ' default=normal';
    return '            deepseek_guard_classify_keys $http_authorization'
         . "$args {\n$body\n            }";
};
bad('classify_keys: undeclared class', qr/undeclared class "vip"/,
    qr/sk-vip/,
    L => $keys->(qq{                "Bearer sk-a" critical;\n}
               . qq{                "Bearer sk-vip" vip;}));
bad('classify_keys: duplicate key', qr/duplicate key "Bearer sk-a"/,
    qr/sk-a" normal/,
    L => $keys->(qq{                "Bearer sk-a" critical;\n}
               . qq{                "Bearer sk-b" critical;\n}
               . qq{                "Bearer sk-a" normal;}));
bad('classify_keys: a line of three', qr/invalid number of parameters/,
    qr/critical extra/,
    L => $keys->(qq{                "Bearer sk-a" critical extra;}));
bad('classify_keys: an empty key', qr/empty key/, qr/"" critical/,
    L => $keys->(qq{                "" critical;}));
bad('classify_keys: no keys', qr/has no keys/, qr/classify_keys .* \{ \}/,
    L => '            deepseek_guard_classify_keys $http_authorization { }');
bad('classify_keys: undeclared default inside', qr/undeclared class "nosuch"/,
    qr/default nosuch/,
    L => $keys->(qq{                "Bearer sk-a" critical;\n}
               . qq{                default nosuch;}, ''));
bad('classify_keys: two defaults', qr/duplicate default/,
    qr/default low/,
    L => $keys->(qq{                "Bearer sk-a" critical;\n}
               . qq{                default low;}));
bad('classify_keys beside classify', qr/is duplicate/,
    qr/classify_keys/,
    L => $classify . "\n"
       . $keys->(qq{                "Bearer sk-a" critical;}));
bad('classify_keys without a block', qr/has no opening "\{"/,
    qr/classify_keys/,
    L => '            deepseek_guard_classify_keys $http_authorization;');

# 50% + 50% + 50%: the lowest class would get nothing.  The mistake is made
# by the class that takes the total to 100% or more (or, reported at the
# end, the last class): either line is fine, but one must be named.
{
    my $save = $base;
    $base =~ s/^\s+deepseek_guard_class critical reserve=20%;\n//m;
    $base =~ s/^\s+deepseek_guard_class normal;\n//m;
    bad('reserved shares over 100%', qr/reserved shares.*100%/,
        [qr/class b reserve=50%/, qr/class c reserve=50%/],
        A => "    deepseek_guard_class a reserve=50%;\n"
           . "    deepseek_guard_class b reserve=50%;\n"
           . "    deepseek_guard_class c reserve=50%;",
        L => '');
    $base = $save;
}

bad('invalid class parameter', qr/invalid parameter "prio=1"/, qr/prio=1/,
    A => '    deepseek_guard_class batch prio=1;');

bad('reserve=abc', qr/invalid reserve "reserve=abc"/, qr/reserve=abc/,
    A => '    deepseek_guard_class batch reserve=abc;');

bad('duplicate class', qr/class "normal" is duplicate/,
    qr/deepseek_guard_class normal queue=5;/,
    A => '    deepseek_guard_class normal queue=5;');

# --------------------------------------------------- reload with a new key

# A zone keeps its name across a reload but its keys were hashed from
# $arg_a: reinterpreting them as $arg_b values would mix up tenants, so the
# new configuration is refused as a whole; the old workers keep running
# with the old one.
$t->write_config(<<'EOF');
    deepseek_guard_zone z:1m key=$arg_a rate=1r/m status=429;

    server {
        listen 127.0.0.1:%%PORT%%;
        root %%PREFIX%%/html;
        location / { deepseek_guard z; }
    }
EOF
mkdir $t->prefix . '/html';
open(my $fh, '>', $t->prefix . '/html/index.html') or die $!;
print {$fh} "ok\n";
close $fh;
$t->start;

my @before = sort $t->worker_pids;
is($t->get('/?a=1')->{status}, 200, 'reload: zone keyed by $arg_a, 200');
is($t->get('/?a=1')->{status}, 429, '... then 429 for the same a');

$t->write_config(<<'EOF');
    deepseek_guard_zone z:1m key=$arg_b rate=1r/m status=429;

    server {
        listen 127.0.0.1:%%PORT%%;
        root %%PREFIX%%/html;
        location / { deepseek_guard z; }
    }
EOF
$t->allow_log(qr/\[emerg\].*deepseek_guard_zone "z" uses the "\$arg_b" key/);

ok(!$t->reload, 'reload with key=$arg_b for the same zone: refused');
like($t->error_log,
     qr/\[emerg\].*deepseek_guard_zone "z" uses the "\$arg_b" key while previously it used the "\$arg_a" key/,
     '... error.log says which keys');
is_deeply([sort $t->worker_pids], \@before, '... the old workers still run');
is($t->get('/?a=2')->{status}, 200, '... and serve, keyed by $arg_a: a=2 is new');
is($t->get('/?a=1')->{status}, 429, '... a=1 is still limited');

$t->done;
