#!/usr/bin/perl
# Fault injection: a damaged LMDB data file, at startup (beyond what t/46
# covers: random bytes, oversized, shorter than the meta pages, garbage
# lock file, foreign environment, meta pages overwritten) and while nginx
# runs.  What must hold in every case: no answer is ever wrong (every 200
# carries exactly the upstream's bytes for its own prompt: entries are
# validated and their key compared), the service answers, and the cache
# comes back, the damaged file being replaced and logged.
#
#   at startup
#     S1 data pages zeroed, meta pages intact (what a power loss leaves on
#        file systems that zero unwritten blocks): recreated, logged
#     S2 the file cut short at a page boundary, meta pages intact (they
#        name pages past the end): recreated, logged; no worker may die
#        (until b1295b3 every worker died of SIGBUS at init, forever)
#     S3 data.mdb is a directory: cannot be replaced; nginx serves
#        uncached and says so ([alert] "cannot open"), no crash
#   while running
#     R1 data.mdb and lock.mdb unlinked: the workers keep the open files,
#        no crash; a reload starts on fresh files
#     R2 data.mdb truncated to 0: LMDB's reads go through a shared map of
#        the file, so a worker that touches a page past the new end dies
#        of SIGBUS (an LMDB limitation, not the module's); the master
#        respawns it, the empty file is initialized again, the service and
#        the cache are back within seconds
#     R3 meta pages zeroed: workers may crash on the garbage meta (LMDB
#        trusts its meta pages: SIGSEGV, or its assertion "root > 1"
#        aborts); the respawned ones recreate the file
#     R4 data pages zeroed, meta intact: no crash, no wrong answer; the
#        first worker to read a damaged page recreates the file, the other
#        reopens it on its next sweep tick: back without a restart
#     R5 the file cut short while running: a worker that touches a page
#        past the cut dies of SIGBUS (as R2), its request lost, never a
#        wrong answer; the respawned workers find the file short and
#        replace it
#
# A worker that dies mid-request drops that client's connection: a lost
# request, never a wrong answer.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);

# crashes are expected in the phases R2, R3, R5:
# SIGBUS (7) on a page past the end of the file, SIGSEGV (11) or LMDB's
# own assertion, abort() (6: "Assertion 'root > 1' failed in
# mdb_page_search()"), on garbage meta pages.  Each phase checks its own
# part of the log for crashes it does not expect.
$t->allow_log(qr/worker process \d+ exited on signal (?:6|7|11)\b/);
$t->allow_log(qr/shared memory zone "cache" was locked by \d+/);

$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 3);

my $dir = $t->prefix . '/cache';
my $data = "$dir/data.mdb";

$t->write_config(<<"EOF");
    deepseek_guard_cache_path $dir keys_zone=cache:1m max_size=64m;

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        add_header X-Pid \$pid always;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache cache;
        deepseek_guard_cache_valid 200 10m;
        proxy_http_version 1.1;

        location /v1/ {
            proxy_pass http://%%MOCK%%;
        }
    }
EOF

# ------------------------------------------------------------ helpers

my %expect;     # prompt => the upstream's answer
my $fills = 0;
# client timeout; short where a crash loop may leave a connection
# unanswered (accepted by no worker until it times out)
our $TIMEOUT = 5;

sub pad_of { my ($i) = @_; $i % 3 ? 100 : 6000 }

sub ask {
    my ($c, %o) = @_;
    my ($i) = $c =~ /(\d+)$/;
    return $t->chat(content => $c, timeout => $o{timeout} // $TIMEOUT,
                    headers => ['X-Mock-Pad' => pad_of($i // 1)]);
}

# the cache status a client saw ('-': none), COALESCED counted as a HIT
sub xcs { DSG::Test::cache_status($_[0], '-') }

# 60 entries, a third of them 6 KB (overflow pages): a data file of
# ~400 KB, most of it past the meta pages
sub fill {
    $fills++;
    for my $i (1 .. 60) {
        my $c = "fill$fills p$i";
        my $r = ask($c);
        die "fill: $r->{status}" unless $r->{status} == 200;
        $expect{$c} = $r->{body};
    }
    # the sweep writes the data file out once a second
    sleep 1.2;
    return map { "fill$fills p$_" } 1 .. 60;
}

# asks each prompt once; counts statuses and wrong answers (a 200 whose
# body is not the upstream's answer to that very prompt); with $first_fail
# it stops at the first request that is not a 200
sub round {
    my (@prompts) = @_;
    my $first_fail = ref $prompts[0] eq 'HASH' ? shift(@prompts)->{first_fail} : 0;
    my %s = (ok => 0, lost => 0, other => 0, wrong => 0, hit => 0);
    for my $c (@prompts) {
        last if $first_fail && $s{lost} + $s{other};
        my $r = ask($c);
        if ($r->{status} == 200) {
            $s{ok}++;
            $s{hit}++ if xcs($r) eq 'HIT';
            if (defined $expect{$c} && $r->{body} ne $expect{$c}) {
                $s{wrong}++;
            }
            $expect{$c} //= $r->{body};
        } elsif ($r->{error} && ($r->{error} =~ /closed|reset/)) {
            $s{lost}++;
        } else {
            $s{other}++;
        }
    }
    return \%s;
}

# the cache works in every worker: a new prompt is stored, then 12 asks
# are all HITs, answered by both workers
my $probe = 0;
sub cache_works {
    my $c = 'probe ' . ++$probe;
    my $a = ask($c);
    return 0 unless $a->{status} == 200;
    my (%pids, $hits);
    $hits = 0;
    for (1 .. 12) {
        my $r = ask($c);
        return 0 unless $r->{status} == 200 && $r->{body} eq $a->{body};
        $hits++ if xcs($r) eq 'HIT';
        $pids{ $r->{headers}{'x-pid'} // 0 } = 1;
    }
    return $hits == 12 && keys(%pids) == 2;
}

sub log_since { substr($t->error_log, $_[0]) }
sub crashes { scalar(() = log_since($_[0]) =~ /exited on signal/g) }

my $RECREATED = qr/\[warn\].*deepseek_guard cache "cache": the data file in "\Q$dir\E" was corrupt or incompatible and was recreated/;

# the service is back: a whole round of 200s, nothing lost, no wrong
# answer, within $secs
sub service_back {
    my ($prompts, $secs) = @_;
    my $last;
    my $ok = $t->wait_until(sub {
        $last = round({ first_fail => 1 }, @$prompts[0 .. 9]);
        $last->{ok} == 10;
    }, $secs, 0.2);
    return ($ok, $last);
}

# after a phase that may have left nginx crash-looping: a clean state
sub reset_all {
    $t->stop;
    system('rm', '-rf', $dir);
    $t->start;
}

sub zero_range {
    my ($from, $len) = @_;
    open(my $fh, '+<', $data) or die "$data: $!";
    binmode $fh;
    seek($fh, $from, 0) or die;
    print {$fh} "\0" x $len;
    close $fh or die;
}

$t->start;

# ================================================ at startup

# ------------------------------------------------ S1 zeroed data pages

{
    my @p = fill();
    $t->stop;
    my $size = -s $data;
    zero_range(16384, $size - 16384);
    my $off = length $t->error_log;
    $t->start;
    ok($t->wait_until(sub { log_since($off) =~ $RECREATED }, 5),
       "S1 data pages zeroed ($size bytes, meta intact): recreated, logged");
    my $r = round(@p);
    is("$r->{ok} $r->{wrong} $r->{hit}", '60 0 0',
       '... all 60 answered 200 from upstream, none wrong, none from the damaged file');
    ok(cache_works(), '... the cache stores and hits again');
    is(crashes($off), 0, '... no worker died');
}

# ------------------------------------------------ S2 cut short, meta intact

{
    my @p = fill();
    $t->stop;
    my $size = -s $data;
    # at a page boundary, about half: the meta pages stay valid and name
    # pages that are no longer in the file
    my $cut = int($size / 8192) * 4096;
    truncate($data, $cut) or die "truncate: $!";
    local $TIMEOUT = 2;
    my $off = length $t->error_log;
    my $started = eval { $t->start(timeout => 5); 1 };
    sleep 1.5;
    my $n = crashes($off);
    # (a crash loop until b1295b3: the open did not check the file's size
    # against its last page, every worker died of SIGBUS at init)
    is($n, 0, "S2 data.mdb cut from $size to $cut bytes: no worker dies")
        or diag "$n worker crashes in 1.5 s";
    ok($started && log_since($off) =~ $RECREATED, '... recreated, logged');
    my $r = round({ first_fail => 1 }, @p[0 .. 9]);
    is("$r->{ok} $r->{wrong} $r->{hit}", '10 0 0',
       '... answered from upstream, none wrong, none from the old file');
    ok(cache_works(), '... the cache works');
    reset_all();
}

# ------------------------------------------------ S3 data.mdb is a directory

{
    $t->stop;
    system('rm', '-rf', $dir);
    mkdir $dir or die;
    mkdir $data or die;
    # the one alert this phase expects: the cache cannot be opened
    $t->allow_log(qr/\[alert\].*deepseek_guard cache "cache": cannot open "\Q$dir\E": .*serving uncached/);
    my $off = length $t->error_log;
    $t->start;
    ok($t->wait_until(sub { log_since($off) =~ /cannot open "\Q$dir\E".*serving uncached/ }, 5),
       'S3 data.mdb is a directory: "cannot open ... serving uncached" logged');
    my $c = 'S3 uncached';
    my @r = map { ask($c) } 1 .. 4;
    is(scalar(grep { $_->{status} == 200 && $_->{body} eq $r[0]{body} } @r), 4,
       '... requests are answered');
    is(join(' ', map { xcs($_) } @r), 'MISS MISS MISS MISS', '... uncached');
    is(crashes($off), 0, '... no worker died');
    $t->stop;
    rmdir $data or die;
    $t->start;
    ok(cache_works(), '... once it is removed, a restart brings the cache back');
}

# ================================================ while running

# ------------------------------------------------ R1 files unlinked

{
    my @p = fill();
    my $off = length $t->error_log;
    unlink $data, "$dir/lock.mdb";
    my $r = round(@p);
    is("$r->{ok} $r->{wrong} $r->{hit}", '60 0 60',
       'R1 data.mdb and lock.mdb unlinked while running: the workers keep '
       . 'serving their open file (60 HITs)');
    ok($t->reload, '... reload');
    ok(-s $data, '... the new workers created a new file');
    $r = round(@p[0 .. 9]);
    is("$r->{ok} $r->{wrong} $r->{hit}", '10 0 0', '... which starts empty');
    ok(cache_works(), '... and works');
    is(crashes($off), 0, '... no worker died');
}

# ------------------------------------------------ R2 truncated to 0

{
    my @p = fill();
    my $off = length $t->error_log;
    truncate($data, 0) or die "truncate: $!";
    my $r1 = round(@p[0 .. 19]);
    my ($back, $r) = service_back(\@p, 10);
    ok($back, 'R2 data.mdb truncated to 0 while running: the service is back')
        or diag explain $r;
    is($r1->{wrong} + $r->{wrong}, 0, '... never a wrong answer');
    cmp_ok($r1->{lost}, '<=', 2, "... at most a request per worker lost to a crash ($r1->{lost})");
    is($r1->{other}, 0, '... no error status');
    diag 'R2: ' . crashes($off) . ' worker(s) died of SIGBUS (LMDB maps the file)';
    cmp_ok(crashes($off), '<=', 2, '... each worker died at most once: no crash loop');
    ok($t->wait_until(\&cache_works, 5), '... and the cache works again');
}

# ------------------------------------------------ R3 meta pages zeroed

{
    reset_all();
    my @p = fill();
    my $off = length $t->error_log;
    zero_range(0, 8192);
    my $r1 = round(@p[0 .. 19]);
    my ($back, $r) = service_back(\@p, 10);
    ok($back, 'R3 meta pages zeroed while running: the service is back')
        or diag explain $r;
    is($r1->{wrong} + $r->{wrong}, 0, '... never a wrong answer');
    is($r1->{other}, 0, '... no error status');
    diag 'R3: ' . crashes($off) . ' worker(s) died on the zeroed meta pages';
    cmp_ok(crashes($off), '<=', 2, '... no crash loop');
    ok($t->wait_until(\&cache_works, 5), '... and the cache works again');
    like(log_since($off), $RECREATED, '... the file was recreated, logged')
        if crashes($off);
}

# ------------------------------------------------ R4 data pages zeroed

{
    reset_all();
    my @p = fill();
    my $size = -s $data;
    my $off = length $t->error_log;
    zero_range(16384, $size - 16384);
    my $r = round(@p);
    is("$r->{ok} $r->{wrong} $r->{other}", '60 0 0',
       'R4 data pages zeroed while running: all 60 answered 200, none wrong');
    is(crashes($off), 0, '... no worker died');
    like(log_since($off), qr/\[error\].*deepseek_guard cache "cache": read failed/,
         '... the failing reads are logged');
    like(log_since($off), $RECREATED, '... the worker that found it recreated the file, logged');
    ok($t->wait_until(\&cache_works, 5), '... the cache comes back without a restart');
    # the other worker reopens the new file within a sweep tick (1 s)
    my $n = () = log_since($off) =~ /$RECREATED/g;
    is($n, 1, '... recreated once, not once per worker');
    my $errs = () = log_since($off) =~ /read failed|response not stored/g;
    cmp_ok($errs, '<=', 8, "... a few failing reads logged ($errs), not one per request");
    my $rel = length $t->error_log;
    ok($t->reload, '... reload');
    ok(cache_works(), '... after a reload the cache works');
    unlike(log_since($rel), $RECREATED, '... on the repaired file: not recreated again');
}

# ------------------------------------------------ R5 cut short while running

{
    reset_all();
    my @p = fill();
    my $size = -s $data;
    my $cut = int($size / 8192) * 4096;
    my $off = length $t->error_log;
    truncate($data, $cut) or die "truncate: $!";
    local $TIMEOUT = 2;
    # Whether an entry can still be read depends on where LMDB put the
    # pages on its path (leaves and branches are copied on every write,
    # into pages freed earlier or at the end): the layout follows the
    # keys' digests, not the order of the stores.  So each of the first
    # 10 is answered whole or loses its connection to the worker's
    # SIGBUS; never a wrong answer, never an error status.
    my $r1 = round(@p[0 .. 9]);
    note("R5: of the first 10 entries, $r1->{ok} answered, $r1->{lost} "
         . 'lost to a crash');
    is("$r1->{wrong} $r1->{other}", '0 0',
       "R5 data.mdb cut from $size to $cut bytes while running: the first "
       . '10 entries answered whole or lost to a crash, none wrong');
    # a store: its write transaction reads the B-tree pages written last,
    # past the cut
    my $st = ask('R5 store');
    ok($st->{status} == 200 || ($st->{error} // '') =~ /closed|reset|timeout/,
       '... a store: answered, or its connection lost to the worker\'s crash');
    # the workers that touch a page past the cut die of SIGBUS (LMDB maps
    # the file); the respawned ones find the file short and recreate it
    my ($back, $r) = service_back([@p[50 .. 59]], 5);
    ok($back, '... the service is back') or diag explain $r;
    is($r1->{wrong} + ($r->{wrong} // 0), 0, '... never a wrong answer');
    ok($t->wait_until(\&cache_works, 5), '... and the cache works again');
    diag 'R5: ' . crashes($off) . ' worker(s) died of SIGBUS';
    cmp_ok(crashes($off), '<=', 2, '... each worker died at most once: no crash loop')
        or diag crashes($off) . ' crashes';
    like(log_since($off), $RECREATED, '... the file was recreated, logged')
        if crashes($off);
    reset_all();
    ok(cache_works(), 'after a restart on a removed directory: the cache works');
}

$t->done;
