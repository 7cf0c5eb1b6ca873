#!/usr/bin/perl
# deepseek_guard_classify_keys: the class from a table of exact values (API
# keys) instead of a map.
#
#  - a listed key gets its class, from the block or from an included file;
#  - the value is compared byte for byte: a key in other case, or with a
#    byte more, is not the listed key and gets the default class;
#  - default= of the directive, or "default <class>;" inside the block;
#    no value at all: the default class;
#  - a location's own table replaces the one it would inherit;
#  - the class does what a class does: with the normal share of a zone
#    spent, a critical key is still admitted from the reserve, the same key
#    in other case is not.
# The configuration errors of the directive are in t/22-guard-config.t.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

$t->write_config(<<'EOF');
    deepseek_guard_class critical reserve=20%;
    deepseek_guard_class normal;
    deepseek_guard_class low;

    log_format cls '$http_x_id|$status|$deepseek_guard_status|$deepseek_guard_class';

    deepseek_guard_zone wide:1m  key=$http_authorization rate=100r/s burst=100;
    deepseek_guard_zone tight:1m key=all rate=1r/m burst=10 status=429;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log cls;
        root %%PREFIX%%/html;

        deepseek_guard_classify_keys $http_authorization default=normal {
            "Bearer sk-crit-1"   critical;
            "Bearer sk-low"      low;
            include              %%PREFIX%%/keys.conf;
        }

        location /a {
            deepseek_guard wide;
        }

        location /own {
            deepseek_guard wide;
            deepseek_guard_classify_keys $http_authorization {
                "Bearer sk-low"  critical;
                default          low;
            }
        }

        location /tight {
            deepseek_guard tight;
        }
    }
EOF

{
    # more keys, in a file of their own as an operator keeps them
    open(my $fh, '>', $t->prefix . '/keys.conf') or die "keys.conf: $!";
    print {$fh} qq{# keys of the critical class\n"Bearer sk-crit-2"  CRITICAL;\n};
    close $fh;
}

mkdir $t->prefix . '/html';
for my $f (qw(a own tight)) {
    open(my $fh, '>', $t->prefix . "/html/$f") or die "$f: $!";
    print {$fh} "ok $f\n";
    close $fh;
}
$t->start;

my $id = 0;

# GET with an Authorization value (or none); returns [status, class]
sub ask {
    my ($uri, $auth) = @_;
    my $x = ++$id;
    my $r = $t->get($uri, 'X-Id' => $x,
                    (defined $auth ? (Authorization => $auth) : ()));
    my $cls;
    ok($t->wait_until(sub {
        for (split /\n/, $t->access_log) {
            my ($i, $st, $gs, $c) = split /\|/;
            if (defined $c && $i eq $x) { $cls = $c; return 1; }
        }
        return 0;
    }, 10), "request $x logged") or return [$r->{status}, undef];
    return [$r->{status}, $cls];
}

# ------------------------------------------------------------ the table

my @cases = (
    ['Bearer sk-crit-1',   'critical', 'a key of the block'],
    ['Bearer sk-crit-2',   'critical', 'a key of the included file'],
    ['Bearer sk-low',      'low',      'a key of a lower class'],
    ['Bearer SK-CRIT-1',   'normal',   'the key in other case: the default'],
    ['bearer sk-crit-1',   'normal',   'the scheme in other case: the default'],
    ['Bearer sk-crit-1x',  'normal',   'a byte more: the default'],
    ['Bearer sk-crit-',    'normal',   'a byte less: the default'],
    ['Bearer sk-who',      'normal',   'an unknown key: default=normal'],
);
for my $c (@cases) {
    my ($auth, $want, $name) = @$c;
    is_deeply(ask('/a', $auth), [200, $want], "$name: $want");
}
is_deeply(ask('/a', undef), [200, 'normal'], 'no Authorization: the default');

# a location's own table replaces the inherited one, default inside
is_deeply(ask('/own', 'Bearer sk-low'), [200, 'critical'],
          'own table: sk-low is critical there');
is_deeply(ask('/own', 'Bearer sk-crit-1'), [200, 'low'],
          'own table: a key only the server level lists gets its default');

# ------------------------------------------------------------ the reserve

# tight: 10 requests a minute for everyone, of which critical keeps 20%.
# The normal class runs out first; then the critical key is still served
# from the reserve, the same key in other case (normal) is not.
my ($served, $first) = (0, undef);
for (1 .. 12) {
    my $r = ask('/tight', 'Bearer sk-who');
    if ($r->[0] == 200) { $served++; next; }
    $first = $r->[0];
    last;
}
cmp_ok($served, '>=', 1, "normal: $served served before the share ran out");
cmp_ok($served, '<', 10, '... fewer than the whole burst');
is($first, 429, '... then 429');
is_deeply(ask('/tight', 'Bearer SK-CRIT-1'), [429, 'normal'],
          'the critical key in other case: normal, refused');
is_deeply(ask('/tight', 'Bearer sk-crit-1'), [200, 'critical'],
          'the critical key: served from the reserve');
is_deeply(ask('/tight', 'Bearer sk-crit-2'), [200, 'critical'],
          'the included critical key: served from the reserve');

$t->done;
