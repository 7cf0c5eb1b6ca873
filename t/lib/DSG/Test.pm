package DSG::Test;

# Integration-test harness of ngx_deepseek_guard_module.
#
# Starts the real nginx binary (env NGINX_BIN, default /usr/sbin/nginx) with
# load_module of the built module (env DSG_MODULE, default
# <repo>/build/ngx_http_deepseek_guard_module.so) in a private temporary
# prefix, runs the mock LLM upstream (t/mock/mock_llm.py) and talks HTTP/1.1
# to both over raw non-blocking sockets.  Core Perl only.
#
#   use Test::More;
#   use lib 't/lib';
#   use DSG::Test;
#
#   my $t = DSG::Test->new(workers => 2);
#   $t->mock_start(capacity => 10);
#   $t->write_config(<<'EOF');
#       server {
#           listen 127.0.0.1:%%PORT%%;
#           location /v1/ { proxy_pass http://%%MOCK%%; }
#       }
#   EOF
#   $t->start;
#   is($t->chat(content => 'hi')->{status}, 200, 'chat');
#   $t->done;
#
# Environment: NGINX_BIN, DSG_MODULE, DSG_NO_MODULE=1 (no load_module line),
# DSG_KEEP=1 (keep the prefix, its path is printed), DSG_PYTHON (default
# /usr/bin/python3), DSG_MOCK (default <repo>/t/mock/mock_llm.py),
# DSG_NGINX_PRELOAD (LD_PRELOAD of the nginx processes only, never of perl
# or the mock: the sanitizer runtimes for an ASan build of the module, see
# ./build.sh test-asan; ASAN_OPTIONS and UBSAN_OPTIONS pass through the
# environment).  Sanitizer reports in error.log fail check_log like alerts.
#
# Many concurrent connections need `ulimit -n` >= 4096; the harness raises
# its own soft RLIMIT_NOFILE up to the hard limit (at most 65536) when loaded.
#
# API summary (see each sub for details):
#   new(workers => 2, log_level => 'info')   port  port(N)  prefix  repo
#   mock_start(name => 'llm', capacity, first_token_ms, token_ms, tokens,
#              quiet => 1, args => [...])    mock_port mock_pid mock_log
#   mock_stats mock_reset mock_config({...}) mock_stop          ($name = 'llm')
#   write_config($http, main => '...')       conf_file  conf_line(qr//)
#   test_config -> (ok, output)   start  reload -> bool  restart  stop
#   master_pid  worker_pids  error_log  access_log  allow_log(qr//)
#   bad_log_lines  check_log (the alert test, no done_testing)  done
#   DSG::Test::sanitized (true under ./build.sh test-asan: bounds on the
#   time and memory an nginx worker takes may be loosened, never dropped)
#   http(%o)  get($uri, %h)  post($uri, $body, %h)  chat(%o)  chat_req(%o)
#   parallel(\@reqs, timeout => s, concurrency => n)
#   sse_data($body)  json_decode  json_encode  wait_until(sub {...}, secs)
#
# Redis and fleets of nodes (section "redis"; fleet zones, t/39-fleet-*.t):
#   redis_start(password => , args => [...], port => , timeout => ) -> port
#       a real redis-server (env DSG_REDIS_SERVER, default redis-server) on
#       a free 127.0.0.1 port, --save '' --appendonly no --dir <prefix>,
#       --requirepass with password; returns once PING answers; stopped by
#       check_log, done and cleanup, like the mocks
#   DSG::Test::have_redis -> true when both binaries are there (skip_all)
#   redis_port  redis_pid  redis_password  redis_log  redis_stop
#   redis_cli(@args) -> output (trailing newline removed): redis-cli -h
#       127.0.0.1 -p PORT [-a password] @args (env DSG_REDIS_CLI); a first
#       argument { timeout => s, password => p (undef: none) } overrides
#   redis_ping -> true when PING answers +PONG (AUTH first if a password)
#   redis_signal($sig) STOP, CONT, KILL, TERM (KILL and TERM: reaped)
#   redis_restart(%o)  kill -9 if still running, then the same port,
#       password and args again; returns once PING answers
#   fake_server(reply => $bytes, close => 1, name => 'fake') -> port
#       a TCP server that is not Redis: reads, then writes reply (none:
#       silent, never answers) and closes the connection if close;
#       fake_stop($name)
#   DSG::Test->fleet_nodes($n, %new) -> ($t1, ..., $tn): n instances named
#       node1..node<n> (%%NODE%% in their configs) that share the first
#       one's mocks and redis (%%MOCK%%, %%REDIS%%, mock_stats,
#       redis_cli, ... of any node are the first one's; the first one
#       stops them in its check_log: call it last).  share_from($t) makes
#       any instance use $t's mocks and redis the same way.
#   config substitutions: %%REDIS%% (127.0.0.1:port) %%REDIS_PORT%%
#       %%NODE%% (the instance's name, default "node1")
#   name  the instance's name; check_log's test is "<name>: error.log has
#       no alerts" when it was given one (new(name => ...), fleet_nodes)
#   metric($name, $zone) -> one value of scrape() (the series of zone
#       $zone, else the family's only series) or undef
#   DSG::Test::fleet_all(\@nodes, $metric, $want, secs) -> true once the
#       metric is $want on every node (wait_until)
#   DSG::Test::fleet_rate_bound(rate => r/s, secs =>, burst =>, share => %,
#       interval => s, nodes =>) -> the most a key may admit in a tier
#       (docs/fleet.md "The bounds": earned + bucket + credits)
#   html_files(@names) -> html dir: <prefix>/html/<name> files of "ok\n"
#   error_log_size  error_log_since($offset, qr//) -> lines (matching)
#
# Helpers shared by test files (section "helpers"):
#   tagged_req($tag, h => {...}, %chat_req)   a streamed chat with X-Tag
#   cache_chat($tag, %chat) -> response with tag, cache
#   DSG::Test::cache_status($r, $none)  X-Cache-Status, COALESCED as HIT
#   log_by_tag($file, @tags) -> { tag => { k => v } } of a key=value log
#   metrics($uri = '/metrics') -> { 'name{labels}' => value }
#   settle($label, secs, $mock)   test: nothing left in flight at the mock
#   bg_parallel(\@reqs, %parallel) -> $bg   bg_wait($bg) -> [results]
#   DSG::Test::tcp_conns($pid, $up_port, $local_port) -> (up, clients)
#   DSG::Test::sock_inodes($pid), DSG::Test::tcp_table()   what it reads
#   worker_conns($mock_port) -> (pid => [in flight, clients], ...)
#   place($req, mock_port =>, accept => sub { $pid }, admitted =>,
#         timeout =>) -> ($bg, $pid)
#   capacity_is_free($label, n =>, log =>, req =>, timeout =>, hold =>,
#         extra =>, at_ms =>, settle =>, wait =>, extra_wait_ms =>,
#         or_stop =>)   the leak detector of an in-flight cap: 5-6 tests
#
# http() options: method uri headers({} or [name => value, ...] or
#   [[name, value], ...]; an array value repeats the header) body port host
#   timeout(10) proto('HTTP/1.1') abort_after_bytes abort_after_ms
#   request_raw(bytes sent as they are) at_ms(parallel only)
#   read_all(keep reading into raw until the server closes: pipelining)
# Response: status headers(lc => joined ", ") header_list body raw ms start
#   end ttfb_ms first_body_ms version reason; aborted => 1 when cut on
#   purpose; error => text on connect/read failure, timeout or an incomplete
#   response, then status is 0 and got_status holds the status line's code.

use strict;
use warnings;

use Carp qw(croak);
use Config;
use Errno qw(EINPROGRESS EWOULDBLOCK EAGAIN EINTR);
use Fcntl qw(F_GETFL F_SETFL O_NONBLOCK);
use File::Basename qw(dirname);
use File::Path qw(make_path remove_tree);
use File::Spec;
use File::Temp qw(tempdir);
use JSON::PP ();
use POSIX qw(WNOHANG);
use Scalar::Util qw(weaken refaddr blessed);
use Socket qw(PF_INET SOCK_STREAM SOL_SOCKET SO_ERROR IPPROTO_TCP
              TCP_NODELAY inet_aton sockaddr_in);
use Test::More ();
use Time::HiRes qw(time sleep);

our $VERSION = '1.0';

our $REPO = File::Spec->rel2abs(
    File::Spec->catdir(dirname(__FILE__), File::Spec->updir,
                       File::Spec->updir, File::Spec->updir));
$REPO = _canon($REPO);

my %LIVE;           # refaddr => weakened object, for END cleanup
my %USED_PORTS;     # ports handed out by this process
my $JSON = JSON::PP->new->canonical(1)->utf8(1);
my $NOFILE_HARD;    # RLIMIT_NOFILE hard limit, when known

_raise_nofile(65536);

# ---------------------------------------------------------------- utility

sub _canon {
    my ($p) = @_;
    my @out;
    for my $c (split m{/}, $p) {
        next if $c eq '' || $c eq '.';
        if ($c eq '..') { pop @out; next }
        push @out, $c;
    }
    return '/' . join('/', @out);
}

# ASan's shadow memory and quarantine and UBSan's checks make a worker
# slower and bigger than the stock build; tests that bound either scale
# the bound by this factor under the sanitizer build
sub sanitized { $ENV{DSG_NGINX_PRELOAD} ? 1 : 0 }

sub _slurp {
    my ($file) = @_;
    open(my $fh, '<', $file) or return '';
    binmode $fh;
    local $/;
    my $s = <$fh>;
    close $fh;
    return defined $s ? $s : '';
}

sub _spew {
    my ($file, $data) = @_;
    open(my $fh, '>', $file) or croak "cannot write $file: $!";
    binmode $fh;
    print {$fh} $data;
    close $fh or croak "cannot write $file: $!";
}

sub _tail {
    my ($text, $n) = @_;
    $n ||= 30;
    my @l = split /\n/, $text;
    @l = @l[-$n .. -1] if @l > $n;
    return join("\n", @l);
}

# best effort: raise the soft RLIMIT_NOFILE via prlimit64(2)
sub _raise_nofile {
    my ($want) = @_;
    return if $^O ne 'linux';
    my $nr = $Config{archname} =~ /^x86_64/  ? 302
           : $Config{archname} =~ /^aarch64/ ? 261
           : return;
    my $old = "\0" x 16;
    my $rc = eval { syscall($nr, 0, 7, 0, $old) };
    return if !defined $rc || $rc != 0;
    my ($cur, $max) = unpack('QQ', $old);
    $NOFILE_HARD = $max;
    my $new = $want < $max ? $want : $max;
    return if $cur >= $new;
    my $lim = pack('QQ', $new, $max);
    eval { syscall($nr, 0, 7, $lim, 0) };
}

# /proc/<pid>/stat: returns (state, ppid) or ()
sub _stat {
    my ($pid) = @_;
    my $s = _slurp("/proc/$pid/stat");
    return () if $s eq '';
    my $i = rindex($s, ')');
    return () if $i < 0;
    my @f = split ' ', substr($s, $i + 2);
    return ($f[0], $f[1]);
}

sub _alive {
    my ($pid) = @_;
    return 0 unless $pid;
    my ($state) = _stat($pid);
    return defined $state && $state ne 'Z' && $state ne 'X';
}

sub _children {
    my ($ppid) = @_;
    my @kids;
    opendir(my $d, '/proc') or return ();
    for my $pid (readdir $d) {
        next unless $pid =~ /^\d+$/;
        my ($state, $pp) = _stat($pid);
        next unless defined $pp && $pp == $ppid;
        next if $state eq 'Z' || $state eq 'X';
        push @kids, $pid + 0;
    }
    closedir $d;
    return sort { $a <=> $b } @kids;
}

sub _listening {
    my ($port) = @_;
    for my $f ('/proc/net/tcp', '/proc/net/tcp6') {
        for my $line (split /\n/, _slurp($f)) {
            my @c = split ' ', $line;
            next unless @c > 3 && $c[3] eq '0A';
            return 1 if $c[1] =~ /:([0-9A-F]+)$/ && hex($1) == $port;
        }
    }
    return 0;
}

sub _free_port {
    my ($lo_eph) = split ' ', _slurp('/proc/sys/net/ipv4/ip_local_port_range');
    $lo_eph ||= 32768;
    my ($lo, $hi) = (10000, $lo_eph - 1);
    for my $try (1 .. 500) {
        my $p;
        if ($hi - $lo > 1000) {
            $p = $lo + int(rand($hi - $lo));
        } else {
            my $s = _bind_check(0) or next;
            $p = $s;
        }
        next if $USED_PORTS{$p};
        next if _listening($p);
        next unless _bind_check($p);
        $USED_PORTS{$p} = 1;
        return $p;
    }
    croak "DSG::Test: no free port found";
}

# bind 127.0.0.1:$port (no SO_REUSEADDR: TIME_WAIT ports are refused too);
# returns the bound port or 0
sub _bind_check {
    my ($port) = @_;
    socket(my $s, PF_INET, SOCK_STREAM, 0) or return 0;
    bind($s, sockaddr_in($port, inet_aton('127.0.0.1'))) or return 0;
    listen($s, 1) or return 0;
    my ($p) = sockaddr_in(getsockname($s));
    close $s;
    return $p;
}

# run a command, stdout+stderr into a file; returns (exit status, output);
# %$env is added to the command's environment
sub _run_cmd {
    my ($cmd, $out, $timeout, $env) = @_;
    my $pid = fork();
    croak "fork: $!" unless defined $pid;
    if (!$pid) {
        $ENV{$_} = $env->{$_} for keys %{ $env || {} };
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>>', $out) or POSIX::_exit(126);
        open(STDERR, '>&', \*STDOUT) or POSIX::_exit(126);
        exec { $cmd->[0] } @$cmd
            or POSIX::_exit(127);
    }
    my $deadline = time() + ($timeout || 30);
    while (1) {
        my $r = waitpid($pid, WNOHANG);
        return ($?, _slurp($out)) if $r == $pid;
        if (time() > $deadline) {
            kill 'KILL', $pid;
            waitpid($pid, 0);
            return (-1, _slurp($out) . "\n(timed out)\n");
        }
        sleep 0.01;
    }
}

# ---------------------------------------------------------------- object

sub new {
    my ($class, %args) = @_;
    my $self = bless {
        workers   => $args{workers} || 2,
        log_level => $args{log_level} || 'info',
        nginx     => $ENV{NGINX_BIN} || '/usr/sbin/nginx',
        module    => File::Spec->rel2abs($ENV{DSG_MODULE}
                       || "$REPO/build/ngx_http_deepseek_guard_module.so"),
        python    => $ENV{DSG_PYTHON} || '/usr/bin/python3',
        mock_script => $ENV{DSG_MOCK} || "$REPO/t/mock/mock_llm.py",
        owner     => $$,
        ports     => [],
        mocks     => {},
        allow     => [],
        master    => undef,
        keep      => $ENV{DSG_KEEP} ? 1 : 0,
        name      => $args{name},
    }, $class;

    $self->{prefix} = tempdir('dsg-test-XXXXXX', TMPDIR => 1, CLEANUP => 0);
    $self->{prefix} = _canon(File::Spec->rel2abs($self->{prefix}));
    chmod 0755, $self->{prefix};
    make_path(map { "$self->{prefix}/$_" }
              qw(logs client_body_temp proxy_temp fastcgi_temp uwsgi_temp
                 scgi_temp));
    $self->{ports}[0] = _free_port();

    Test::More::diag("DSG::Test prefix kept: $self->{prefix}") if $self->{keep};

    $LIVE{refaddr $self} = $self;
    weaken($LIVE{refaddr $self});

    for my $sig (qw(INT TERM HUP)) {
        next if defined $SIG{$sig} && $SIG{$sig} ne '' && $SIG{$sig} ne 'DEFAULT';
        $SIG{$sig} = sub { print STDERR "DSG::Test: got SIG$sig\n"; exit 1 };
    }
    return $self;
}

sub prefix  { $_[0]{prefix} }
sub name    { $_[0]{name} }
sub workers { $_[0]{workers} }
sub conf_file { "$_[0]{prefix}/nginx.conf" }
sub error_log_file  { "$_[0]{prefix}/logs/error.log" }
sub access_log_file { "$_[0]{prefix}/logs/access.log" }
sub repo { $REPO }

sub port {
    my ($self, $n) = @_;
    $n ||= 0;
    return $self->{ports}[$n] ||= _free_port();
}

# ---------------------------------------------------------------- mock

sub mock_start {
    my ($self, %o) = @_;
    my $name = delete $o{name};
    $name = 'llm' unless defined $name;
    croak "mock '$name' already running" if $self->{mocks}{$name};
    croak "mock name '$name' must match \\w+" unless $name =~ /^\w+$/;
    my $script = $self->{mock_script};
    croak "mock upstream $script not found" unless -f $script;

    my $portfile = "$self->{prefix}/mock-$name.port";
    my $log      = "$self->{prefix}/logs/mock-$name.log";
    unlink $portfile;

    my @cmd = ($self->{python}, $script, '--listen', '127.0.0.1:0',
               '--portfile', $portfile);
    for my $k (qw(capacity first_token_ms token_ms tokens)) {
        next unless defined $o{$k};
        (my $flag = $k) =~ tr/_/-/;
        push @cmd, "--$flag", $o{$k};
    }
    push @cmd, '--quiet' if !defined $o{quiet} || $o{quiet};
    push @cmd, @{ $o{args} } if $o{args};

    my $pid = fork();
    croak "fork: $!" unless defined $pid;
    if (!$pid) {
        delete $ENV{LD_PRELOAD};    # a sanitizer runtime is nginx's only
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>>', $log) or POSIX::_exit(126);
        open(STDERR, '>&', \*STDOUT) or POSIX::_exit(126);
        exec { $cmd[0] } @cmd
            or POSIX::_exit(127);
    }
    my $m = { pid => $pid, portfile => $portfile, log => $log };
    $self->{mocks}{$name} = $m;

    my $deadline = time() + ($o{timeout} || 15);
    while (1) {
        my $p = _slurp($portfile);
        if ($p =~ /^\s*(\d+)\s*$/ && $1 > 0) {
            $m->{port} = $1 + 0;
            return $m->{port};
        }
        if (waitpid($pid, WNOHANG) == $pid) {
            delete $self->{mocks}{$name};
            croak "mock '$name' exited (status $?) before writing its port:\n"
                . _tail(_slurp($log));
        }
        if (time() > $deadline) {
            $self->mock_stop($name);
            croak "mock '$name' did not write $portfile in time:\n"
                . _tail(_slurp($log));
        }
        sleep 0.02;
    }
}

sub _mock {
    my ($self, $name) = @_;
    $name = 'llm' unless defined $name;
    my $m = $self->{mocks}{$name};
    # an instance of a fleet uses the first node's mocks (share_from)
    return $self->{peer}->_mock($name) if !$m && $self->{peer};
    croak "mock '$name' is not running" unless $m;
    return $m;
}

sub mock_port { $_[0]->_mock($_[1])->{port} }
sub mock_pid  { $_[0]->_mock($_[1])->{pid} }
sub mock_log  { _slurp($_[0]->_mock($_[1])->{log}) }

sub _mock_json {
    my ($self, $name, $method, $uri, $body) = @_;
    my $m = $self->_mock($name);
    my $r = $self->http(method => $method, uri => $uri, port => $m->{port},
                        timeout => 10,
                        defined $body
                          ? (body => $JSON->encode($body),
                             headers => ['Content-Type' => 'application/json'])
                          : ());
    croak "mock $method $uri: " . ($r->{error} || "status $r->{status}: $r->{body}")
        if $r->{error} || $r->{status} != 200;
    my $d = eval { $JSON->decode($r->{body}) };
    return $d if ref $d;
    return { raw => $r->{body} };
}

sub mock_stats  { my ($s, $n) = @_; $s->_mock_json($n, 'GET', '/stats') }
sub mock_reset  { my ($s, $n) = @_; $s->_mock_json($n, 'POST', '/stats/reset') }
sub mock_config {
    my ($s, $cfg, $n) = @_;
    croak "mock_config needs a hashref" unless ref $cfg eq 'HASH';
    $s->_mock_json($n, 'POST', '/admin/config', $cfg);
}

sub mock_stop {
    my ($self, $name) = @_;
    $name = 'llm' unless defined $name;
    my $m = delete $self->{mocks}{$name} or return;
    local $?;
    my $pid = $m->{pid};
    kill 'TERM', $pid;
    my $deadline = time() + 5;
    while (time() < $deadline) {
        return 1 if waitpid($pid, WNOHANG) == $pid;
        sleep 0.02;
    }
    kill 'KILL', $pid;
    waitpid($pid, 0);
    return 1;
}

# ---------------------------------------------------------------- redis
#
# A real redis-server for the fleet zones (t/39-fleet-*.t), owned by the
# instance that started it, and the instances of a fleet of nodes that
# share one redis and one mock upstream.

# DSG::Test::have_redis: true when redis-server and redis-cli are there
# (Debian: apt-get install redis-server), for a skip_all
sub have_redis {
    for my $bin ($ENV{DSG_REDIS_SERVER} || 'redis-server',
                 $ENV{DSG_REDIS_CLI} || 'redis-cli') {
        return 0 unless $bin =~ m{/} ? -x $bin
                        : grep { -x "$_/$bin" } split /:/, $ENV{PATH} // '';
    }
    return 1;
}

# the instance whose redis this is: its own, else its peer's (share_from)
sub _redis_owner {
    my ($self) = @_;
    return $self if $self->{redis};
    return $self->{peer}->_redis_owner if $self->{peer};
    return $self;
}

sub _redis {
    my ($self) = @_;
    my $r = $self->_redis_owner->{redis} or croak "redis is not started";
    return $r;
}

sub redis_port     { $_[0]->_redis->{port} }
sub redis_password { $_[0]->_redis->{password} }
sub redis_log      { _slurp($_[0]->_redis->{log}) }

# the pid of the running redis-server, undef once it was killed
sub redis_pid {
    my ($self) = @_;
    my $r = $self->_redis;
    return $r->{pid} && _alive($r->{pid}) ? $r->{pid} : undef;
}

sub redis_start {
    my ($self, %o) = @_;
    croak "redis already started" if $self->{redis};
    my $r = {
        port     => $o{port} || _free_port(),
        password => $o{password},
        args     => $o{args} || [],
        log      => "$self->{prefix}/logs/redis.log",
        timeout  => $o{timeout} || 15,
    };
    $self->{redis} = $r;
    $self->_redis_spawn;
    return $r->{port};
}

sub _redis_spawn {
    my ($self) = @_;
    my $r = $self->{redis};
    my @cmd = ($ENV{DSG_REDIS_SERVER} || 'redis-server',
               '--port', $r->{port}, '--bind', '127.0.0.1',
               '--save', '', '--appendonly', 'no',
               '--dir', $self->{prefix}, '--daemonize', 'no',
               '--logfile', '');
    push @cmd, '--requirepass', $r->{password} if defined $r->{password};
    push @cmd, @{ $r->{args} };
    my $pid = fork();
    croak "fork: $!" unless defined $pid;
    if (!$pid) {
        delete $ENV{LD_PRELOAD};    # a sanitizer runtime is nginx's only
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>>', $r->{log}) or POSIX::_exit(126);
        open(STDERR, '>&', \*STDOUT) or POSIX::_exit(126);
        exec { $cmd[0] } @cmd
            or POSIX::_exit(127);
    }
    $r->{pid} = $pid;
    my $deadline = time() + $r->{timeout};
    while (1) {
        return $pid if $self->redis_ping;
        if (waitpid($pid, WNOHANG) == $pid) {
            $r->{pid} = undef;
            croak "redis-server exited (status $?) before answering PING:\n"
                . _tail(_slurp($r->{log}));
        }
        if (time() > $deadline) {
            kill 'KILL', $pid;
            waitpid($pid, 0);
            $r->{pid} = undef;
            croak "redis-server did not answer PING in time:\n"
                . _tail(_slurp($r->{log}));
        }
        sleep 0.02;
    }
}

# one RESP command as an array of bulk strings
sub _resp {
    return '*' . scalar(@_) . "\r\n"
         . join('', map { '$' . length($_) . "\r\n$_\r\n" } @_);
}

# PING (after AUTH when there is a password) over a raw non-blocking
# socket, $secs (1) at most: true when the last reply is +PONG
sub redis_ping {
    my ($self, $secs) = @_;
    my $r = $self->_redis;
    my $deadline = time() + ($secs || 1);
    socket(my $s, PF_INET, SOCK_STREAM, 0) or return 0;
    fcntl($s, F_SETFL, fcntl($s, F_GETFL, 0) | O_NONBLOCK);
    if (!connect($s, sockaddr_in($r->{port}, inet_aton('127.0.0.1')))) {
        return 0 if $! != EINPROGRESS && $! != EWOULDBLOCK;
        my $wv = '';
        vec($wv, fileno($s), 1) = 1;
        return 0 unless select(undef, $wv, undef, $deadline - time()) > 0;
        my $e = unpack('i', getsockopt($s, SOL_SOCKET, SO_ERROR) || pack('i', 1));
        return 0 if $e;
    }
    my $req = '';
    $req .= _resp('AUTH', $r->{password}) if defined $r->{password};
    $req .= _resp('PING');
    my $n = syswrite($s, $req);
    return 0 unless defined $n && $n == length $req;
    my $buf = '';
    my $want = defined $r->{password} ? 2 : 1;
    while (($buf =~ tr/\n//) < $want) {
        my $left = $deadline - time();
        return 0 if $left <= 0;
        my $rv = '';
        vec($rv, fileno($s), 1) = 1;
        next unless select($rv, undef, undef, $left) > 0;
        my $got = sysread($s, $buf, 4096, length $buf);
        next if !defined $got && ($! == EAGAIN || $! == EINTR);
        return 0 unless $got;
    }
    close $s;
    return $buf =~ /\+PONG\r\n\z/ ? 1 : 0;
}

sub redis_cli {
    my ($self, @args) = @_;
    my %o = ref $args[0] eq 'HASH' ? %{ shift @args } : ();
    my $r = $self->_redis;
    my $pass = exists $o{password} ? $o{password} : $r->{password};
    my @cmd = ($ENV{DSG_REDIS_CLI} || 'redis-cli', '-h', '127.0.0.1',
               '-p', $r->{port},
               defined $pass ? ('-a', $pass, '--no-auth-warning') : (),
               @args);
    my $out = "$self->{prefix}/logs/redis-cli.out";
    unlink $out;
    my $env = { LD_PRELOAD => '' };
    my ($rc, $text) = _run_cmd(\@cmd, $out, $o{timeout} || 10, $env);
    $text =~ s/\n\z//;
    return $text;
}

sub redis_signal {
    my ($self, $sig) = @_;
    my $r = $self->_redis;
    my $pid = $r->{pid} or croak "redis_signal: redis is not running";
    kill($sig, $pid) or croak "redis_signal: kill $sig $pid: $!";
    if ($sig =~ /^(?:KILL|TERM|9|15)$/) {
        kill 'CONT', $pid;          # a stopped redis-server handles TERM
        waitpid($pid, 0);
        $r->{pid} = undef;
    }
    return 1;
}

sub redis_restart {
    my ($self, %o) = @_;
    my $owner = $self->_redis_owner;
    my $r = $owner->{redis} or croak "redis_restart: redis was never started";
    if ($r->{pid}) {
        kill 'KILL', $r->{pid};
        waitpid($r->{pid}, 0);
        $r->{pid} = undef;
    }
    $r->{timeout} = $o{timeout} if $o{timeout};
    return $owner->_redis_spawn;
}

sub redis_stop {
    my ($self) = @_;
    my $r = $self->{redis} or return;
    my $pid = $r->{pid} or return 1;
    local $?;
    kill 'TERM', $pid;
    kill 'CONT', $pid;
    my $deadline = time() + 5;
    while (time() < $deadline) {
        if (waitpid($pid, WNOHANG) == $pid) {
            $r->{pid} = undef;
            return 1;
        }
        sleep 0.02;
    }
    kill 'KILL', $pid;
    waitpid($pid, 0);
    $r->{pid} = undef;
    return 1;
}

# A TCP server that is no Redis, in a child process: for each connection
# it reads, then sends $o{reply} (none: it never answers) and closes the
# connection when $o{close}.  Returns its port.
sub fake_server {
    my ($self, %o) = @_;
    my $name = defined $o{name} ? $o{name} : 'fake';
    croak "fake server '$name' already running" if $self->{fakes}{$name};
    my $port = $o{port} || _free_port();
    socket(my $ls, PF_INET, SOCK_STREAM, 0) or croak "socket: $!";
    setsockopt($ls, SOL_SOCKET, Socket::SO_REUSEADDR(), 1);
    bind($ls, sockaddr_in($port, inet_aton('127.0.0.1')))
        or croak "fake_server: bind $port: $!";
    listen($ls, 128) or croak "listen: $!";
    my $pid = fork();
    croak "fork: $!" unless defined $pid;
    if (!$pid) {
        $SIG{PIPE} = 'IGNORE';
        $SIG{$_} = 'DEFAULT' for qw(INT TERM HUP);
        my %c;    # fileno => [socket, answered]
        while (1) {
            my $rv = '';
            vec($rv, fileno($ls), 1) = 1;
            vec($rv, $_, 1) = 1 for keys %c;
            next unless select($rv, undef, undef, 1) > 0;
            if (vec($rv, fileno($ls), 1)) {
                if (accept(my $cs, $ls)) {
                    $c{ fileno $cs } = [$cs, 0];
                }
            }
            for my $fd (keys %c) {
                next unless vec($rv, $fd, 1);
                my $cs = $c{$fd}[0];
                my $n = sysread($cs, my $buf, 65536);
                if (!$n) {
                    close $cs;
                    delete $c{$fd};
                    next;
                }
                next if !defined $o{reply} || $c{$fd}[1];
                syswrite($cs, $o{reply});
                $c{$fd}[1] = 1;
                if ($o{close}) {
                    close $cs;
                    delete $c{$fd};
                }
            }
        }
    }
    close $ls;
    $self->{fakes}{$name} = { pid => $pid, port => $port };
    return $port;
}

sub fake_stop {
    my ($self, $name) = @_;
    $name = 'fake' unless defined $name;
    my $f = delete $self->{fakes}{$name} or return;
    local $?;
    kill 'KILL', $f->{pid};
    waitpid($f->{pid}, 0);
    return 1;
}

# $self uses $from's mocks and redis: %%MOCK%%, %%REDIS%%, mock_stats,
# redis_cli, ... (what $self has of its own comes first)
sub share_from {
    my ($self, $from) = @_;
    croak "share_from: an instance expected" unless blessed $from;
    $self->{peer} = $from;
    return $self;
}

# DSG::Test->fleet_nodes($n, %new): $n instances named node1..node<n>,
# nodes 2..n sharing node1's mocks and redis
sub fleet_nodes {
    my ($class, $n, %args) = @_;
    $class = ref $class || $class;
    my @nodes;
    for my $i (1 .. $n) {
        my $t = $class->new(%args, name => "node$i");
        $t->share_from($nodes[0]) if @nodes;
        push @nodes, $t;
    }
    return @nodes;
}

# ------------------------------------------------- fleet helpers
#
# For the fleet zones' tests (t/39-fleet-*.t), with fleet_nodes() above.

# One value of this instance's metrics: the series of family $name with
# zone="$zone" when given, else the family's only series (the fleet's own
# families have one, labelled with redis="host:port"); undef when the
# scrape fails or there is no such series
sub metric {
    my ($self, $name, $zone) = @_;
    my $m = $self->scrape or return undef;
    return $m->{"$name\{zone=\"$zone\"}"} if defined $zone;
    return $m->{$name} if exists $m->{$name};
    my @k = grep { index($_, "$name\{") == 0 } keys %$m;
    return @k == 1 ? $m->{ $k[0] } : undef;
}

# DSG::Test::fleet_all(\@nodes, $name, $want, $secs): waits up to $secs
# (5) until metric $name is $want on every node; true if it got there
sub fleet_all {
    my ($nodes, $name, $want, $secs) = _strip_invocant(@_);
    return $nodes->[0]->wait_until(sub {
        !grep { ($_->metric($name) // 'none') ne $want } @$nodes
    }, defined $secs ? $secs : 5, 0.02);
}

# DSG::Test::fleet_rate_bound(rate => r/s, secs => s, burst => n,
# share => %, interval => s, nodes => n): the most a fleet zone's key may
# admit in a tier in secs while redis is reachable (docs/fleet.md, "The
# bounds"): what the fleet's bucket earns (rate x share% a second), plus
# its capacity, max((burst + 1) x share%, 1 + one interval of refill), plus
# the credit of every node, max(1, rate x share% x interval / nodes)
# requests each.  share defaults to 100 (a zone without reserves).
sub fleet_rate_bound {
    my %o = _strip_invocant(@_);
    my $rate = $o{rate} * ($o{share} // 100) / 100;
    my $cap = ($o{burst} // 0) + 1;
    $cap *= ($o{share} // 100) / 100;
    $cap = 1 if $cap < 1;
    $cap = 1 + $rate * $o{interval} if 1 + $rate * $o{interval} > $cap;
    my $credit = int($rate * $o{interval} / $o{nodes});
    $credit = 1 if $credit < 1;
    return $rate * $o{secs} + $cap + $o{nodes} * $credit;
}

# files $prefix/html/<name> of "ok\n" each, for static locations that a
# guard applies to ("return" answers before the access phase)
sub html_files {
    my ($self, @names) = @_;
    make_path("$self->{prefix}/html");
    _spew("$self->{prefix}/html/$_", "ok\n") for @names;
    return "$self->{prefix}/html";
}

# the size of error.log now, and its lines since such an offset that
# match $re
sub error_log_size { -s $_[0]->error_log_file || 0 }

sub error_log_since {
    my ($self, $off, $re) = @_;
    my $log = $self->error_log;
    $log = length($log) > ($off || 0) ? substr($log, $off || 0) : '';
    my @l = split /\n/, $log;
    return defined $re ? grep { $_ =~ $re } @l : @l;
}

# ---------------------------------------------------------------- config

sub _subst {
    my ($self, $text) = @_;
    $text =~ s/%%PORT_(\d+)%%/$self->port($1)/ge;
    $text =~ s/%%PORT%%/$self->port/ge;
    $text =~ s/%%MOCK_(\w+)%%/'127.0.0.1:' . $self->mock_port($1)/ge;
    $text =~ s/%%MOCK%%/'127.0.0.1:' . $self->mock_port('llm')/ge;
    $text =~ s/%%REDIS_PORT%%/$self->redis_port/ge;
    $text =~ s/%%REDIS%%/'127.0.0.1:' . $self->redis_port/ge;
    $text =~ s/%%NODE%%/$self->{name} \/\/ 'node1'/ge;
    $text =~ s/%%PREFIX%%/$self->{prefix}/g;
    $text =~ s/%%MODULE%%/$self->{module}/g;
    return $text;
}

sub write_config {
    my ($self, $http, %o) = @_;
    croak "write_config: http block missing" unless defined $http;
    my $p = $self->{prefix};
    $http = $self->_subst($http);
    my $main = defined $o{main} ? $self->_subst($o{main}) : '';

    my $conf = "# generated by DSG::Test\n";
    $conf .= "load_module $self->{module};\n" unless $ENV{DSG_NO_MODULE};
    $conf .= "worker_processes $self->{workers};\n"
           . "master_process on;\n"
           . "daemon on;\n";
    $conf .= "user root;\n" if $> == 0;
    # 65536, or the hard limit when lower: nginx cannot raise it above
    # that without CAP_SYS_RESOURCE and would log an [alert] per worker
    my $nofile = 65536;
    $nofile = $NOFILE_HARD if $NOFILE_HARD && $NOFILE_HARD < $nofile;
    $conf .= "worker_rlimit_nofile $nofile;\n"
           . "error_log $p/logs/error.log $self->{log_level};\n"
           . "pid $p/nginx.pid;\n";
    $conf .= "$main\n" if length $main;
    $conf .= "events {\n    worker_connections 8192;\n}\n"
           . "http {\n"
           . "    client_body_temp_path $p/client_body_temp;\n"
           . "    proxy_temp_path $p/proxy_temp;\n"
           . "    fastcgi_temp_path $p/fastcgi_temp;\n"
           . "    uwsgi_temp_path $p/uwsgi_temp;\n"
           . "    scgi_temp_path $p/scgi_temp;\n"
           . "    access_log $p/logs/access.log;\n"
           . "\n$http\n"
           . "}\n";

    my $port = $self->port;
    $self->{listens_main} = $conf =~ /\blisten\s[^;]*\b$port\b/ ? 1 : 0;
    _spew($self->conf_file, $conf);
    $self->{conf} = $conf;
    return $self->conf_file;
}

# line number (1-based) of the first line of the written nginx.conf
# matching $re, or undef
sub conf_line {
    my ($self, $re) = @_;
    my $n = 0;
    for my $l (split /\n/, _slurp($self->conf_file)) {
        $n++;
        return $n if $l =~ $re;
    }
    return undef;
}

# environment of the nginx processes: see DSG_NGINX_PRELOAD above
sub _nginx_env {
    return $ENV{DSG_NGINX_PRELOAD} ? { LD_PRELOAD => $ENV{DSG_NGINX_PRELOAD} }
                                   : {};
}

sub _nginx_cmd {
    my ($self, @extra) = @_;
    return [$self->{nginx}, '-p', "$self->{prefix}/", '-c', $self->conf_file,
            @extra];
}

sub test_config {
    my ($self) = @_;
    croak "test_config: no config written" unless -f $self->conf_file;
    my $out = "$self->{prefix}/logs/nginx-t.out";
    unlink $out;
    my ($rc, $text) = _run_cmd($self->_nginx_cmd('-t'), $out, 30,
                               _nginx_env());
    return ($rc == 0 ? 1 : 0, $text);
}

# config_fails($name, $conf, $msg_re, $line_re): writes the http-level
# text $conf and runs four tests: nginx -t fails, its [emerg] line
# matches $msg_re, a line of the file matches $line_re (one regexp or a
# list: any of them), and the [emerg] names this file and that line.
sub config_fails {
    my ($self, $name, $conf, $msg, $line_re) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $self->write_config($conf);
    my ($ok, $out) = $self->test_config;
    Test::More::ok(!$ok, "$name: nginx -t fails");
    Test::More::like($out, qr/\[emerg\].*$msg/,
                     "$name: message names the problem");
    my $file = $self->conf_file;
    my @lines = grep { defined }
                map { $self->conf_line($_) }
                ref $line_re eq 'ARRAY' ? @$line_re : ($line_re);
    Test::More::ok(@lines, "$name: (the directive is in the file)");
    my ($got) = $out =~ /\[emerg\].*? in \Q$file\E:(\d+)/;
    return Test::More::ok(defined $got && grep({ $_ == $got } @lines),
                          "$name: in $file:" . join('|', @lines))
        || Test::More::diag($out);
}

# ---------------------------------------------------------------- nginx

sub master_pid {
    my ($self) = @_;
    return $self->{master} if $self->{master} && _alive($self->{master});
    return undef;
}

sub worker_pids {
    my ($self) = @_;
    my $m = $self->{master} or return ();
    return grep { _slurp("/proc/$_/cmdline") !~ /cache/ } _children($m);
}

sub _die_start {
    my ($self, $why) = @_;
    my $err = _tail($self->error_log, 30);
    my $se  = _tail(_slurp("$self->{prefix}/logs/stderr.log"), 30);
    $self->_kill_nginx_hard;
    die "DSG::Test: nginx start failed: $why\n"
        . (length $se ? "--- nginx stderr:\n$se\n" : '')
        . "--- error.log tail:\n$err\n";
}

sub start {
    my ($self, %o) = @_;
    croak "start: no config written" unless -f $self->conf_file;
    croak "start: nginx already running" if $self->master_pid;
    my $pidfile = "$self->{prefix}/nginx.pid";
    unlink $pidfile;
    my $stderr = "$self->{prefix}/logs/stderr.log";
    unlink $stderr;

    my ($rc) = _run_cmd($self->_nginx_cmd, $stderr, 30, _nginx_env());
    $self->_die_start("exit status " . ($rc >> 8) . ($rc & 127 ? " signal " . ($rc & 127) : ''))
        if $rc != 0;

    my $deadline = time() + ($o{timeout} || 10);
    my $why = 'no pid file';
    while (time() < $deadline) {
        my $p = _slurp($pidfile);
        if ($p =~ /^(\d+)\s*$/ && _alive($1)) {
            $self->{master} = $1 + 0;
            my @w = $self->worker_pids;
            if (@w != $self->{workers}) {
                $why = "have " . scalar(@w) . " of $self->{workers} workers";
            } elsif ($self->{listens_main} && !_listening($self->port)) {
                $why = "port " . $self->port . " is not listening";
            } else {
                return 1;
            }
        } elsif ($p =~ /^(\d+)/) {
            $self->{master} = $1 + 0;
            $why = "master $1 is gone";
        }
        sleep 0.02;
    }
    $self->_die_start("timeout: $why");
}

sub reload {
    my ($self, %o) = @_;
    my $m = $self->master_pid or croak "reload: nginx is not running";
    my %old = map { $_ => 1 } $self->worker_pids;
    my $off = -s $self->error_log_file || 0;
    kill 'HUP', $m or croak "reload: kill HUP $m: $!";
    my $deadline = time() + ($o{timeout} || 10);
    while (time() < $deadline) {
        sleep 0.02;
        my $gone = !grep { _alive($_) } keys %old;
        my @new = grep { !$old{$_} } $self->worker_pids;
        return 1 if $gone && @new == $self->{workers};
        if (!@new) {
            my $log = _slurp($self->error_log_file);
            return 0 if length($log) > $off
                        && substr($log, $off) =~ /\[emerg\]/;
        }
    }
    return 0;
}

sub _kill_nginx_hard {
    my ($self) = @_;
    my $m = $self->{master} or return;
    my @kids = _children($m);
    kill 'KILL', $m, @kids;
    my $deadline = time() + 3;
    sleep 0.01 while time() < $deadline && grep { _alive($_) } $m, @kids;
    $self->{master} = undef;
}

sub stop {
    my ($self, %o) = @_;
    my $m = $self->master_pid;
    unless ($m) {
        $self->{master} = undef;
        return 1;
    }
    my @kids = _children($m);
    my $timeout = defined $o{timeout} ? $o{timeout} : 10;
    for my $step (['QUIT', $timeout], ['TERM', 5], ['KILL', 3]) {
        my ($sig, $secs) = @$step;
        push @kids, _children($m);
        kill $sig, ($sig eq 'KILL' ? ($m, @kids) : $m);
        my $deadline = time() + $secs;
        while (time() < $deadline) {
            if (!_alive($m)) {
                # workers exit before the master; do not leave any behind
                my $d2 = time() + 2;
                sleep 0.01 while time() < $d2 && grep { _alive($_) } @kids;
                kill 'KILL', grep { _alive($_) } @kids;
                $self->{master} = undef;
                return $sig eq 'QUIT' ? 1 : 0;
            }
            sleep 0.02;
        }
    }
    $self->{master} = undef;
    return 0;
}

sub restart {
    my ($self, %o) = @_;
    $self->stop;
    return $self->start(%o);
}

sub error_log  { _slurp($_[0]->error_log_file) }
sub access_log { _slurp($_[0]->access_log_file) }

sub allow_log {
    my ($self, @re) = @_;
    push @{ $self->{allow} }, map { ref $_ ? $_ : qr/\Q$_\E/ } @re;
    return $self;
}

# the first line of an ASan, LSan or UBSan report (a worker's stderr is
# error.log): "==pid==ERROR: AddressSanitizer: ...", "SUMMARY: ...Sanitizer",
# "file.c:12:5: runtime error: ..."
our $SANITIZER_RE = qr/^==\d+==\s*ERROR:[ ]\w*Sanitizer\b
                      |^SUMMARY:[ ]\w*Sanitizer\b
                      |^\S+:[ ]runtime[ ]error:[ ]/x;

# error.log lines that are alerts or sanitizer reports not declared with
# allow_log
sub bad_log_lines {
    my ($self) = @_;
    my @bad;
    LINE: for my $l (split /\n/, $self->error_log) {
        next unless $l =~ /\[(?:alert|crit|emerg)\]/ || $l =~ /exited on signal/
                    || $l =~ $SANITIZER_RE;
        for my $re (@{ $self->{allow} }) {
            next LINE if $l =~ $re;
        }
        push @bad, $l;
    }
    return @bad;
}

# stop everything and run the one "error.log has no alerts" test
sub check_log {
    my ($self) = @_;
    $self->stop;
    $self->mock_stop($_) for keys %{ $self->{mocks} };
    $self->fake_stop($_) for keys %{ $self->{fakes} || {} };
    $self->redis_stop;
    my @bad = $self->bad_log_lines;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $ok = Test::More::ok(!@bad, (defined $self->{name} ? "$self->{name}: " : '')
                                   . 'error.log has no alerts');
    Test::More::diag(join "\n", 'unexpected error.log lines:', @bad) if @bad;
    return $ok;
}

sub done {
    my ($self) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $self->check_log;
    Test::More::done_testing();
}

sub _cleanup {
    my ($self) = @_;
    return if $self->{cleaned} || !$self->{owner} || $self->{owner} != $$;
    $self->{cleaned} = 1;
    local ($?, $!, $@);
    eval { $self->stop(timeout => 3) };
    eval { $self->mock_stop($_) for keys %{ $self->{mocks} } };
    eval { $self->fake_stop($_) for keys %{ $self->{fakes} || {} } };
    eval { $self->redis_stop };
    if (!$self->{keep} && $self->{prefix} && -d $self->{prefix}) {
        eval { remove_tree($self->{prefix}) };
    }
    delete $LIVE{refaddr $self};
}

sub DESTROY { $_[0]->_cleanup }

END {
    local $?;
    for my $t (values %LIVE) {
        $t->_cleanup if $t;
    }
}

# ---------------------------------------------------------------- HTTP

sub _pairs {
    my ($h) = @_;
    return () unless $h;
    if (ref $h eq 'HASH') {
        return map { [$_, $h->{$_}] } sort keys %$h;
    }
    if (ref $h eq 'ARRAY') {
        return @$h if !@$h || ref $h->[0] eq 'ARRAY';
        my @p;
        for (my $i = 0; $i < @$h; $i += 2) {
            push @p, [$h->[$i], $h->[$i + 1]];
        }
        return @p;
    }
    croak "headers must be a hash or array reference";
}

sub _build_request {
    my ($o) = @_;
    return $o->{request_raw} if defined $o->{request_raw};
    my $method = $o->{method} || 'GET';
    my $uri    = defined $o->{uri} ? $o->{uri} : '/';
    my $proto  = $o->{proto} || 'HTTP/1.1';
    my @h = _pairs($o->{headers});
    my %has = map { lc($_->[0]) => 1 } @h;
    my $body = $o->{body};
    my $req = "$method $uri $proto\r\n";
    $req .= "Host: localhost\r\n" unless $has{host};
    for my $p (grep { defined $_->[1] } @h) {
        # an array reference sends the header once per value
        $req .= "$p->[0]: $_\r\n" for ref $p->[1] eq 'ARRAY' ? @{ $p->[1] } : $p->[1];
    }
    if (!$has{'content-length'} && !$has{'transfer-encoding'}) {
        if (defined $body) {
            $req .= "Content-Length: " . length($body) . "\r\n";
        } elsif ($method =~ /^(?:POST|PUT|PATCH)$/) {
            $req .= "Content-Length: 0\r\n";
        }
    }
    $req .= "Connection: close\r\n" unless $has{connection};
    $req .= "\r\n";
    $req .= $body if defined $body;
    return $req;
}

sub http {
    my ($self, %o) = @_;
    my $timeout = defined $o{timeout} ? $o{timeout} : 10;
    my ($r) = $self->parallel([\%o], timeout => $timeout + 5);
    return $r;
}

sub get {
    my ($self, $uri, %h) = @_;
    return $self->http(method => 'GET', uri => $uri, headers => \%h);
}

sub post {
    my ($self, $uri, $body, %h) = @_;
    return $self->http(method => 'POST', uri => $uri, body => $body,
                       headers => \%h);
}

# http() options of a chat completion request
sub chat_req {
    my ($self, %o) = @_;
    my $content  = exists $o{content} ? delete $o{content} : 'Hello';
    my $messages = delete $o{messages};
    my $model    = delete $o{model};
    my $stream   = delete $o{stream};
    my $has_stream = defined $stream;
    my $max      = delete $o{max_tokens};
    my $key      = delete $o{key};
    my $extra    = delete $o{extra};
    my $headers  = delete $o{headers};

    my %b = (
        model    => defined $model ? $model : 'deepseek-chat',
        messages => $messages || [{ role => 'user', content => $content }],
    );
    $b{stream} = $stream ? JSON::PP::true : JSON::PP::false if $has_stream;
    $b{max_tokens} = $max + 0 if defined $max;
    %b = (%b, %$extra) if $extra;

    my @h = (['Content-Type', 'application/json']);
    push @h, ['Authorization', "Bearer $key"] if defined $key;
    push @h, _pairs($headers);

    return {
        method => 'POST',
        uri    => '/v1/chat/completions',
        %o,
        headers => \@h,
        body    => exists $o{body} ? $o{body} : $JSON->encode(\%b),
    };
}

sub chat {
    my ($self, %o) = @_;
    return $self->http(%{ $self->chat_req(%o) });
}

# the data: payloads of an SSE body, in order
# drop the invocant of functions that may also be called as methods
sub _strip_invocant {
    my $a = $_[0];
    return @_ > 1 && defined $a
        && (blessed($a) ? $a->isa(__PACKAGE__) : !ref($a) && $a eq __PACKAGE__)
        ? @_[1 .. $#_] : @_;
}

sub sse_data {
    @_ = _strip_invocant(@_);
    my ($body) = @_;
    $body = $body->{body} if ref $body eq 'HASH';
    my @out;
    for my $ev (split /\r?\n\r?\n/, defined $body ? $body : '') {
        my @d;
        for my $l (split /\r?\n/, $ev) {
            push @d, $1 if $l =~ /^data: ?(.*)$/;
        }
        push @out, join("\n", @d) if @d;
    }
    return @out;
}

sub json_decode {
    my ($s) = _strip_invocant(@_);
    my $d = eval { $JSON->decode($s) };
    return $d;
}

sub json_encode {
    my ($d) = _strip_invocant(@_);
    return $JSON->encode($d);
}

sub wait_until {
    my ($self, $cond, $timeout, $step) = @_;
    my $deadline = time() + (defined $timeout ? $timeout : 10);
    while (1) {
        my $v = $cond->();
        return $v if $v;
        return undef if time() > $deadline;
        sleep($step || 0.05);
    }
}

# ---------------------------------------------------------------- helpers
#
# What several test files share.  What differs between them is a
# parameter: nothing here reads a variable of the test file.

# The X-Cache-Status a client saw, COALESCED counted as HIT; $none (default
# '') when there is none.  A request sent right after the previous one
# completed may find that response's store still in progress (nginx sends
# the last bytes to the client before the filter chain sees the end of the
# upstream response): it then waits for that entry and is answered from
# it, COALESCED.  For requests sent one after another this is a HIT.
sub cache_status {
    my ($r, $none) = _strip_invocant(@_);
    my $s = $r->{headers}{'x-cache-status'} // (defined $none ? $none : '');
    return $s eq 'COALESCED' ? 'HIT' : $s;
}

# chat(%o) with an X-Tag: $tag header added to %o's headers (for an access
# log that logs $http_x_tag); the response also gets tag => $tag and
# cache => cache_status() of it
sub cache_chat {
    my ($self, $tag, %o) = @_;
    my $h = delete $o{headers};
    my $r = $self->chat(%o, headers => [_pairs($h), ['X-Tag', $tag]]);
    $r->{tag} = $tag;
    $r->{cache} = cache_status($r);
    return $r;
}

# chat_req() options of a streamed chat request tagged with X-Tag: $tag:
# content "req $tag", stream => 1, timeout => 30; h => { ... } adds headers
# (X-Mock-Delay-Ms, ...); any other option overrides these
sub tagged_req {
    my ($self, $tag, %o) = @_;
    my $h = delete $o{h} || {};
    return $self->chat_req(content => "req $tag", stream => 1,
                           headers => { 'X-Tag' => $tag, %$h },
                           timeout => 30, %o);
}

# The lines of the access log $file of a key=value log_format that has
# tag=$http_x_tag, as { tag => { key => value, ... } } (the last line of
# each tag).  Waits up to 10 s until every one of @tags is there: nginx
# writes the line when it frees the request, which may be a moment after
# the client has read the last byte.
sub log_by_tag {
    my ($self, $file, @tags) = @_;
    my %by;
    $self->wait_until(sub {
        %by = ();
        open(my $fh, '<', $file) or return 0;
        while (my $l = <$fh>) {
            my %f = $l =~ /(\w+)=(\S*)/g;
            $by{ $f{tag} } = \%f if defined $f{tag};
        }
        return !grep { !$by{$_} } @tags;
    }, 10);
    return \%by;
}

# The metrics text of location $uri (default /metrics) as
# { 'name{labels}' => value }; dies unless the answer is a 200
sub metrics {
    my ($self, $uri) = @_;
    my $r = $self->get(defined $uri ? $uri : '/metrics');
    croak "metrics: $r->{status} " . ($r->{error} // '')
        unless $r->{status} == 200;
    my %m;
    for (split /\n/, $r->{body}) {
        next if /^#/;
        $m{$1} = $2 if /^(\S+) (\S+)$/;
    }
    return \%m;
}

# True when every class of zone $zone has nothing in flight and nothing
# queued, by the gauges at $uri ('/metrics')
# The metrics of listener $port (a port number; the first listener by
# default) as { 'name{labels}' => value }, or undef when the scrape fails,
# as it may while a worker is respawned: for wait_until loops.
sub scrape {
    my ($self, $port) = @_;
    my $r = $self->http(uri => '/metrics', timeout => 5,
                        defined $port ? (port => $port) : ());
    return undef unless ($r->{status} // 0) == 200;
    my %m;
    for (split /\n/, $r->{body}) {
        next if /^#/;
        $m{$1} = $2 if /^(\S+) (\S+)$/;
    }
    return \%m;
}

# a scrape's family $name summed over the classes of zone $zone, and the
# zone's reaped counter (functions: DSG::Test::zone_sum($m, ...))
sub zone_sum {
    my ($m, $name, $zone) = @_;
    my $s = 0;
    $s += $m->{$_} for grep { /^\Q$name\E\{zone="\Q$zone\E",/ } keys %$m;
    return $s;
}

sub reaped { $_[0]{"deepseek_guard_zone_reaped_total{zone=\"$_[1]\"}"} // 0 }

sub zone_idle {
    my ($self, $zone, $uri) = @_;
    # a scrape may fail while a worker is respawned: not idle yet
    my $m = eval { $self->metrics($uri) } or return 0;
    my @g = grep {
        /^deepseek_guard_(?:inflight|queue_depth)\{zone="\Q$zone\E",/
    } keys %$m;
    croak "zone_idle: no gauges of zone $zone" unless @g;
    return !grep { $m->{$_} != 0 } @g;
}

# The test "$label: nothing left in flight at the mock": waits up to $secs
# (default 15) until mock $name ('llm') has no request in flight, that is
# until every request of the step before has really ended upstream
sub settle {
    my ($self, $label, $secs, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    return Test::More::ok(
        $self->wait_until(sub { $self->mock_stats($name)->{inflight} == 0 },
                          defined $secs ? $secs : 15),
        "$label: nothing left in flight at the mock");
}

# parallel(\@reqs, %o) in a child process, so that the test can reload
# nginx or kill a worker meanwhile.  Returns a handle for bg_wait(), which
# waits for the child and returns its results ([] if it wrote none): of
# each response only the keys below, JSON-safe.  The child leaves with
# POSIX::_exit: no END blocks, the parent owns nginx and the mocks.
my @BG_KEYS = qw(status error got_status body headers start end);

sub bg_parallel {
    my ($self, $reqs, %o) = @_;
    my $file = "$self->{prefix}/bg-" . ++$self->{bg_n} . '.json';
    my $pid = fork();
    croak "fork: $!" unless defined $pid;
    if (!$pid) {
        my @res = $self->parallel($reqs, %o);
        my @out = map { my $r = $_; +{ map { $_ => $r->{$_} } @BG_KEYS } } @res;
        open(my $fh, '>', "$file.tmp") or POSIX::_exit(1);
        print {$fh} $JSON->encode(\@out);
        close $fh;
        rename "$file.tmp", $file;
        POSIX::_exit(0);
    }
    return { pid => $pid, file => $file };
}

sub bg_wait {
    my ($self, $bg) = @_;
    waitpid($bg->{pid}, 0);
    my $d = json_decode(_slurp($bg->{file}));
    return ref $d eq 'ARRAY' ? $d : [];
}

# DSG::Test::sock_inodes($pid): { inode => 1 } of the sockets in
# /proc/$pid/fd (a process's own file table reads consistently)
sub sock_inodes {
    my ($pid) = @_;
    my %inode;
    opendir(my $d, "/proc/$pid/fd") or return {};
    for my $fd (readdir $d) {
        my $l = readlink("/proc/$pid/fd/$fd") // '';
        $inode{$1} = 1 if $l =~ /^socket:\[(\d+)\]$/;
    }
    closedir $d;
    return \%inode;
}

# DSG::Test::tcp_table(): { inode => [state, local port, remote port] } of
# /proc/net/tcp.  The kernel prints that file bucket by bucket without
# freezing the table: a socket opened or closed during the read can make
# another one vanish from that one read (seen: a worker's client missing
# from a snapshot, and the next snapshot's "new" client pinned on the
# wrong worker).  So the table is read twice and merged, the second read
# winning where both have a socket.
sub tcp_table {
    my %t;
    for (1 .. 2) {
        open(my $fh, '<', '/proc/net/tcp') or return \%t;
        while (my $line = <$fh>) {
            my @c = split ' ', $line;
            next unless @c > 9 && $c[9] =~ /^[1-9]\d*$/;
            my ($lport) = $c[1] =~ /:([0-9A-F]+)$/;
            my ($rport) = $c[2] =~ /:([0-9A-F]+)$/;
            $t{ $c[9] } = [$c[3], hex $lport, hex $rport];
        }
        close $fh;
    }
    return \%t;
}

# DSG::Test::tcp_conns($pid, $up_port, $local_port): the established TCP
# connections of process $pid (its sockets in /proc/$pid/fd, found in
# /proc/net/tcp) as (how many go to remote port $up_port, how many are on
# local port $local_port): for a worker, its requests in flight at the
# mock and its clients
sub tcp_conns {
    my ($pid, $up_port, $local_port) = @_;
    my $inode = sock_inodes($pid);
    my $tcp = tcp_table();
    my ($up, $cl) = (0, 0);
    for my $i (keys %$inode) {
        my $e = $tcp->{$i} or next;
        next unless $e->[0] eq '01';
        $up++ if $e->[2] == $up_port;
        $cl++ if $e->[1] == $local_port;
    }
    return ($up, $cl);
}

# (worker pid => [requests in flight to the mock on $mock_port, clients on
# port()], ...) of every worker
sub worker_conns {
    my ($self, $mock_port) = @_;
    croak "worker_conns: mock port needed" unless $mock_port;
    return map { $_ => [tcp_conns($_, $mock_port, $self->port)] }
           $self->worker_pids;
}

# The connection counts of worker_conns for @pids, flattened, once they
# are @$want (or after 5 s): a connection dropped while placing requests
# may still be closing when the last request is placed, and the workers
# let go of it a moment later, whatever the scheduler does meanwhile.
sub settled_conns {
    my ($self, $mock_port, $want, @pids) = @_;
    my @got;
    $self->wait_until(sub {
        my %c = $self->worker_conns($mock_port);
        @got = map { @{ $c{$_} || [] } } @pids;
        return "@got" eq "@$want";
    }, 5, 0.05);
    return \@got;
}

# Sends one request ($req: http() options) from a child process of its
# own (bg_parallel, timeout => $o{timeout}, default 40) and returns ($bg,
# pid of the worker that accepted it) once a worker has its connection
# (admitted => 1: and a new upstream connection to the mock on mock_port,
# that is the request is in flight, not queued).  A request accepted by a
# worker that accept->($pid) refuses is dropped (its client killed, the
# worker seen closing its sockets) and sent again: reuseport picks the
# worker by a hash of the client's port, so a few tries get it to a worker
# wanted.  With 8 workers a try reaches one given worker with odds 1/8:
# 50 tries missed it in about 1 run in 800 (seen in CI, t/33), hence 400
# ((7/8)^400 is about 1e-23); a try costs tens of milliseconds.
#
# The request is found by the sockets themselves, not by counts: the
# worker whose file table gains an established socket on port() (and, if
# admitted, one to the mock) that it did not have before.  Only this
# request opens a client connection meanwhile, and a file table reads
# consistently; /proc/net/tcp may miss a socket in one read, which only
# delays the finding to the next poll.
sub place {
    my ($self, $req, %o) = @_;
    my $mp = $o{mock_port} or croak "place: mock_port needed";
    my $accept = $o{accept} || sub { 1 };
    my $port = $self->port;
    for my $try (1 .. 400) {
        my %before = map { $_ => sock_inodes($_) } $self->worker_pids;
        my $bg = $self->bg_parallel([$req], timeout => $o{timeout} // 40);
        my ($got, @new);
        $self->wait_until(sub {
            my $tcp = tcp_table();
            for my $w ($self->worker_pids) {
                my $b = $before{$w} || {};
                my (@cl, @up);
                for my $i (keys %{ sock_inodes($w) }) {
                    next if $b->{$i};
                    my $e = $tcp->{$i} or next;
                    next unless $e->[0] eq '01';
                    push @cl, $i if $e->[1] == $port;
                    push @up, $i if $e->[2] == $mp;
                }
                next unless @cl;
                next if $o{admitted} && !@up;
                ($got, @new) = ($w, @cl, @up);
                return 1;
            }
            return 0;
        }, 10, 0.01) or croak "place: request $try not accepted in time";
        return ($bg, $got) if $accept->($got);
        kill 'KILL', $bg->{pid};
        waitpid($bg->{pid}, 0);
        $self->wait_until(sub {
            my $now = sock_inodes($got);
            return !grep { $now->{$_} } @new;
        }, 10, 0.01)
            or croak "place: worker $got did not let go of a dropped client";
    }
    croak "place: could not get a request to a worker wanted";
}

# The leak detector of an in-flight cap of n slots (one key): settle()
# and mock_reset, then exactly n slow requests at once must all be
# admitted without queueing (st=ADMITTED wait=0 in the log) and reach the
# mock together (max_inflight == n); one more, sent at_ms later, must
# queue until one of them ends.  A single leaked slot (or a stale queue
# place that blocks the head of the line) makes one of the n queue.
# Options:
#   n         the cap (required)
#   log       the access log file for log_by_tag (required)
#   req       ($tag, %o) -> http() options of a request: the test's own
#             builder (default tagged_req); the requests are tagged
#             cap<round>-1 .. cap<round>-<n> and cap<round>-extra
#   timeout   client timeout passed to req (default: req's own)
#   hold      headers (h) of the n ({ 'X-Mock-Delay-Ms' => 1500 })
#   extra     headers (h) of the one more ({})
#   at_ms     when the one more is sent (500)
#   settle    seconds for settle() (15)   wait: parallel() timeout (15)
#   zone      the guarded zone (required): once the mock is idle, waits
#             (as long as settle) until the zone's in-flight and queue
#             gauges at /metrics are 0.  Slots are freed in the request's
#             cleanup, after the client has its answer and the mock is
#             done: without this wait, one of the n may reach the other
#             worker before the previous step's last slot is freed, and
#             queue.  A leaked slot keeps a gauge up: the wait ends
#             unmet, and the "none queued" test below fails.
#   extra_wait_ms  test too, on its own, that the one more waited at
#             least this long in the queue
#   or_stop   when a test fails: diag, done() and exit (with capacity
#             lost, every later step would only wait for timeouts)
# Runs 5 tests (6 with extra_wait_ms); returns true when all but the
# settle() one passed.
sub capacity_is_free {
    my ($self, $label, %o) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $n = $o{n} or croak "capacity_is_free: n needed";
    my $file = $o{log} or croak "capacity_is_free: log needed";
    my $req = $o{req} || sub { $self->tagged_req(@_) };
    my @to = defined $o{timeout} ? (timeout => $o{timeout}) : ();
    my $round = ++$self->{cap_round};
    my $zone = $o{zone} or croak "capacity_is_free: zone needed";
    my $secs = defined $o{settle} ? $o{settle} : 15;
    $self->settle($label, $secs);
    $self->wait_until(sub { $self->zone_idle($zone) }, $secs)
        or Test::More::diag("$label: zone $zone still has a request in "
                            . "flight or queued");
    $self->mock_reset;

    my @tags = map { "cap$round-$_" } 1 .. $n;
    my $xtag = "cap$round-extra";
    my @reqs = map { $req->($_, @to,
                            h => $o{hold} || { 'X-Mock-Delay-Ms' => 1500 }) }
               @tags;
    # the one more arrives while the n hold every slot
    push @reqs, { %{ $req->($xtag, @to, h => $o{extra} || {}) },
                  at_ms => defined $o{at_ms} ? $o{at_ms} : 500 };
    my @res = $self->parallel(\@reqs,
                              timeout => defined $o{wait} ? $o{wait} : 15);

    my $log = $self->log_by_tag($file, @tags, $xtag);
    my $extra = $log->{$xtag} || {};
    my $ok = Test::More::is(scalar(grep { $_->{status} == 200 } @res), $n + 1,
                            "$label: N+1 requests served");
    $ok &= Test::More::is(
        scalar(grep { ($log->{$_}{st} // '') eq 'ADMITTED'
                      && $log->{$_}{wait} eq '0' } @tags), $n,
        "$label: all $n concurrent requests admitted at once, none queued")
        || Test::More::diag(Test::More::explain(
               [map { $log->{$_} } @tags, $xtag]));
    $ok &= Test::More::is($self->mock_stats->{max_inflight}, $n,
                          "$label: the mock saw $n in flight together");
    if (defined $o{extra_wait_ms}) {
        $ok &= Test::More::is($extra->{st}, 'QUEUED',
                              "$label: the N+1th request queued");
        $ok &= Test::More::cmp_ok($extra->{wait} // 0, '>=', $o{extra_wait_ms},
                                  "$label: ... until a slot was released")
            || Test::More::diag(Test::More::explain($extra));
    } else {
        $ok &= Test::More::is($extra->{st}, 'QUEUED',
            "$label: the N+1th request queued until a slot was released")
            || Test::More::diag(Test::More::explain($extra));
    }
    return $ok if $ok || !$o{or_stop};
    Test::More::diag("$label: the zone lost capacity, stopping here");
    $self->done;
    exit;
}

# ---------------------------------------------------------------- engine
#
# One select() loop drives every connection: non-blocking connect, write
# the request (reading whatever arrives meanwhile), parse the response
# incrementally (Content-Length, chunked, or until close).

sub parallel {
    my ($self, $reqs, %po) = @_;
    croak "parallel: array reference expected" unless ref $reqs eq 'ARRAY';
    local $SIG{PIPE} = 'IGNORE';

    my $n = @$reqs;
    my $base = time();
    my $cap = $po{concurrency} || 0;
    my $gdeadline = defined $po{timeout} ? $base + $po{timeout} : undef;
    my @res = (undef) x $n;
    my @pending = sort { $a->[1] <=> $b->[1] || $a->[0] <=> $b->[0] }
                  map { [$_, ($reqs->[$_]{at_ms} || 0) / 1000] } 0 .. $n - 1;
    my %act;    # fd => state
    my $done = 0;
    my $last_sweep = 0;

    while ($done < $n) {
        my $now = time();

        # start requests that are due
        while (@pending && $base + $pending[0][1] <= $now
               && (!$cap || keys(%act) < $cap))
        {
            my ($i) = @{ shift @pending };
            my $st = _conn_start($self, $reqs->[$i], $i, $gdeadline);
            if ($st->{fd} < 0) {
                $res[$i] = _finish($st);
                $done++;
            } else {
                $act{ $st->{fd} } = $st;
            }
        }

        # timeouts and timed aborts
        if ($now - $last_sweep > 0.02 || !%act) {
            $last_sweep = $now;
            for my $fd (keys %act) {
                my $st = $act{$fd};
                if (defined $st->{abort_at} && $now >= $st->{abort_at}) {
                    $st->{aborted} = 1;
                } elsif ($now >= $st->{deadline}) {
                    $st->{error} ||= 'timeout';
                } else {
                    next;
                }
                delete $act{$fd};
                $res[ $st->{idx} ] = _finish($st);
                $done++;
            }
            if ($gdeadline && $now >= $gdeadline) {
                for my $p (@pending) {
                    my $i = $p->[0];
                    $res[$i] = _finish({ opt => $reqs->[$i], idx => $i,
                                         error => 'timeout (not started)',
                                         start => $now });
                    $done++;
                }
                @pending = ();
            }
        }
        last if $done >= $n;

        # wait
        my ($rv, $wv) = ('', '');
        for my $fd (keys %act) {
            my $ph = $act{$fd}{phase};
            vec($wv, $fd, 1) = 1 if $ph eq 'connect' || $ph eq 'write';
            vec($rv, $fd, 1) = 1 if $ph ne 'connect';
        }
        my $wait = 0.05;
        $wait = $base + $pending[0][1] - $now
            if @pending && $base + $pending[0][1] - $now < $wait
               && (!$cap || keys(%act) < $cap);
        $wait = 0 if $wait < 0;
        next if !%act && $wait == 0;
        if (!%act) {
            sleep $wait;
            next;
        }
        my ($ro, $wo) = ($rv, $wv);
        my $nfound = select($ro, $wo, undef, $wait);
        if ($nfound < 0) {
            next if $! == EINTR;
            croak "select: $!";
        }
        next unless $nfound;

        my %ready;
        for my $pair ([$wo, 'w'], [$ro, 'r']) {
            my $bits = unpack('b*', $pair->[0]);
            my $pos = 0;
            while (($pos = index($bits, '1', $pos)) >= 0) {
                $ready{$pos}{ $pair->[1] } = 1;
                $pos++;
            }
        }
        for my $fd (keys %ready) {
            my $st = $act{$fd} or next;
            _conn_io($st, $ready{$fd}{r}, $ready{$fd}{w});
            if ($st->{phase} eq 'done') {
                delete $act{$fd};
                $res[ $st->{idx} ] = _finish($st);
                $done++;
            }
        }
    }
    return @res;
}

sub _conn_start {
    my ($self, $o, $i, $gdeadline) = @_;
    my $now = time();
    my $timeout = defined $o->{timeout} ? $o->{timeout} : 10;
    my $deadline = $now + $timeout;
    my $st = {
        opt      => $o,
        idx      => $i,
        start    => $now,
        deadline => $deadline,
        phase    => 'connect',
        fd       => -1,
        wbuf     => _build_request($o),
        woff     => 0,
        raw      => '',
        pbuf     => '',
        body     => '',
        pstate   => 'head',
    };
    $st->{abort_at} = $now + $o->{abort_after_ms} / 1000
        if defined $o->{abort_after_ms};
    $st->{head_req} = 1 if ($o->{method} || 'GET') eq 'HEAD';

    my $host = $o->{host} || '127.0.0.1';
    my $port = $o->{port} || $self->port;
    my $sock;
    if (!socket($sock, PF_INET, SOCK_STREAM, 0)) {
        $st->{error} = "socket: $!";
        return $st;
    }
    my $fl = fcntl($sock, F_GETFL, 0);
    fcntl($sock, F_SETFL, $fl | O_NONBLOCK);
    setsockopt($sock, IPPROTO_TCP, TCP_NODELAY, 1);
    $st->{sock} = $sock;
    $st->{fd} = fileno($sock);
    if (connect($sock, sockaddr_in($port, inet_aton($host)))) {
        $st->{phase} = 'write';
    } elsif ($! != EINPROGRESS && $! != EWOULDBLOCK) {
        $st->{error} = "connect: $!";
        close $sock;
        delete $st->{sock};
        $st->{fd} = -1;
    }
    return $st;
}

sub _conn_io {
    my ($st, $r, $w) = @_;
    if ($st->{phase} eq 'connect') {
        return unless $w;
        my $e = unpack('i', getsockopt($st->{sock}, SOL_SOCKET, SO_ERROR) || pack('i', 0));
        if ($e) {
            local $! = $e;
            $st->{error} = "connect: $!";
            $st->{phase} = 'done';
            return;
        }
        $st->{phase} = 'write';
        $w = 1;
    }
    if ($st->{phase} eq 'write' && $w) {
        my $left = length($st->{wbuf}) - $st->{woff};
        my $n = $left > 0
            ? syswrite($st->{sock}, $st->{wbuf}, $left > 262144 ? 262144 : $left,
                       $st->{woff})
            : 0;
        if (!defined $n) {
            if ($! != EAGAIN && $! != EWOULDBLOCK && $! != EINTR) {
                # the server may have answered and closed early: read it
                $st->{write_error} = "write: $!";
                $st->{phase} = 'read';
                $r = 1;
            }
        } else {
            $st->{woff} += $n;
            if ($st->{woff} >= length $st->{wbuf}) {
                $st->{phase} = 'read';
                $st->{wbuf} = '';
            }
        }
    }
    return unless $r && $st->{phase} ne 'done';
    my $n = sysread($st->{sock}, my $buf, 65536);
    if (!defined $n) {
        return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        $st->{error} = "read: $!";
        _eof($st);
        return;
    }
    if ($n == 0) {
        _eof($st);
        return;
    }
    $st->{ttfb} ||= time();
    $st->{raw} .= $buf;
    $st->{pbuf} .= $buf;
    _parse($st);
}

sub _eof {
    my ($st) = @_;
    $st->{phase} = 'done';
    return if $st->{complete};
    if ($st->{pstate} eq 'close' && !$st->{error}) {
        $st->{complete} = 1;
        return;
    }
    $st->{error} ||= $st->{raw} eq ''
        ? 'connection closed without response'
          . ($st->{write_error} ? " ($st->{write_error})" : '')
        : "connection closed prematurely (in $st->{pstate})";
}

sub _parse {
    my ($st) = @_;
    while (1) {
        my $ps = $st->{pstate};
        if ($ps eq 'head') {
            my $i = index($st->{pbuf}, "\r\n\r\n");
            my $sep = 4;
            if ($i < 0) {
                $i = index($st->{pbuf}, "\n\n");
                $sep = 2;
            }
            return if $i < 0;
            my $head = substr($st->{pbuf}, 0, $i);
            substr($st->{pbuf}, 0, $i + $sep) = '';
            my ($sl, @lines) = split /\r?\n/, $head;
            unless ($sl =~ m{^HTTP/(\d+\.\d+)\s+(\d{3})(?:\s+(.*))?$}) {
                $st->{error} = "bad status line: $sl";
                $st->{phase} = 'done';
                return;
            }
            my ($ver, $status, $reason) = ($1, $2 + 0, defined $3 ? $3 : '');
            if ($status >= 100 && $status < 200 && $status != 101) {
                next;    # interim response
            }
            my (@hl, %h);
            for my $l (@lines) {
                if ($l =~ /^[ \t]/ && @hl) {    # obsolete folding
                    $hl[-1][1] .= ' ' . ($l =~ s/^\s+//r);
                    next;
                }
                my ($k, $v) = $l =~ /^([^:]+):[ \t]*(.*?)[ \t]*$/ or next;
                push @hl, [$k, $v];
            }
            for (@hl) {
                my $k = lc $_->[0];
                $h{$k} = exists $h{$k} ? "$h{$k}, $_->[1]" : $_->[1];
            }
            @{$st}{qw(version status reason headers header_list)}
                = ($ver, $status, $reason, \%h, \@hl);
            $st->{body_start} = 1;
            if ($st->{head_req} || $status == 204 || $status == 304) {
                return _complete($st);
            }
            if (defined $h{'transfer-encoding'}
                && $h{'transfer-encoding'} =~ /chunked/i)
            {
                $st->{pstate} = 'chunk_size';
            } elsif (defined $h{'content-length'}
                     && $h{'content-length'} =~ /^\s*(\d+)/) {
                $st->{left} = $1;
                $st->{pstate} = 'length';
                return _complete($st) if $st->{left} == 0;
            } else {
                $st->{pstate} = 'close';
            }
            return if _check_abort($st);
        } elsif ($ps eq 'length') {
            return unless length $st->{pbuf};
            my $take = substr($st->{pbuf}, 0, $st->{left}, '');
            $st->{body} .= $take;
            $st->{left} -= length $take;
            $st->{first_body} ||= time();
            return _complete($st) if $st->{left} <= 0;
            return if _check_abort($st);
        } elsif ($ps eq 'drain') {
            $st->{pbuf} = '';
            return;
        } elsif ($ps eq 'close') {
            return unless length $st->{pbuf};
            $st->{body} .= $st->{pbuf};
            $st->{pbuf} = '';
            $st->{first_body} ||= time();
            _check_abort($st);
            return;
        } elsif ($ps eq 'chunk_size') {
            my $i = index($st->{pbuf}, "\n");
            return if $i < 0;
            my $line = substr($st->{pbuf}, 0, $i + 1, '');
            unless ($line =~ /^\s*([0-9a-fA-F]+)/) {
                $st->{error} = "bad chunk size line: $line";
                $st->{phase} = 'done';
                return;
            }
            my $size = hex $1;
            if ($size == 0) {
                $st->{pstate} = 'trailer';
            } else {
                $st->{left} = $size;
                $st->{pstate} = 'chunk_data';
            }
        } elsif ($ps eq 'chunk_data') {
            return unless length $st->{pbuf};
            my $take = substr($st->{pbuf}, 0, $st->{left}, '');
            $st->{body} .= $take;
            $st->{left} -= length $take;
            $st->{first_body} ||= time();
            $st->{pstate} = 'chunk_crlf' if $st->{left} <= 0;
            return if _check_abort($st);
        } elsif ($ps eq 'chunk_crlf') {
            my $i = index($st->{pbuf}, "\n");
            return if $i < 0;
            substr($st->{pbuf}, 0, $i + 1) = '';
            $st->{pstate} = 'chunk_size';
        } elsif ($ps eq 'trailer') {
            my $i = index($st->{pbuf}, "\n");
            return if $i < 0;
            my $line = substr($st->{pbuf}, 0, $i + 1, '');
            return _complete($st) if $line =~ /^\r?\n$/;
        } else {
            return;
        }
    }
}

sub _check_abort {
    my ($st) = @_;
    my $n = $st->{opt}{abort_after_bytes};
    return 0 unless defined $n && length($st->{body}) >= $n;
    $st->{aborted} = 1;
    $st->{phase} = 'done';
    return 1;
}

sub _complete {
    my ($st) = @_;
    $st->{complete} = 1;
    if ($st->{opt}{read_all}) {
        # pipelined requests: raw keeps everything until the server closes
        $st->{pstate} = 'drain';
        $st->{pbuf} = '';
        return;
    }
    $st->{phase} = 'done';
    return;
}

sub _finish {
    my ($st) = @_;
    my $end = time();
    if ($st->{sock}) {
        close $st->{sock};
        delete $st->{sock};
    }
    my $start = $st->{start} || $end;
    my %r = (
        status      => $st->{status} || 0,
        headers     => $st->{headers} || {},
        header_list => $st->{header_list} || [],
        body        => $st->{body} // '',
        raw         => $st->{raw} // '',
        start       => $start,
        end         => $end,
        ms          => ($end - $start) * 1000,
    );
    $r{ttfb_ms} = ($st->{ttfb} - $start) * 1000 if $st->{ttfb};
    $r{first_body_ms} = ($st->{first_body} - $start) * 1000
        if $st->{first_body};
    $r{version} = $st->{version} if defined $st->{version};
    $r{reason} = $st->{reason} if defined $st->{reason};
    if ($st->{aborted}) {
        $r{aborted} = 1;
    } elsif ($st->{error} || !$st->{complete}) {
        $r{error} = $st->{error} || 'incomplete response';
        $r{got_status} = $r{status};
        $r{status} = 0;
    }
    return \%r;
}

1;
