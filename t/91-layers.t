#!/usr/bin/perl
# The glue's call graph against docs/design.md, "Layers" (issue 14).
#
# Every object file of the module (build/nginx/objs/addon/...) is read
# with nm: the functions and data it defines, the symbols it references.
# A reference to a symbol another file of the module defines is a call
# from the one file to the other, and must be an arrow of the list in
# docs/design.md between <!-- layers --> and <!-- /layers -->.  Every
# object file must be named there.  The module variable
# ngx_http_deepseek_guard_module is the one exception: configuration is
# read through it everywhere, as through ngx_http_core_module.
#
# The checker itself is shown to catch an upward and a sideways call, on
# a made-up graph, so the test cannot pass by checking nothing.

use strict;
use warnings;
use FindBin;
use Test::More;

my $repo = "$FindBin::Bin/..";
my $objs = $ENV{DSG_OBJS}
    // "$repo/build/nginx/objs/addon/ngx_deepseek_guard_module";

# the allowed arrows, from the design notes
open my $fh, '<', "$repo/docs/design.md" or die "docs/design.md: $!";
my $doc = do { local $/; <$fh> };
close $fh;
my ($list) = $doc =~ /<!-- layers -->\n(.*?)<!-- \/layers -->/s
    or BAIL_OUT('docs/design.md has no <!-- layers --> list');
my %allow;
for (split /\n/, $list) {
    next unless /^- (\w+) -> (.*)$/;
    $allow{$1}{$_} = 1 for split /,\s*/, $2;
    $allow{$1}{$1} = 1;
}
ok(scalar keys %allow >= 8, 'docs/design.md lists the layers ('
                            . join(' ', sort keys %allow) . ')');

# the part of a file's name that names its layer
sub layer {
    my ($o) = @_;
    return 'dsg' if $o =~ /^dsg_/;
    return $1 if $o =~ /^ngx_http_deepseek_guard_(\w+)\.o$/;
    return undef;
}

# violations of %$allow in a graph: { file => [defined], ... } and
# { file => [referenced], ... }
sub violations {
    my ($allow, $def, $ref) = @_;
    my (%owner, @bad);
    for my $f (keys %$def) {
        $owner{$_} = $f for @{ $def->{$f} };
    }
    for my $f (sort keys %$ref) {
        for my $s (@{ $ref->{$f} }) {
            my $o = $owner{$s} // next;
            next if $o eq $f || $s eq 'ngx_http_deepseek_guard_module';
            my ($lf, $lo) = (layer($f), layer($o));
            push @bad, "$f calls $o ($s)" unless $allow->{$lf}{$lo};
        }
    }
    return @bad;
}

# the checker catches what it must
{
    my %def = ('ngx_http_deepseek_guard_request.o' => ['r_fn'],
               'ngx_http_deepseek_guard_zone.o' => ['z_fn'],
               'ngx_http_deepseek_guard_cache.o' => ['c_fn']);
    my @bad = violations(\%allow, \%def,
                         { 'ngx_http_deepseek_guard_zone.o' => ['r_fn', 'c_fn'],
                           'ngx_http_deepseek_guard_request.o' => ['z_fn'] });
    is_deeply(\@bad, ['ngx_http_deepseek_guard_request.o calls '
                      . 'ngx_http_deepseek_guard_zone.o (z_fn)',
                      'ngx_http_deepseek_guard_zone.o calls '
                      . 'ngx_http_deepseek_guard_request.o (r_fn)',
                      'ngx_http_deepseek_guard_zone.o calls '
                      . 'ngx_http_deepseek_guard_cache.o (c_fn)'],
              'the checker finds upward and sideways calls in a made-up graph');
}

# the module as built
opendir my $dh, $objs or BAIL_OUT("$objs: $! (run ./build.sh first)");
my @o = sort grep { /\.o$/ } readdir $dh;
closedir $dh;
ok(scalar(grep { /^ngx_http_/ } @o) >= 8, scalar(@o) . ' object files in the build');

my (%def, %ref);
for my $o (@o) {
    my $l = layer($o);
    ok(defined $l && $allow{$l}, "$o belongs to a layer of docs/design.md")
        or next;
    for (`nm "$objs/$o"`) {
        if (/^\s+U (\S+)/) {
            push @{ $ref{$o} }, $1;
        } elsif (/^[0-9a-f]+ [TDBR] (\S+)/) {
            push @{ $def{$o} }, $1;
        }
    }
}

my @bad = violations(\%allow, \%def, \%ref);
is(scalar @bad, 0, 'no call against the layers: calls run one way only')
    or diag join("\n", @bad);

# and no circle: the arrows themselves run one way (a topological order)
my %seen;
my %state;
my $cycle = '';
my $visit;
$visit = sub {
    my ($n, @path) = @_;
    return if $cycle;
    if (($state{$n} // 0) == 1) { $cycle = join ' -> ', @path, $n; return }
    return if ($state{$n} // 0) == 2;
    $state{$n} = 1;
    $visit->($_, @path, $n) for grep { $_ ne $n } sort keys %{ $allow{$n} };
    $state{$n} = 2;
};
$visit->($_) for sort keys %allow;
is($cycle, '', 'the layers of docs/design.md have no circle');

done_testing();
