/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * An open-loop GET client in C for the stall scenario (bench/README.md,
 * scenario 11): the hits' latency is what is measured there, and a Python
 * client's own scheduling (about 2 ms at the median for a local 1 KB hit,
 * several ms at p99) hid the few milliseconds the scenario looks for.
 *
 * Request i is scheduled at t0 + i / rate and sent then, whatever became of
 * the earlier ones (no coordinated omission), on a connection of its own
 * ("Connection: close"), as loadgen.py does.  A timerfd wakes the loop at
 * each scheduled time: no spinning beside the nginx it measures.
 *
 *   hitclient <port> <path> <rate> <seconds> <records.jsonl>
 *
 * records: one JSON object per request, as loadgen.py writes them (i,
 * status, cache, lat_ms, bytes, err; lat_ms from the scheduled time to the
 * last byte); stdout: a JSON summary (scheduled, sent, completed, errors,
 * lateness_ms p50/p99/max, achieved_rate).
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX  8192
#define TIMEOUT_NS  (30 * 1000000000LL)

typedef struct {
    int        fd;
    int        status;
    int        done;
    int        sending;    /* connecting, the request not yet written */
    int64_t    sched;      /* ns, monotonic */
    int64_t    start;
    int64_t    end;
    size_t     got;        /* bytes read in all */
    size_t     head_len;   /* 0 until the header block ended */
    long long  clen;       /* -1: none */
    char       cache[16];
    const char *err;
    char       head[HEAD_MAX];
} req_t;


static int64_t
now_ns(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}


static int
cmp_i64(const void *a, const void *b)
{
    int64_t  x = *(const int64_t *) a, y = *(const int64_t *) b;

    return (x > y) - (x < y);
}


static double
pct_ms(int64_t *v, size_t n, double p)
{
    size_t  k;

    if (n == 0) {
        return 0;
    }

    k = (size_t) (p / 100.0 * (double) (n - 1) + 0.5);
    return (double) v[k] / 1e6;
}


/* the header block is complete: status, Content-Length, X-Cache-Status */

static void
parse_head(req_t *q)
{
    char  *p, *eol, *end;

    end = q->head + q->head_len;
    q->clen = -1;

    if (sscanf(q->head, "HTTP/1.%*c %d", &q->status) != 1) {
        q->status = 0;
    }

    for (p = memchr(q->head, '\n', q->head_len); p && p < end; p = eol) {
        p++;
        eol = memchr(p, '\n', end - p);
        if (eol == NULL) {
            break;
        }

        if (strncasecmp(p, "Content-Length:", 15) == 0) {
            q->clen = strtoll(p + 15, NULL, 10);

        } else if (strncasecmp(p, "X-Cache-Status:", 15) == 0) {
            char    *v = p + 15;
            size_t   n;

            while (*v == ' ') {
                v++;
            }

            for (n = 0; n < sizeof(q->cache) - 1 && v + n < eol
                        && v[n] != '\r'; n++)
            {
                q->cache[n] = v[n];
            }

            q->cache[n] = '\0';
        }
    }
}


static void
finish(req_t *q, int ep, const char *err)
{
    if (q->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, q->fd, NULL);
        close(q->fd);
        q->fd = -1;
    }

    q->end = now_ns();
    q->err = err;
    q->done = 1;
}


/* reads what is there; 1 when the answer is complete */

static int
on_read(req_t *q, int ep)
{
    char     buf[65536], *hit;
    ssize_t  n;
    size_t   room, body;

    for ( ;; ) {
        n = read(q->fd, buf, sizeof(buf));

        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                return 0;
            }
            finish(q, ep, "read");
            return 1;
        }

        if (n == 0) {
            finish(q, ep, (q->head_len && q->clen < 0) ? NULL : "closed");
            return 1;
        }

        if (q->head_len == 0) {
            room = HEAD_MAX - 1 - q->got;
            memcpy(q->head + q->got, buf, (size_t) n < room ? (size_t) n : room);
            q->head[q->got + ((size_t) n < room ? (size_t) n : room)] = '\0';
            hit = strstr(q->head, "\r\n\r\n");
            if (hit) {
                q->head_len = (size_t) (hit - q->head) + 4;
                parse_head(q);
            } else if ((size_t) n >= room) {
                q->got += n;
                finish(q, ep, "header too long");
                return 1;
            }
        }

        q->got += n;

        if (q->head_len && q->clen >= 0) {
            body = q->got - q->head_len;
            if ((long long) body >= q->clen) {
                finish(q, ep, NULL);
                return 1;
            }
        }
    }
}


static int
launch(req_t *q, int ep, struct sockaddr_in *sa, const char *path)
{
    int                 fd, one = 1;
    char                req[1024];
    int                 len;
    struct epoll_event  ev;

    q->start = now_ns();
    q->fd = -1;
    q->cache[0] = '\0';

    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        finish(q, ep, "socket");
        return -1;
    }

    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    if (connect(fd, (struct sockaddr *) sa, sizeof(*sa)) < 0
        && errno != EINPROGRESS)
    {
        close(fd);
        finish(q, ep, "connect");
        return -1;
    }

    q->fd = fd;

    /* loopback: the request fits the socket buffer once connected */
    len = snprintf(req, sizeof(req),
                   "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                   "Connection: close\r\n\r\n",
                   path, ntohs(sa->sin_port));

    ev.events = EPOLLOUT;
    ev.data.ptr = q;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);

    /* the request is kept in the head buffer until the connect completes */
    memcpy(q->head, req, (size_t) len + 1);
    q->got = 0;
    q->head_len = 0;
    q->sending = 1;

    return 0;
}


int
main(int argc, char **argv)
{
    int                 ep, tfd, port, nev, i, r;
    long                rate, secs, total, next, sent, doneN, errors, oldest;
    int64_t             t0, now, *lat, *late;
    size_t              nlat, nlate;
    double              sx, sy, sxx, sxy, slope;
    FILE               *out;
    req_t              *reqs, *q;
    const char         *path;
    struct sockaddr_in  sa;
    struct itimerspec   its;
    struct epoll_event  ev, evs[256];

    if (argc != 6) {
        fprintf(stderr, "usage: hitclient <port> <path> <rate> <seconds> "
                        "<records.jsonl>\n");
        return 2;
    }

    port = atoi(argv[1]);
    path = argv[2];
    rate = atol(argv[3]);
    secs = atol(argv[4]);
    total = rate * secs;

    if (port <= 0 || rate <= 0 || secs <= 0 || strlen(path) > 900) {
        fprintf(stderr, "hitclient: bad arguments\n");
        return 2;
    }

    out = fopen(argv[5], "w");
    reqs = calloc((size_t) total, sizeof(req_t));
    lat = calloc((size_t) total, sizeof(int64_t));
    late = calloc((size_t) total, sizeof(int64_t));

    if (out == NULL || reqs == NULL || lat == NULL || late == NULL) {
        perror("hitclient");
        return 1;
    }

    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t) port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    ep = epoll_create1(0);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);

    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);

    t0 = now_ns() + 200000000LL;

    for (i = 0; i < total; i++) {
        reqs[i].fd = -1;
        reqs[i].sched = t0 + (int64_t) ((double) i * 1e9 / (double) rate);
    }

    next = 0;
    oldest = 0;
    sent = 0;
    doneN = 0;
    errors = 0;

    while (doneN < total) {
        now = now_ns();

        while (next < total && reqs[next].sched <= now) {
            q = &reqs[next++];
            late[sent++] = now - q->sched;
            if (launch(q, ep, &sa, path) != 0) {
                doneN++;
                errors++;
            }
        }

        if (next < total) {
            memset(&its, 0, sizeof(its));
            its.it_value.tv_sec = reqs[next].sched / 1000000000LL;
            its.it_value.tv_nsec = reqs[next].sched % 1000000000LL;
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }

        nev = epoll_wait(ep, evs, 256, 1000);

        for (r = 0; r < nev; r++) {
            q = evs[r].data.ptr;

            if (q == NULL) {
                uint64_t  x;

                (void) read(tfd, &x, sizeof(x));
                continue;
            }

            if (q->done) {
                continue;
            }

            if (q->sending) {
                /* connected: send the request, then wait for the answer */
                size_t   len = strlen(q->head);
                ssize_t  n = write(q->fd, q->head, len);

                if (n != (ssize_t) len) {
                    finish(q, ep, "write");
                    doneN++;
                    errors++;
                    continue;
                }

                q->head[0] = '\0';
                q->sending = 0;
                ev.events = EPOLLIN;
                ev.data.ptr = q;
                epoll_ctl(ep, EPOLL_CTL_MOD, q->fd, &ev);
                continue;
            }

            if (on_read(q, ep)) {
                doneN++;
                if (q->err || q->status != 200) {
                    errors++;
                }
            }
        }

        /* requests that outlived the timeout, from the oldest open one */
        now = now_ns();
        while (oldest < next && reqs[oldest].done) {
            oldest++;
        }
        for (i = oldest; i < next; i++) {
            if (!reqs[i].done && now - reqs[i].sched > TIMEOUT_NS) {
                finish(&reqs[i], ep, "timeout");
                doneN++;
                errors++;
            }
        }
    }

    nlat = 0;

    for (i = 0; i < total; i++) {
        q = &reqs[i];
        fprintf(out, "{\"i\": %d, \"cls\": \"all\", \"status\": %d, "
                     "\"cache\": %s%s%s, \"lat_ms\": %.3f, \"bytes\": %zu, "
                     "\"err\": %s%s%s}\n",
                i, q->err ? 0 : q->status,
                q->cache[0] ? "\"" : "", q->cache[0] ? q->cache : "null",
                q->cache[0] ? "\"" : "",
                (double) (q->end - q->sched) / 1e6,
                q->head_len ? q->got - q->head_len : 0,
                q->err ? "\"" : "", q->err ? q->err : "null",
                q->err ? "\"" : "");
        if (!q->err && q->status == 200) {
            lat[nlat++] = q->end - q->sched;
        }
    }

    fclose(out);

    /* the achieved rate: 1 / slope of the launch times against i */
    sx = sy = sxx = sxy = 0;
    for (i = 0; i < total; i++) {
        double  x = i, y = (double) (reqs[i].start - t0) / 1e9;

        sx += x; sy += y; sxx += x * x; sxy += x * y;
    }
    slope = (total * sxy - sx * sy) / (total * sxx - sx * sx);

    nlate = (size_t) sent;
    qsort(late, nlate, sizeof(int64_t), cmp_i64);
    qsort(lat, nlat, sizeof(int64_t), cmp_i64);

    printf("{\"scheduled\": %ld, \"sent\": %ld, \"completed\": %zu, "
           "\"errors\": %ld, \"lateness_ms\": {\"p50\": %.3f, \"p99\": %.3f, "
           "\"max\": %.3f}, \"achieved_rate\": %.2f, \"latency_ms\": "
           "{\"p50\": %.3f, \"p99\": %.3f}}\n",
           total, sent, nlat, errors,
           pct_ms(late, nlate, 50), pct_ms(late, nlate, 99),
           nlate ? (double) late[nlate - 1] / 1e6 : 0,
           slope > 0 ? 1.0 / slope : 0,
           pct_ms(lat, nlat, 50), pct_ms(lat, nlat, 99));

    return 0;
}
