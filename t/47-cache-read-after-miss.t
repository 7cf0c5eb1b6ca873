#!/usr/bin/perl
# Read-your-writes across workers: once a client has the whole answer of a
# MISS (Content-Length satisfied), the entry is already committed, so its
# very next request is a HIT whichever worker takes it.  Unbuffered
# proxying sends its last_buf only after the last body bytes went out; a
# store made at last_buf loses this race to a fast client now and then
# (about 1 round in 12 here: the second request finds MISS, or COALESCED
# on the still-held fill lock), so many small rounds show it.  Buffered
# proxying is checked the same way.  With threads= the write commits in
# the thread pool after the answer went out: the next request then waits
# for it on the fill lock, which the write holds until it commits, and is
# answered from the entry (HIT, or COALESCED), never from the upstream.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;

my $t = DSG::Test->new(workers => 2);
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);

$t->write_config(<<'EOF2');
    deepseek_guard_cache_path %%PREFIX%%/cache keys_zone=llm:1m max_size=256m;
    deepseek_guard_cache_path %%PREFIX%%/cache_t keys_zone=llmt:1m
                              max_size=256m threads=default threads_min=0;
    log_format rw '$pid tag=$http_x_tag cache=$deepseek_guard_cache_status';

    server {
        listen 127.0.0.1:%%PORT%% reuseport;
        access_log %%PREFIX%%/logs/access.log rw;
        deepseek_guard_cache_status_header X-Cache-Status;
        deepseek_guard_cache_max_entry_size 8m;
        deepseek_guard_cache_valid 200 10m;
        proxy_http_version 1.1;

        location /v1/ {
            deepseek_guard_cache llm;
            proxy_buffering off;
            proxy_pass http://%%MOCK%%;
        }

        location /thr/ {
            deepseek_guard_cache llmt;
            proxy_buffering off;
            proxy_pass http://%%MOCK%%/v1/;
        }

        location /buf/ {
            deepseek_guard_cache llm;
            proxy_buffering on;
            proxy_pass http://%%MOCK%%/v1/;
        }
    }
EOF2
$t->start;

my $ROUNDS = 200;

for my $loc ('/v1/', '/buf/', '/thr/') {
    my ($hits, @seen) = (0);
    for my $i (1 .. $ROUNDS) {
        my @r = map {
            $t->chat(content => "read after miss $loc $i",
                     uri => "${loc}chat/completions",
                     headers => ['X-Tag' => "$loc$i-$_"],
                     timeout => 20)
        } 1 .. 2;
        my @cs = map { $_->{headers}{'x-cache-status'} // '-' } @r;
        push @seen, "@cs";
        my $from_entry = $loc eq '/thr/' ? qr/^(?:HIT|COALESCED)$/
                                         : qr/^HIT$/;
        $hits++ if $cs[0] eq 'MISS' && $cs[1] =~ $from_entry
                   && $r[0]{body} eq $r[1]{body};
    }
    is($hits, $ROUNDS,
       "$loc: the request right after a MISS is a HIT, $ROUNDS of $ROUNDS")
        or diag join(', ', @seen);
}

# both workers took part (reuseport spreads the connections)
my %pids;
for my $l (split /\n/, $t->access_log) {
    $pids{$1} = 1 if $l =~ /^(\d+) /;
}
is(scalar keys %pids, 2, 'both workers answered');

$t->stop;
done_testing;
