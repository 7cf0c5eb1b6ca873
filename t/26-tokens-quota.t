#!/usr/bin/perl
# The quota test of token budgets: two keys, each with a budget of 20,000
# tokens a minute, send mixed prompts for two minutes (10 B to 200 KB,
# ASCII words and CJK text, with and without max_tokens, JSON answers and
# streams with usage), eight clients a key, each sending again as soon as
# it is refused (after at most 100 ms: demand stays far over the budget).
# The tokens each key really used are the mock LLM's own counts (its
# tokenizer, which the module does not know).  After a 10 s warm-up (the
# bucket's initial 2,000 tokens spent, the estimator corrected), each key's
# use in each of the two following minutes must be within
# [0.85, 1.05] x 20,000.  Prompts whose reservation cannot fit in the
# bucket (tokens_burst=2000) are refused at once as too large, as OpenAI
# refuses a request above its TPM limit: they use nothing.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use POSIX qw(_exit);
use lib 't/lib';
use DSG::Test;

my $BUDGET = 20000;
my $WARMUP = 10;
my $WINDOW = 60;
my $CLIENTS = 8;
my @KEYS = qw(tq-a tq-b);

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 32);
$t->write_config(<<'EOF2');
    log_format tok '$http_authorization $status $deepseek_guard_tokens_reserved '
                   '$deepseek_guard_tokens_used';

    deepseek_guard_zone tpm:4m key=$http_authorization tokens=20000/m
                        tokens_burst=2000 tokens_output=64 status=429;

    server {
        listen 127.0.0.1:%%PORT%%;
        access_log %%PREFIX%%/logs/tok.log tok;
        proxy_http_version 1.1;

        location /v1/ {
            deepseek_guard tpm;
            proxy_pass http://%%MOCK%%;
        }

        location = /metrics {
            deepseek_guard_metrics;
        }
    }
EOF2
$t->start;
$t->mock_reset;

my @SIZES = (10, 100, 300, 1000, 3000, 6000, 20000, 200000);
my $CJK = "\x{4e2d}\x{6587}\x{7684}\x{63d0}\x{793a}\x{8bcd}\x{3002}";
my $WORDS = 'the quick brown fox jumps over a lazy dog and then some more ';

sub prompt {
    my ($bytes, $cjk) = @_;
    my $unit = $cjk ? $CJK : $WORDS;
    my $ulen = $cjk ? 3 * length($CJK) : length($WORDS);
    my $s = $unit x (int($bytes / $ulen) + 1);
    return substr($s, 0, $cjk ? int($bytes / 3) || 1 : $bytes);
}

my $t0 = time;
my $end = $t0 + $WARMUP + 2 * $WINDOW + 1;
my @kids;
for my $key (@KEYS) {
    for my $c (1 .. $CLIENTS) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            srand($c * 7919 + length $key);
            my $i = 0;
            while (time < $end) {
                $i++;
                my $size = $SIZES[int rand @SIZES];
                my $cjk = rand() < 0.4;
                my %o = (key => $key, content => prompt($size, $cjk),
                         timeout => 20);
                $o{max_tokens} = 8 + int rand 96 if rand() < 0.5;
                if (rand() < 0.3) {
                    $o{stream} = 1;
                    $o{extra} = { stream_options =>
                                  { include_usage => JSON::PP::true } };
                }
                my $r = $t->chat(%o);
                if (($r->{status} // 0) != 200) {
                    my $ms = $r->{headers}{'retry-after-ms'} // 100;
                    sleep(($ms < 100 ? $ms : 100) / 1000);
                }
            }
            _exit(0);
        }
        push @kids, $pid;
    }
}

sub used {
    my $s = $t->mock_stats->{tokens_by_key} || {};
    return { map {
        my $k = $s->{"Bearer $_"} || {};
        $_ => ($k->{prompt} // 0) + ($k->{completion} // 0)
              + ($k->{cut_prompt} // 0) + ($k->{completion_delivered} // 0)
    } @KEYS };
}

my @snap;
for my $at ($WARMUP, $WARMUP + $WINDOW, $WARMUP + 2 * $WINDOW) {
    my $wait = $t0 + $at - time;
    sleep $wait if $wait > 0;
    push @snap, [time - $t0, used()];
}
waitpid($_, 0) for @kids;

my $log = DSG::Test::_slurp($t->prefix . '/logs/tok.log');
my %st;
$st{$1}{$2}++ while $log =~ /^Bearer (\S+) (\d+) /mg;
for my $key (@KEYS) {
    note "$key: " . join(', ', map { "$_ x $st{$key}{$_}" } sort keys %{ $st{$key} || {} });
}

for my $key (@KEYS) {
    for my $w (1 .. 2) {
        my ($a, $b) = @snap[$w - 1, $w];
        my $u = $b->[1]{$key} - $a->[1]{$key};
        my $per_min = $u * 60 / ($b->[0] - $a->[0]);
        note sprintf '%s, minute %d (%.1f-%.1f s): %d tokens used, %.0f a '
                   . 'minute, %.3f of the budget', $key, $w, $a->[0], $b->[0],
                   $u, $per_min, $per_min / $BUDGET;
        cmp_ok($per_min, '<=', $BUDGET * 1.05,
               "$key, minute $w: at most 1.05 x the budget");
        cmp_ok($per_min, '>=', $BUDGET * 0.85,
               "$key, minute $w: at least 0.85 x the budget under demand");
    }
}

my $m = $t->metrics;
my %k = map { $_ => $m->{"deepseek_guard_tokens_total{zone=\"tpm\",class=\"default\",kind=\"$_\"}"} // 0 }
        qw(reserved refunded charged used);
note join ', ', map { "$_ $k{$_}" } sort keys %k;
is($k{reserved} - $k{refunded} + $k{charged}, $k{used},
   'reserved - refunded + charged = used');

$t->done;
