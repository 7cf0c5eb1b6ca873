#!/usr/bin/perl
# The Debian package in the system's own nginx.  Builds it (./build.sh deb:
# dpkg-buildpackage, lintian with no error; DSG_DEB=<file.deb> tests a
# package built before instead), installs it with `apt-get install ./...deb`
# and checks what the package promises: the module in /usr/lib/nginx/modules,
# the mod-*.conf snippet in /usr/share/nginx/modules-available linked from
# /etc/nginx/modules-enabled, the nginx-abi and library dependencies, the
# docs and examples.  As on a fleet host, the system's nginx binary runs
# before the install, with a configuration that includes the system's
# modules-enabled/*.conf and a site in /etc/nginx/conf.d (on a test port;
# pid, logs and temp files in a private prefix: the system's port 80,
# /run/nginx.pid and /var/log/nginx are left alone).  After the install the
# site gets the guard; `nginx -t` of the system's configuration passes with
# the snippet enabled (the guard's directives are unknown unless the module
# is loaded); the running nginx reloads (what the package's nginx-reload
# trigger does to a service), maps the package's .so and serves chats
# through the guard and its cache in front of the mock LLM: a miss, a hit
# from LMDB, a 429 of the per-key quota with Retry-After, /metrics.  Then
# `apt-get remove` (the link is parked as *.removed, nginx -t passes) and
# `apt-get purge` (nothing of the package is left, nginx -t passes): a
# working nginx is left behind.
#
# Runs as root only (it installs a package into the system); skipped under
# the ASan pass (the package holds the plain build, not DSG_MODULE).  No
# service is started or reloaded: a policy-rc.d that answers 101 is put in
# place for the run when the host has none (Debian's way of forbidding
# invoke-rc.d actions; nginx's "nginx-reload" trigger goes through
# invoke-rc.d), and no systemd is needed.  The host is left as found: the
# test site, the package and our policy-rc.d are removed, also when the
# test dies half-way.  An flock on /etc/nginx/nginx.conf (read only, never
# written) serialises concurrent runs on one host.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use DSG::Test;
use Fcntl qw(:flock);
use File::Temp ();
use Time::HiRes qw(sleep time);

my $PKG     = 'libnginx-mod-http-deepseek-guard';
my $SO      = '/usr/lib/nginx/modules/ngx_http_deepseek_guard_module.so';
my $AVAIL   = '/usr/share/nginx/modules-available/mod-http-deepseek-guard.conf';
my $ENABLED = '/etc/nginx/modules-enabled/50-mod-http-deepseek-guard.conf';
my $DOC     = "/usr/share/doc/$PKG";
my $POLICY  = '/usr/sbin/policy-rc.d';
my $NGINX   = '/usr/sbin/nginx';

plan skip_all => 'needs root: installs a package into the system'
    if $> != 0;
plan skip_all => 'the package holds the plain build, not the ASan one'
    if DSG::Test::sanitized();
plan skip_all => 'needs Debian: dpkg, apt-get and /etc/nginx'
    unless -x '/usr/bin/dpkg' && -x '/usr/bin/apt-get' && -d '/etc/nginx'
           && -x $NGINX;

my $repo = DSG::Test->repo;

# one run at a time on this host (the package and /etc/nginx are shared)
open(my $lock, '<', '/etc/nginx/nginx.conf') or die "/etc/nginx/nginx.conf: $!";
{
    my $deadline = time() + 1800;
    until (flock($lock, LOCK_EX | LOCK_NB)) {
        die "another t/80-deb-package.t holds its lock for 30 minutes\n"
            if time() > $deadline;
        sleep 1;
    }
}

sub slurp {
    my ($f) = @_;
    open(my $fh, '<', $f) or return '';
    local $/;
    my $s = <$fh>;
    return defined $s ? $s : '';
}

sub spew {
    my ($f, $data) = @_;
    open(my $fh, '>', $f) or die "cannot write $f: $!";
    print {$fh} $data;
    close $fh or die "cannot write $f: $!";
}

sub tail {
    my ($text, $n) = @_;
    my @l = split /\n/, $text;
    @l = @l[-$n .. -1] if @l > $n;
    return join("\n", @l);
}

my $out_n = 0;
my $tmp = File::Temp::tempdir('dsg-deb-XXXXXX', TMPDIR => 1, CLEANUP => 1);

# (exit status, stdout+stderr) of a command, killed after $timeout seconds
sub run {
    my ($timeout, @cmd) = @_;
    my $out = "$tmp/cmd" . ++$out_n . '.out';
    return DSG::Test::_run_cmd(\@cmd, $out, $timeout,
        { DEBIAN_FRONTEND => 'noninteractive' });
}

# apt-get waits for the dpkg lock (another apt on a busy host) instead of
# failing at once
sub apt {
    my (@args) = @_;
    return run(900, 'apt-get', '-o', 'DPkg::Lock::Timeout=600', '-y', @args);
}

sub installed {
    my ($rc, $s) = run(30, 'dpkg-query', '-W', '-f=${Status}', $PKG);
    return $rc == 0 && $s =~ /install ok installed/;
}

sub nginx_t {
    my ($name) = @_;
    my ($rc, $out) = run(60, $NGINX, '-t');
    ok($rc == 0 && $out =~ /test is successful/, "$name: nginx -t passes")
        or diag($out);
    return $out;
}

plan skip_all => "$PKG is installed on this host already: the test would "
               . "remove it; purge it first"
    if installed();

# --------------------------------------------------------------- cleanup

my $site = '/etc/nginx/conf.d/zz-dsg-deb-test.conf';
my $our_policy = 0;
my $t;

our $ARMED = 0;    # set once the test may have changed the host

sub cleanup {
    return unless $ARMED;
    local ($?, $!, $@);
    eval { $t->stop if $t };
    unlink $site if -e $site;
    if (installed()) {
        my ($rc, $out) = apt('purge', $PKG);
        diag("cleanup: apt-get purge $PKG failed:\n" . tail($out, 20))
            if $rc != 0;
    }
    unlink $POLICY if $our_policy;
    $our_policy = 0;
}

$ARMED = 1;
END { cleanup() }
for my $sig (qw(INT TERM HUP)) {
    $SIG{$sig} = sub { print STDERR "t/80: got SIG$sig\n"; exit 1 };
}

# ------------------------------------------------------------ the package

my $deb = $ENV{DSG_DEB};
if (defined $deb) {
    $deb = "$repo/$deb" unless $deb =~ m{^/};
    ok(-f $deb, "DSG_DEB=$deb exists") or BAIL_OUT("no package to test");
} else {
    my $t0 = time();
    my ($rc, $out) = run(1800, "$repo/build.sh", 'deb');
    ok($rc == 0, sprintf('./build.sh deb: built, lintian has no error (%.0f s)',
                         time() - $t0))
        or diag(tail($out, 60));
    diag($_) for grep { /^[EWI]: / } split /\n/, $out;
    my @debs = grep { !/-dbgsym_/ } glob "$repo/build/${PKG}_*.deb";
    my ($version) = slurp("$repo/debian/changelog") =~ /^\S+ \(([^)]+)\)/;
    ($deb) = grep { /_\Q$version\E_/ } @debs;
    BAIL_OUT("./build.sh deb left no $PKG .deb of version $version in build/")
        unless $rc == 0 && $deb;
}

my ($ctl_rc, $ctl) = run(30, 'dpkg-deb', '-f', $deb, 'Version', 'Depends');
my ($deb_version) = $ctl =~ /^Version: (\S+)/m;
my ($deps) = $ctl =~ /^Depends: (.*)$/m;
$deps //= '';
like($deps, qr/(?:^|, )nginx-abi-[\w.~+-]+(?:,|$)/,
     "Depends has the nginx ABI of this nginx ($deps)");
my ($abi) = slurp('/usr/share/nginx/src/debian/libnginx-mod.abisubstvars')
            =~ /^nginx:abi=(\S+)/m;
SKIP: {
    skip 'nginx-dev not installed: no ABI to compare with', 1
        unless defined $abi;
    like($deps, qr/(?:^|, )\Q$abi\E(?:,|$)/, "... which is $abi");
}
for my $lib (qw(liblmdb0 libjansson4 libssl3 libc6)) {
    like($deps, qr/(?:^|, )\Q$lib\E[ ,(]|(?:^|, )\Q$lib\E$/,
         "Depends has $lib (\${shlibs:Depends})");
}

# ------------------------------------------------------------ the baseline

my %enabled_before = map { $_ => 1 } glob '/etc/nginx/modules-enabled/*';
nginx_t('before the install');

my $run_pid = slurp('/run/nginx.pid');
my $policy_before = -e $POLICY ? 1 : 0;

# no invoke-rc.d action during this test (nginx's reload trigger included)
if (!$policy_before) {
    spew($POLICY, "#!/bin/sh\n# t/80-deb-package.t: no service actions\nexit 101\n");
    chmod 0755, $POLICY;
    $our_policy = 1;
}

# ------------------------------------------------------------ a running nginx

# As on a fleet host, the system's nginx runs before the package comes:
# the system's nginx binary with the system's modules-enabled/*.conf and a
# site in /etc/nginx/conf.d, on a test port; pid, logs and temp files in
# the harness's prefix.  The harness runs nginx with -p <its prefix>; the
# system's nginx resolves the snippet's relative "modules/..." against its
# own prefix (/usr/share/nginx, where modules -> /usr/lib/nginx/modules),
# so -p is dropped: every other path of the test configuration is absolute.
my $wrapper = "$tmp/system-nginx";
spew($wrapper, "#!/bin/sh\n[ \"\$1\" = -p ] && shift 2\nexec $NGINX \"\$@\"\n");
chmod 0755, $wrapper;
{
    local $ENV{NGINX_BIN} = $wrapper;
    $t = DSG::Test->new(workers => 2);
}
$t->mock_start(first_token_ms => 0, token_ms => 0, tokens => 4);
my $port = $t->port;
my $mock = $t->mock_port;
my $prefix = $t->prefix;

my $head = "# written by t/80-deb-package.t of ngx_deepseek_guard_module; "
         . "it removes it\n";
spew($site, $head . <<"EOF");
server {
    listen 127.0.0.1:$port;
    access_log $prefix/logs/site.log;
    location /v1/ {
        proxy_pass http://127.0.0.1:$mock;
    }
}
EOF
{
    local $ENV{DSG_NO_MODULE} = 1;
    $t->write_config("    include /etc/nginx/mime.types;\n"
                   . "    include $site;\n",
                     main => 'include /etc/nginx/modules-enabled/*.conf;');
}
unlike(slurp($t->conf_file), qr/^load_module/m,
       'the test nginx.conf has no load_module line of its own');
ok(eval { $t->start }, "$NGINX started on 127.0.0.1:$port, no guard yet")
    or diag($@);
is($t->chat(content => 'before the package')->{status}, 200,
   '... it proxies a chat to the mock');

# ------------------------------------------------------------ install

{
    my ($rc, $out) = apt('install', $deb);
    ok($rc == 0, "apt-get install $deb") or diag(tail($out, 40));
    BAIL_OUT('install failed') if $rc != 0;
    is(slurp('/run/nginx.pid'), $run_pid,
       'no system nginx service was started (/run/nginx.pid as before)');
}

ok(installed(), "$PKG is installed");
{
    my (undef, $v) = run(30, 'dpkg-query', '-W', '-f=${Version}', $PKG);
    is($v, $deb_version, "... version $deb_version");
}
ok(-f $SO, "the module is at $SO");
{
    my ($rc, $ldd) = run(30, 'ldd', $SO);
    ok($rc == 0 && $ldd !~ /not found/, '... and all its libraries resolve')
        or diag($ldd);
    like($ldd, qr/\Q$_\E/, "... it links $_")
        for qw(liblmdb.so libjansson.so libcrypto.so);
}
is(slurp($AVAIL), "load_module modules/ngx_http_deepseek_guard_module.so;\n",
   "the snippet $AVAIL loads it");
ok(-l $ENABLED && readlink($ENABLED) eq $AVAIL,
   "the snippet is enabled: $ENABLED -> $AVAIL")
    or diag(join ' ', glob '/etc/nginx/modules-enabled/*');
ok(-f "$DOC/examples/gateway.conf", "the example gateway is in $DOC/examples");
ok(-f "$DOC/README.md.gz" || -f "$DOC/README.md", "README is in $DOC");
ok(-f "$DOC/copyright", "copyright is in $DOC");
like(slurp("$DOC/copyright"), qr/BSD-2-Clause/, '... BSD-2-Clause');

# ------------------------------------------------------------ the guard

# A per-key quota of one request a minute (a 429, never queued) and a
# backend zone; the LMDB cache in front of the mock.  A hit needs no
# admission: the same prompt again is answered by the cache, a new one is
# over the quota.
spew($site, $head . <<"EOF");
deepseek_guard_zone dsg_deb_quota:1m key=\$http_authorization rate=1r/m burst=0 status=429;
deepseek_guard_zone dsg_deb_backend:1m key=backend inflight=8 rate=100r/s burst=50;
deepseek_guard_cache_path $prefix/cache keys_zone=dsg_deb_cache:1m max_size=16m;

server {
    listen 127.0.0.1:$port;
    access_log $prefix/logs/site.log;
    deepseek_guard_cache_status_header X-Cache-Status;

    location /v1/ {
        deepseek_guard dsg_deb_quota;
        deepseek_guard dsg_deb_backend;
        deepseek_guard_cache dsg_deb_cache;
        deepseek_guard_cache_valid 200 10m;
        proxy_pass http://127.0.0.1:$mock;
        proxy_http_version 1.1;
    }

    location = /metrics {
        deepseek_guard_metrics;
        allow 127.0.0.1;
        deny all;
    }
}
EOF

{
    nginx_t('the system configuration with the snippet and the guarded site');
    my ($rc, $dump) = run(60, $NGINX, '-T');
    like($dump, qr/^# configuration file \Q$ENABLED\E:\nload_module modules\/ngx_http_deepseek_guard_module\.so;/m,
         'nginx -T: the module is loaded by the package\'s snippet');
    like($dump, qr/^# configuration file \Q$site\E:\n#[^\n]*\ndeepseek_guard_zone /m,
         '... and the guarded site is part of the configuration');
}

# what the package's trigger does to a running nginx service
my ($t_ok, $t_out) = $t->test_config;
ok($t_ok, 'nginx -t of the running nginx\'s configuration') or diag($t_out);
ok($t->reload, 'the running nginx reloads with the module and the guard')
    or diag(tail($t->error_log, 20));

my $m = $t->master_pid;
my ($w) = $t->worker_pids;
like(slurp("/proc/$m/maps"), qr/\Q$SO\E/,
     "its master has the package's $SO mapped");
like(slurp("/proc/$w/maps"), qr/\Q$SO\E/, '... and a new worker');

my $r = $t->chat(content => 'deb package one', key => 'deb-test');
is($r->{status}, 200, 'a chat through the guard: 200') or diag(explain $r);
is($r->{headers}{'x-cache-status'}, 'MISS', '... a cache MISS');
like($r->{body}, qr/"choices"/, '... the mock\'s answer');

my $hit;
$t->wait_until(sub {
    $hit = $t->chat(content => 'deb package one', key => 'deb-test');
    ($hit->{headers}{'x-cache-status'} // '') eq 'HIT';
}, 10);
is($hit->{status}, 200, 'the same chat again: 200');
is($hit->{headers}{'x-cache-status'}, 'HIT', '... a HIT from the LMDB cache');
is($hit->{body}, $r->{body}, '... the same body');

my $over = $t->chat(content => 'deb package two', key => 'deb-test');
is($over->{status}, 429, 'a new prompt over the 1r/m quota: 429');
like($over->{headers}{'retry-after'} // '', qr/^\d+$/,
     '... with Retry-After: ' . ($over->{headers}{'retry-after'} // 'none'));

my $other = $t->chat(content => 'deb package two', key => 'deb-other');
is($other->{status}, 200, 'another key has its own quota: 200');

my $met = $t->metrics;
is($met->{'deepseek_guard_requests_total{zone="dsg_deb_quota",class="default",decision="rejected_429"}'},
   1, '/metrics: one 429 of the quota zone')
    or diag(join "\n", grep { /requests_total/ } sort keys %$met);
cmp_ok($met->{'deepseek_guard_cache_requests_total{cache="dsg_deb_cache",status="hit"}'} // 0,
       '>=', 1, '/metrics: the cache hit');

$t->check_log;    # stops nginx and the mock: no alert in its error.log

# ------------------------------------------------------------ remove, purge

unlink $site;
ok(!-e $site, "the test site $site removed");

{
    my ($rc, $out) = apt('remove', $PKG);
    ok($rc == 0, "apt-get remove $PKG") or diag(tail($out, 40));
    ok(!installed(), '... it is removed');
    ok(!-e $SO, "... $SO is gone");
    ok(!-e $ENABLED && !-l $ENABLED, "... $ENABLED is no longer enabled");
    ok(-l "$ENABLED.removed",
       '... the link is parked as .removed (a reinstall enables it again)');
    nginx_t('after apt-get remove');
}
{
    my ($rc, $out) = apt('purge', $PKG);
    ok($rc == 0, "apt-get purge $PKG") or diag(tail($out, 40));
    my (undef, $st) = run(30, 'dpkg-query', '-W', '-f=${Status}', $PKG);
    $st =~ s/\s+\z//;
    unlike($st, qr/installed|config-files/,
           "... dpkg knows nothing of it ($st)");
    ok(!-e $AVAIL, "... $AVAIL is gone");
    ok(!-e "$ENABLED.removed" && !-l "$ENABLED.removed",
       '... and the parked link');
    is_deeply([sort glob '/etc/nginx/modules-enabled/*'],
              [sort keys %enabled_before],
              '/etc/nginx/modules-enabled is as before the test');
    nginx_t('after apt-get purge');
}

cleanup();
ok(!-e $site && (-e $POLICY ? 1 : 0) == $policy_before,
   'the host is left as found: no test site, policy-rc.d as before');

done_testing();
