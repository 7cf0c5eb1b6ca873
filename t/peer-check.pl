#!/usr/bin/perl
# Reads the peer suite's summary.md (../shared/peer/run.sh) and fails on any
# difference from stock nginx that t/peer-expected.txt does not list.
#
#   perl t/peer-check.pl t/peer-expected.txt OUT/summary.md variant ...
#
# t/peer-expected.txt, one line a file: "<variant> <file.t> <assertions>
# <reason>", <assertions> the numbers that may fail (comma-separated) or
# "all" when the file as a whole may fail (it dies, or plans differently).
# An [alert], [crit], [emerg] or a signal the stock run has not is never
# allowed.

use strict;
use warnings;

my ($list, $summary, @variants) = @ARGV;
die "usage: $0 expected.txt summary.md variant ...\n" unless @variants;

my %allow;    # variant -> file -> { n => 1 } or 'all'
open my $fh, '<', $list or die "$list: $!\n";
while (<$fh>) {
    next if /^\s*(#|$)/;
    my ($v, $f, $which) = split ' ';
    die "$list:$.: expected <variant> <file.t> <assertions> <reason>\n"
        unless defined $which;
    $allow{$v}{$f} = $which eq 'all' ? 'all' : { map { $_ => 1 } split /,/, $which };
}
close $fh;

my (%diff, $v);
open my $sm, '<', $summary or die "$summary: $!\n";
while (<$sm>) {
    if (/^## (\S+) against baseline/) { $v = $1; next }
    next unless defined $v && /^\* `([^`]+)`: (.*)$/;
    $diff{$v}{$1} = $2;
}
close $sm;

my ($bad, $ok) = (0, 0);
for my $v (@variants) {
    for my $f (sort keys %{ $diff{$v} || {} }) {
        my $why = $diff{$v}{$f};
        my $a = $allow{$v}{$f};
        my @new = $why =~ /new failures: ([^,]*(?:,(?! (?:rc|alert|crit|emerg|signal|status) )[^,]*)*)/
                  ? map { /^\s*(\d+)/ ? $1 : () } split /;/, $1 : ();
        my $fatal = $why =~ /\b(?:alert|crit|emerg|signal) \d+ -> \d+/;
        my $listed = $a && ($a eq 'all' || !grep { !$a->{$_} } @new);
        if ($fatal || !$listed) {
            print "peer: NOT ALLOWED: $v $f: $why\n";
            $bad++;
        } else {
            print "peer: allowed ($list): $v $f: $why\n";
            $ok++;
        }
    }
    for my $f (sort keys %{ $allow{$v} || {} }) {
        print "peer: listed but no longer different (shorten the list): $v $f\n"
            unless $diff{$v}{$f};
    }
}

print "peer: $ok allowed difference(s), $bad not allowed\n";
exit($bad ? 1 : 0);
