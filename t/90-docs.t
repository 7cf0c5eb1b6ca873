#!/usr/bin/perl
# The documentation against the code (issue 14).
#
#   1  README.md is under 16 KB and keeps the test command CI runs
#      (.ci/run: ./build.sh test).
#   2  Every directive of the module's command table
#      (ngx_http_deepseek_guard_commands[], parsed from the C source) has a
#      "### <name>" section in docs/directives.md with Syntax:, Default:
#      and Context: lines; the Context line names exactly the contexts of
#      the entry's NGX_HTTP_*_CONF flags; a NGX_CONF_FLAG directive's
#      syntax is "on | off", a NGX_CONF_NOARGS one's is "<name>;".  Every
#      directive section there is in the table (no stale docs).
#   3  Every variable of the module's ngx_http_variable_t arrays is listed
#      in the "## Variables" section of docs/directives.md, and every
#      $deepseek_guard_* named anywhere in the docs is registered.
#   4  A live exposition: nginx with zones, classes with queues and a
#      reserve, an in-flight cap, a cache in front of the mock LLM, dry
#      run, the status page and the metrics location; a request admitted,
#      one rejected (429), a cache miss and a hit; then every metric family
#      of /metrics ("# TYPE" lines) has a "### <name>" section in
#      docs/metrics.md with the same type and labels, and every family
#      documented is in the exposition.  With at least one zone and one
#      cache every family is exported, zero series included (metrics.md,
#      "Which families appear"), so the comparison is exact.  Every other
#      deepseek_guard_* name in metrics.md is a series of a family seen in
#      the exposition (_bucket, _sum, _count), a directive or a variable.
#   5  The relative links of README.md, docs/*.md, bench/README.md,
#      bench/SOAK.md and bench/results/README.md point at files that exist,
#      and their #anchors at headings of the target.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use File::Basename qw(dirname);
use File::Spec;

my $REPO = $DSG::Test::REPO;
my $SRC  = "$REPO/ngx_deepseek_guard_module";

sub slurp {
    my ($file) = @_;
    open(my $fh, '<', $file) or die "cannot read $file: $!";
    local $/;
    my $s = <$fh>;
    close $fh;
    return $s;
}

# { name => text } of the "### name" sections of a markdown text (up to the
# next heading of any level); the text of a heading that repeats is kept
# under "name (2)" so that duplicates can be told
sub h3_sections {
    my ($md) = @_;
    my %s;
    my @parts = split /^(#{1,6}) +(.*?)[ \t]*$/m, $md;
    shift @parts;
    while (my ($hashes, $title, $body) = splice(@parts, 0, 3)) {
        next unless length $hashes == 3;
        my $k = $title;
        $k .= ' (2)' while exists $s{$k};
        $s{$k} = $body // '';
    }
    return \%s;
}

# the text of the "## $title" section (up to the next "## " heading)
sub h2_section {
    my ($md, $title) = @_;
    return $md =~ /^## \Q$title\E[ \t]*\n(.*?)(?=^## |\z)/ms ? $1 : undef;
}

# ------------------------------------------------------------ the sources

# the command table: where the re-cut of the C files puts it, in
# ngx_http_deepseek_guard_module.c or another file of the module
my @c_files = sort glob("$SRC/*.c");
ok(@c_files, 'the module\'s C files are there') or BAIL_OUT("no $SRC/*.c");

my @tables;
for my $f ("$SRC/ngx_http_deepseek_guard_module.c",
           grep { !/ngx_http_deepseek_guard_module\.c$/ } @c_files)
{
    next unless -f $f;
    my $c = slurp($f);
    while ($c =~ /ngx_command_t\s+ngx_http_deepseek_guard_commands\[\]\s*=\s*\{(.*?)\n\s*ngx_null_command/sg) {
        push @tables, [$f, $1];
    }
}
is(scalar @tables, 1, 'one command table ngx_http_deepseek_guard_commands[]')
    or BAIL_OUT('cannot find the command table');

my %ctx_of_flag = (
    NGX_HTTP_MAIN_CONF => 'http',
    NGX_HTTP_SRV_CONF  => 'server',
    NGX_HTTP_LOC_CONF  => 'location',
    NGX_HTTP_UPS_CONF  => 'upstream',
    NGX_HTTP_SIF_CONF  => 'if in server',
    NGX_HTTP_LIF_CONF  => 'if in location',
    NGX_HTTP_LMT_CONF  => 'limit_except',
);
my @ctx_order = ('http', 'server', 'location', 'upstream', 'if in server',
                 'if in location', 'limit_except');

my (%dir, @dir_order);
{
    my $body = $tables[0][1];
    my $n_strings = () = $body =~ /ngx_string\(/g;
    while ($body =~ /\{\s*ngx_string\("([^"]+)"\)\s*,\s*([^,]+),/g) {
        my ($name, $flags) = ($1, $2);
        $flags =~ s/\s+//g;
        my @f = split /\|/, $flags;
        my @ctx = grep { defined } map { $ctx_of_flag{$_} } @f;
        my %has = map { $_ => 1 } @ctx;
        $dir{$name} = {
            flags => { map { $_ => 1 } @f },
            ctx   => [grep { $has{$_} } @ctx_order],
        };
        push @dir_order, $name;
    }
    is(scalar @dir_order, $n_strings,
       'every entry of the command table parsed (' . scalar(@dir_order)
       . ' directives)');
    cmp_ok(scalar @dir_order, '>=', 20, '... at least 20 of them');
    ok(!grep({ !@{ $dir{$_}{ctx} } } @dir_order),
       '... each with at least one NGX_HTTP_*_CONF context');
}

# the variables: the ngx_http_variable_t arrays of every C file (the
# directives deepseek_guard_status, _class and _zone are also variables:
# only the arrays count here)
my %var;
for my $f (@c_files) {
    my $c = slurp($f);
    while ($c =~ /ngx_http_variable_t\s+\w+\[\]\s*=\s*\{(.*?)\n\};/sg) {
        my $body = $1;
        $var{$1} = 1 while $body =~ /ngx_string\("(deepseek_guard_\w+)"\)/g;
    }
}
cmp_ok(scalar keys %var, '>=', 8,
       'variables found in ngx_http_variable_t arrays: '
       . join(' ', map { "\$$_" } sort keys %var));

# ------------------------------------------------------------ 1 README

my $readme = slurp("$REPO/README.md");
my $size = -s "$REPO/README.md";
cmp_ok($size, '<', 16384, "README.md is under 16 KB ($size bytes)");
like($readme, qr/^\.\/build\.sh test\b/m,
     'README.md has the test command line ./build.sh test');

# ------------------------------------------------------------ 2 directives

my $dmd = slurp("$REPO/docs/directives.md");
my $dsec = h3_sections($dmd);

for my $name (@dir_order) {
    my $d = $dir{$name};
    my $s = $dsec->{$name};
    ok(defined $s, "directives.md: section $name") or next;
    ok(!exists $dsec->{"$name (2)"}, "... only once");

    my ($syntax)  = $s =~ /^[ \t]*Syntax:[ \t]+(.+?)[ \t]*$/m;
    my ($default) = $s =~ /^[ \t]*Default:[ \t]+(.+?)[ \t]*$/m;
    my ($context) = $s =~ /^[ \t]*Context:[ \t]+(.+?)[ \t]*$/m;
    ok(defined $syntax && $syntax =~ /^\Q$name\E(?:[ ;]|$)/,
       "... Syntax: $name ...") or diag('Syntax: ' . ($syntax // 'missing'));
    ok(defined $default, '... Default:');
    my $want = join(', ', @{ $d->{ctx} });
    is($context, $want, "... Context: $want");

    if ($d->{flags}{NGX_CONF_FLAG}) {
        like($syntax // '', qr/^\Q$name\E on \| off;$/,
             '... a flag: on | off');
    }
    if ($d->{flags}{NGX_CONF_NOARGS}) {
        is($syntax, "$name;", '... no arguments');
    }
}

# no stale directive: every "### deepseek_guard..." section is in the table
for my $h (sort keys %$dsec) {
    next unless $h =~ /^deepseek_guard\w*(?: \(2\))?$/;
    (my $n = $h) =~ s/ \(2\)$//;
    ok($dir{$n}, "directives.md: section $h is in the command table");
}
# and no Syntax: line outside a directive's section
{
    my $n = () = $dmd =~ /^[ \t]*Syntax:/mg;
    is($n, scalar @dir_order,
       'directives.md: one Syntax: line per directive, no other');
}

# ------------------------------------------------------------ 3 variables

my $vsec = h2_section($dmd, 'Variables');
ok(defined $vsec, 'directives.md: section Variables') and do {
    for my $v (sort keys %var) {
        like($vsec, qr/`\$\Q$v\E`/, "directives.md, Variables: \$$v");
    }
    my %listed = map { $_ => 1 } $vsec =~ /^\|\s*`\$(deepseek_guard_\w+)`/mg;
    for my $v (sort keys %listed) {
        ok($var{$v}, "directives.md, Variables: \$$v is registered");
    }
};

my @docs = ("$REPO/README.md", sort glob("$REPO/docs/*.md"));
{
    my %stale;
    for my $f (@docs) {
        my $text = slurp($f);
        while ($text =~ /\$(deepseek_guard_\w+)/g) {
            $stale{"$1 (" . File::Spec->abs2rel($f, $REPO) . ')'} = 1
                unless $var{$1};
        }
    }
    is(join(', ', sort keys %stale), '',
       'every $deepseek_guard_* in README.md and docs/*.md is registered');
}

# ------------------------------------------------------------ 5 links

# GitHub's anchors of the headings of a markdown text
sub anchors {
    my ($md) = @_;
    $md =~ s/^```.*?^```//msg;
    my (%a, %seen);
    for my $h ($md =~ /^#{1,6} +(.+?)[ \t]*$/mg) {
        my $s = lc $h;
        $s =~ s/[^\w\- ]//g;
        $s =~ tr/ /-/;
        my $k = $s;
        $k = $s . '-' . $seen{$s} if $seen{$s};
        $seen{$s}++;
        $a{$k} = 1;
    }
    return \%a;
}

for my $f (grep { -f } @docs, map { "$REPO/bench/$_" }
           qw(README.md SOAK.md results/README.md))
{
    my $rel = File::Spec->abs2rel($f, $REPO);
    my $md = slurp($f);
    (my $text = $md) =~ s/^```.*?^```//msg;
    my @bad;
    while ($text =~ /\]\(([^)\s]+)\)/g) {
        my $link = $1;
        next if $link =~ m{^[a-z]+:}i;
        my ($path, $frag) = $link =~ /^([^#]*)(?:#(.*))?$/;
        my $target = length $path
                   ? File::Spec->catfile(dirname($f), $path) : $f;
        if (!-e $target) {
            push @bad, "$link (no such file)";
            next;
        }
        next unless defined $frag && length $frag;
        if (-d $target || $target !~ /\.md$/) {
            push @bad, "$link (an anchor into something not markdown)";
            next;
        }
        push @bad, "$link (no such heading)"
            unless anchors(slurp($target))->{$frag};
    }
    is(join(', ', @bad), '', "$rel: every relative link resolves");
}

# ------------------------------------------------------------ 4 metrics

my $mmd = slurp("$REPO/docs/metrics.md");
my $msec = h3_sections($mmd);
my %mdoc;
for my $h (keys %$msec) {
    next unless $h =~ /^deepseek_guard_\w+$/;
    my $s = $msec->{$h};
    my ($type)   = $s =~ /^[ \t]*Type:[ \t]+(\S+)[ \t]*$/m;
    my ($labels) = $s =~ /^[ \t]*Labels:[ \t]+(.+?)[ \t]*$/m;
    $mdoc{$h} = {
        type   => $type,
        labels => join(',', sort split /\s*,\s*/, $labels // ''),
    };
}
cmp_ok(scalar keys %mdoc, '>=', 20,
       'metrics.md documents ' . scalar(keys %mdoc) . ' metric families');

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

# every feature at once: two classes (one with a reserve), a per-key quota
# (429) and a capacity zone with an in-flight cap and queues, a cache with
# canonical JSON, stale answers and a status header, dry run, the
# RateLimit headers, heap trimming, the metrics location and the status
# page
$t->write_config(<<'EOF');
    map $http_authorization $cls {
        "~^Bearer c"    critical;
        default         normal;
    }

    deepseek_guard_class critical reserve=20% queue=4 queue_timeout=5s;
    deepseek_guard_class normal   queue=8 queue_timeout=5s;

    deepseek_guard_zone quota:1m   key=$http_authorization rate=1r/m burst=1
                                   status=429;
    deepseek_guard_zone backend:1m key=backend inflight=8 rate=100r/s
                                   burst=50;
    deepseek_guard_zone tpm:1m     key=$http_authorization
                                   tokens=100000/m;

    # a fleet zone, its Redis away (nothing listens on port 1): the fleet
    # families are exported all the same
    deepseek_guard_fleet redis=127.0.0.1:1 nodes=2;
    deepseek_guard_zone fleetq:1m  key=$http_authorization rate=60r/m
                                   status=429 fleet=on;

    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m max_size=16m
                              inactive=1m;
    deepseek_guard_malloc_trim 1s;

    server {
        listen 127.0.0.1:%%PORT%%;

        deepseek_guard_classify $cls default=normal;

        location /v1/ {
            deepseek_guard quota;
            deepseek_guard backend;
            deepseek_guard tpm;
            deepseek_guard_ratelimit_headers on;
            deepseek_guard_openai_headers on;
            deepseek_guard_log_level notice;

            deepseek_guard_cache llm;
            deepseek_guard_cache_valid 200 1m;
            deepseek_guard_cache_use_stale overload updating;
            deepseek_guard_cache_lock_timeout 10s;
            deepseek_guard_cache_max_entry_size 1m;
            deepseek_guard_cache_json_canonical on;
            deepseek_guard_cache_methods POST;
            deepseek_guard_cache_credentials separate;
            deepseek_guard_cache_bypass $http_x_bypass;
            deepseek_guard_cache_status_header X-Cache-Status;

            proxy_pass http://%%MOCK%%;
        }

        location /dry/ {
            deepseek_guard backend;
            deepseek_guard_dry_run on;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location = /metrics {
            deepseek_guard_metrics;
            allow 127.0.0.1;
            deny all;
        }

        location = /status {
            deepseek_guard_status;
            allow 127.0.0.1;
            deny all;
        }
    }
EOF
$t->start;

# a miss (admitted), its repeat (a hit, which costs no token), then new
# prompts of the same key until its quota (1r/m, a small burst, 80% of it
# for its class) is spent: a 429 within a few requests
my @r = map { $t->chat(key => 'docs', content => 'one') } 1 .. 2;
is(join(' ', map { $_->{status} } @r), '200 200', 'a prompt and its repeat: 200');
is(DSG::Test::cache_status($r[0]), 'MISS', '... the first is a miss');
is(DSG::Test::cache_status($r[1]), 'HIT', '... the repeat a hit');
my $rej;
for my $i (1 .. 5) {
    my $x = $t->chat(key => 'docs', content => "more $i");
    if ($x->{status} != 200) {
        $rej = $x;
        last;
    }
}
is($rej && $rej->{status}, 429, 'the key is rejected once its quota is spent');
ok($rej && defined $rej->{headers}{'retry-after'}, '... with Retry-After');
is($t->chat(uri => '/dry/chat/completions', content => 'dry')->{status},
   200, 'dry run location answers');
is($t->get('/status?format=json')->{status}, 200,
   'status page location answers');

my $res = $t->get('/metrics');
is($res->{status}, 200, '/metrics answers');
my $text = $res->{body} // '';

my (%type, %labels, %series);
for my $l (split /\n/, $text) {
    if ($l =~ /^# TYPE (\S+) (\S+)$/) {
        $type{$1} = $2;
        next;
    }
    next if $l =~ /^#/ || $l eq '';
    next unless $l =~ /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$/;
    my ($name, $lab) = ($1, $2 // '');
    $series{$name} = 1;
    my $fam = $name;
    $fam =~ s/_(?:bucket|sum|count)$// unless $type{$fam};
    $labels{$fam}{$_} = 1 for grep { $_ ne 'le' && $_ ne 'quantile' }
                                $lab =~ /(\w+)="/g;
}
cmp_ok(scalar keys %type, '>=', 20,
       'the exposition has ' . scalar(keys %type) . ' metric families');

# the sequence above shows in the counters
my $m = $t->metrics;
cmp_ok($m->{'deepseek_guard_requests_total{zone="quota",class="normal",decision="admitted"}'} // 0,
       '>=', 1, 'metrics: quota admitted');
cmp_ok($m->{'deepseek_guard_requests_total{zone="quota",class="normal",decision="rejected_429"}'} // 0,
       '>=', 1, 'metrics: quota rejected_429');
cmp_ok($m->{'deepseek_guard_cache_requests_total{cache="llm",status="miss"}'} // 0,
       '>=', 1, 'metrics: cache misses');
cmp_ok(($m->{'deepseek_guard_cache_requests_total{cache="llm",status="hit"}'} // 0)
       + ($m->{'deepseek_guard_cache_requests_total{cache="llm",status="coalesced"}'} // 0),
       '>=', 1, 'metrics: cache hit');

for my $fam (sort keys %type) {
    my $d = $mdoc{$fam};
    ok($d, "metrics.md: section $fam") or next;
    is($d->{type}, $type{$fam}, "... Type: $type{$fam}");
    my $want = join(',', sort keys %{ $labels{$fam} || {} });
    is($d->{labels}, $want, "... Labels: $want");
}
for my $fam (sort keys %mdoc) {
    ok($type{$fam}, "metrics.md: $fam is in the exposition");
}

# every other deepseek_guard_* name of metrics.md: a series seen, a
# directive or a variable
{
    my %bad;
    while ($mmd =~ /(\$?)(deepseek_guard_\w+)/g) {
        my ($sigil, $n) = ($1, $2);
        next if $sigil ? $var{$n}
                       : ($type{$n} || $series{$n} || $dir{$n});
        $bad{"$sigil$n"} = 1;
    }
    is(join(', ', sort keys %bad), '',
       'metrics.md names no metric, directive or variable that does not exist');
}

$t->done;
