#!/usr/bin/env python3
# Instructions per request of the nginx worker under callgrind, per path of
# bench/conf/throughput.conf (admit and reject paths, guard and stock):
# deterministic where req/s and req/cpu-s move with the machine's load.
# Usage: bench/instructions.py <module.so> <scratch dir>  (valgrind needed)
import os, sys, subprocess, time, http.client, glob, re, socket
so, outdir = sys.argv[1], sys.argv[2]
N = 2000
os.makedirs(outdir + '/logs', exist_ok=True)
s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
conf = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'conf', 'throughput.conf')).read()
conf = conf.replace('{{LOAD_MODULE}}', 'load_module %s;' % so).replace('{{USER}}', '')
conf = conf.replace('{{PREFIX}}', outdir).replace('{{PORT}}', str(port)).replace('{{HTTP_COMMON}}', '')
conf = 'daemon off;\nmaster_process off;\n' + conf
open(outdir + '/nginx.conf', 'w').write(conf)
p = subprocess.Popen(['valgrind', '--tool=callgrind', '--callgrind-out-file=%s/cg.%%p' % outdir,
                      '/usr/sbin/nginx', '-p', outdir, '-c', outdir + '/nginx.conf'],
                     stdout=subprocess.DEVNULL, stderr=open(outdir + '/vg.log', 'w'))
for i in range(200):
    try:
        socket.create_connection(('127.0.0.1', port), 1).close(); break
    except OSError: time.sleep(0.2)
def run(path, n, key):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    for i in range(n):
        c.request('GET', path, headers={'Authorization': key})
        r = c.getresponse(); r.read()
    c.close()
res = {}
for path, key in [('/plain', 'Bearer a'), ('/limit_req', 'Bearer a'), ('/guard', 'Bearer a'),
                  ('/reject/limit_req', 'Bearer r'), ('/reject/guard', 'Bearer r')]:
    run(path, 100, key)
    subprocess.run(['callgrind_control', '-z', str(p.pid)], stdout=subprocess.DEVNULL)
    run(path, N, key)
    subprocess.run(['callgrind_control', '-d', path.replace('/', '_'), str(p.pid)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    f = sorted(glob.glob(outdir + '/cg.%d.*' % p.pid), key=os.path.getmtime)[-1]
    tot = None
    for line in open(f):
        if line.startswith('summary:') or line.startswith('totals:'):
            tot = int(line.split()[1])
    res[path] = tot / N
p.terminate(); p.wait()
for k, v in res.items():
    print('%-20s %10.0f Ir/request' % (k, v))
