/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * The `tokens` benchmark's micro-benchmark (bench/tokens_scenario.py
 * compiles and runs it): what the body measure of a token-budget zone
 * costs, function by function, on chat bodies of 1 KB, 100 KB and 1 MB,
 * ASCII words or CJK text in the message content, with and without
 * "max_tokens".
 *
 *   gcc -O2 -I ngx_deepseek_guard_module -o tokens_parse bench/tokens_parse.c \
 *       ngx_deepseek_guard_module/dsg_tokens.c \
 *       ngx_deepseek_guard_module/dsg_json.c -ljansson
 *   ./tokens_parse [--json] [--ms N] [--reps N] [size ...]
 *
 * Timed per body (clock_gettime(CLOCK_MONOTONIC); the iteration count is
 * calibrated to about N ms, default 100, and the fastest of --reps such
 * runs, default 5, is reported as µs per call and MB/s of body: on a
 * shared machine the fastest run is the one least disturbed by other
 * processes; --json also gives the median and the slowest):
 *
 *   scan      dsg_tokens_scan() + dsg_tokens_estimate(): the prompt
 *             estimate, run on every body;
 *   names     the glue's test whether the body names max_tokens or
 *             max_completion_tokens: two case-insensitive searches, the
 *             algorithm of nginx's ngx_strlcasestrn() (copied below: this
 *             program does not link nginx);
 *   json      dsg_json_max_tokens(): prescan + jansson parse; the module
 *             runs it only when "names" found a name, it is timed on every
 *             body for comparison;
 *   measure   what ngx_http_deepseek_guard_tokens_measure() runs on a body
 *             in one buffer: scan, names, and json when named.
 *
 * Without --json: a markdown table.  With --json: one JSON object a line.
 */


#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dsg_tokens.h"
#include "dsg_json.h"


static volatile uint64_t  sink;


/* nginx's ngx_strlcasestrn() and ngx_strncasecmp(), same algorithm */

static int
names_strncasecmp(const unsigned char *s1, const unsigned char *s2, size_t n)
{
    unsigned int  c1, c2;

    while (n) {
        c1 = *s1++;
        c2 = *s2++;

        c1 = (c1 >= 'A' && c1 <= 'Z') ? (c1 | 0x20) : c1;
        c2 = (c2 >= 'A' && c2 <= 'Z') ? (c2 | 0x20) : c2;

        if (c1 == c2) {
            if (c1) {
                n--;
                continue;
            }

            return 0;
        }

        return (int) c1 - (int) c2;
    }

    return 0;
}


static const unsigned char *
names_strlcasestrn(const unsigned char *s1, const unsigned char *last,
    const unsigned char *s2, size_t n)
{
    unsigned int  c1, c2;

    c2 = *s2++;
    c2 = (c2 >= 'A' && c2 <= 'Z') ? (c2 | 0x20) : c2;
    last -= n;

    do {
        do {
            if (s1 >= last) {
                return NULL;
            }

            c1 = *s1++;
            c1 = (c1 >= 'A' && c1 <= 'Z') ? (c1 | 0x20) : c1;

        } while (c1 != c2);

    } while (names_strncasecmp(s1, s2, n) != 0);

    return --s1;
}


/* as the glue calls it: the length of the name minus one */
static int
names(const unsigned char *b, size_t len)
{
    static const unsigned char  a[] = "max_tokens\"";
    static const unsigned char  c[] = "max_completion_tokens\"";

    return names_strlcasestrn(b, b + len, a, sizeof(a) - 2) != NULL
           || names_strlcasestrn(b, b + len, c, sizeof(c) - 2) != NULL;
}


/* ------------------------------------------------------------ the bodies */

static const char  *words[] = {
    "the", "model", "answer", "request", "token", "budget", "please",
    "explain", "why", "a", "gateway", "limits", "each", "key", "in",
    "shared", "memory", "and", "how", "settlement", "works", "when",
    "upstream", "returns", "usage", "prompt", "completion", "stream",
    "of", "events", "client", "server", "latency", "throughput", "is",
    "measured", "with", "wrk", "against", "nginx", "worker", "process"
};


static uint32_t  rng = 2463534242u;

static uint32_t
next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}


/*
 * A chat completion request of exactly size bytes: a system message, a
 * user message whose content is ASCII words (or CJK characters, raw UTF-8,
 * with an ASCII space every 20), then "max_tokens":256 or
 * "temperature":0.7 (the same length), padded with spaces in the content.
 */
static unsigned char *
make_body(size_t size, int cjk, int max_tokens)
{
    static const char  head[] =
        "{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"system\","
        "\"content\":\"You are a helpful assistant.\"},{\"role\":\"user\","
        "\"content\":\"";
    const char        *tail;
    size_t             hl, tl, room, n, k;
    unsigned char     *b, *p;
    uint32_t           cp;

    tail = max_tokens ? "\"}],\"stream\":false,\"max_tokens\":256}"
                      : "\"}],\"stream\":false,\"temperature\":0.7}";

    hl = sizeof(head) - 1;
    tl = strlen(tail);

    if (size < hl + tl + 1) {
        return NULL;
    }

    b = malloc(size + 1);
    if (b == NULL) {
        return NULL;
    }

    memcpy(b, head, hl);
    p = b + hl;
    room = size - hl - tl;
    n = 0;

    while (n < room) {
        if (cjk) {
            if (n % 61 == 60 || room - n < 3) {
                p[n++] = ' ';
                continue;
            }

            cp = 0x4e00 + next_rand() % 0x5000;       /* CJK ideographs */
            p[n++] = (unsigned char) (0xe0 | (cp >> 12));
            p[n++] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
            p[n++] = (unsigned char) (0x80 | (cp & 0x3f));

        } else {
            const char  *w = words[next_rand() % (sizeof(words)
                                                  / sizeof(words[0]))];

            k = strlen(w);

            if (room - n < k + 1) {
                p[n++] = ' ';
                continue;
            }

            memcpy(p + n, w, k);
            n += k;
            p[n++] = ' ';
        }
    }

    memcpy(b + hl + room, tail, tl);
    b[size] = '\0';

    return b;
}


/* ------------------------------------------------------------ the timings */

enum { F_SCAN, F_NAMES, F_JSON, F_MEASURE, F_N };

static const char  *fname[F_N] = { "scan", "names", "json", "measure" };


static uint64_t
run_once(int f, const unsigned char *b, size_t len)
{
    uint64_t           mt;
    dsg_tokens_scan_t  sc;

    switch (f) {

    case F_SCAN:
        memset(&sc, 0, sizeof(sc));
        dsg_tokens_scan(b, len, &sc);
        return dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE);

    case F_NAMES:
        return (uint64_t) names(b, len);

    case F_JSON:
        (void) dsg_json_max_tokens((const char *) b, len, &mt);
        return mt;

    default:
        memset(&sc, 0, sizeof(sc));
        dsg_tokens_scan(b, len, &sc);
        mt = 0;

        if (names(b, len)) {
            (void) dsg_json_max_tokens((const char *) b, len, &mt);
        }

        return dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE) + mt;
    }
}


static double
now_s(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}


static double
time_iters(int f, const unsigned char *b, size_t len, uint64_t iters)
{
    double    t0;
    uint64_t  i, s;

    s = 0;
    t0 = now_s();

    for (i = 0; i < iters; i++) {
        s += run_once(f, b, len);
    }

    sink += s;

    return now_s() - t0;
}


static int
cmp_double(const void *a, const void *b)
{
    double  x = *(const double *) a, y = *(const double *) b;

    return (x > y) - (x < y);
}


/* µs per call: the fastest of reps runs of about ms milliseconds each */
static double
measure(int f, const unsigned char *b, size_t len, double ms, int reps,
    uint64_t *iters_out, double *med_us, double *max_us)
{
    int       r;
    double    t, per[64];
    uint64_t  iters;

    /* calibration: double until a run takes a tenth of the target */
    iters = 1;

    for ( ;; ) {
        t = time_iters(f, b, len, iters);

        if (t >= ms / 10000.0 || iters >= (1ULL << 40)) {
            break;
        }

        iters *= 2;
    }

    iters = (uint64_t) ((double) iters * (ms / 1000.0) / (t > 0 ? t : 1e-9));
    if (iters == 0) {
        iters = 1;
    }

    if (reps > 64) {
        reps = 64;
    }

    for (r = 0; r < reps; r++) {
        per[r] = time_iters(f, b, len, iters) * 1e6 / (double) iters;
    }

    qsort(per, (size_t) reps, sizeof(double), cmp_double);

    *iters_out = iters;
    *med_us = per[reps / 2];
    *max_us = per[reps - 1];

    return per[0];
}


static size_t
parse_size(const char *s)
{
    char    *end;
    double   v;

    v = strtod(s, &end);

    if (*end == 'k' || *end == 'K') {
        v *= 1024;
        end++;

    } else if (*end == 'm' || *end == 'M') {
        v *= 1024 * 1024;
        end++;
    }

    if (*end != '\0' || v < 256 || v > 64.0 * 1024 * 1024) {
        return 0;
    }

    return (size_t) v;
}


static void
size_name(size_t size, char *out, size_t cap)
{
    if (size % (1024 * 1024) == 0) {
        snprintf(out, cap, "%zu MB", size / (1024 * 1024));

    } else if (size % 1024 == 0) {
        snprintf(out, cap, "%zu KB", size / 1024);

    } else {
        snprintf(out, cap, "%zu B", size);
    }
}


int
main(int argc, char **argv)
{
    int             i, json, reps, cjk, mt, f, rc, named;
    char            sname[32];
    double          ms, us, med, hi;
    size_t          sizes[16], nsizes, s;
    uint64_t        iters, est, max_out;
    unsigned char  *b;
    dsg_tokens_scan_t  sc;

    json = 0;
    ms = 100;
    reps = 5;
    nsizes = 0;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;

        } else if (strcmp(argv[i], "--ms") == 0 && i + 1 < argc) {
            ms = atof(argv[++i]);

        } else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            reps = atoi(argv[++i]);

        } else if (nsizes < 16 && (s = parse_size(argv[i])) != 0) {
            sizes[nsizes++] = s;

        } else {
            fprintf(stderr, "usage: %s [--json] [--ms N] [--reps N] "
                    "[size (256 .. 64m, e.g. 1k 100k 1m) ...]\n", argv[0]);
            return 2;
        }
    }

    if (ms <= 0 || reps < 1) {
        fprintf(stderr, "--ms and --reps: positive\n");
        return 2;
    }

    if (nsizes == 0) {
        sizes[0] = 1024;
        sizes[1] = 100 * 1024;
        sizes[2] = 1024 * 1024;
        nsizes = 3;
    }

    if (!json) {
        printf("| body | text | max_tokens | function | µs per call | "
               "MB/s | iterations | estimate | max_tokens read |\n"
               "|---|---|---|---|---:|---:|---:|---:|---:|\n");
    }

    for (s = 0; s < nsizes; s++) {
        for (cjk = 0; cjk <= 1; cjk++) {
            for (mt = 0; mt <= 1; mt++) {
                b = make_body(sizes[s], cjk, mt);
                if (b == NULL) {
                    fprintf(stderr, "no body of %zu bytes\n", sizes[s]);
                    return 1;
                }

                /* what the module would compute: checked, not timed */
                memset(&sc, 0, sizeof(sc));
                dsg_tokens_scan(b, sizes[s], &sc);
                est = dsg_tokens_estimate(&sc, DSG_TOKENS_RATIO_ONE);
                rc = dsg_json_max_tokens((const char *) b, sizes[s],
                                         &max_out);
                named = names(b, sizes[s]);

                if (rc != DSG_JSON_OK || named != mt
                    || max_out != (mt ? 256 : 0))
                {
                    fprintf(stderr, "body %zu cjk=%d max_tokens=%d: json "
                            "%s, named %d, max_tokens %llu\n", sizes[s], cjk,
                            mt, dsg_json_strerror(rc), named,
                            (unsigned long long) max_out);
                    return 1;
                }

                size_name(sizes[s], sname, sizeof(sname));

                for (f = 0; f < F_N; f++) {
                    us = measure(f, b, sizes[s], ms, reps, &iters, &med, &hi);

                    if (json) {
                        printf("{\"size\":%zu,\"text\":\"%s\",\"max_tokens\":%s,"
                               "\"function\":\"%s\",\"us\":%.4f,\"us_median\":%.4f,"
                               "\"us_max\":%.4f,\"mb_s\":%.1f,\"iterations\":%llu,"
                               "\"estimate\":%llu,\"ascii\":%llu,"
                               "\"nonascii\":%llu,\"max_tokens_read\":%llu}\n",
                               sizes[s], cjk ? "cjk" : "ascii",
                               mt ? "true" : "false", fname[f], us, med, hi,
                               (double) sizes[s] / us,
                               (unsigned long long) iters,
                               (unsigned long long) est,
                               (unsigned long long) sc.ascii,
                               (unsigned long long) sc.nonascii,
                               (unsigned long long) max_out);

                    } else {
                        printf("| %s | %s | %s | %s | %.2f | %.0f | %llu | "
                               "%llu | %llu |\n", sname,
                               cjk ? "CJK" : "ASCII", mt ? "yes" : "no",
                               fname[f], us, (double) sizes[s] / us,
                               (unsigned long long) iters,
                               (unsigned long long) est,
                               (unsigned long long) max_out);
                    }

                    fflush(stdout);
                }

                free(b);
            }
        }
    }

    return 0;
}
