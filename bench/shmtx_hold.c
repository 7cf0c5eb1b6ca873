/*
 * Hold times of the module's zone-mutex sections, measured from outside the
 * module: an LD_PRELOAD shim for nginx, used by the `queue` benchmark
 * (bench/queue_scenario.py, see bench/README.md).
 *
 *   cc -shared -fPIC -O2 -o shmtx_hold.so bench/shmtx_hold.c -ldl
 *   DSG_SHMTX_DIR=/some/dir LD_PRELOAD=$PWD/shmtx_hold.so nginx ...
 *
 * How it hooks.  The module calls nginx's ngx_shmtx_lock() and
 * ngx_shmtx_unlock() through its PLT, but a plain LD_PRELOAD definition of
 * those two names is never used: nginx (the executable) defines and exports
 * them, and the executable comes first in the global lookup scope, before
 * any preloaded library.  So the shim interposes dlopen() instead (nginx
 * does not define that one, so the preloaded definition wins), and after
 * nginx has loaded a module it rewrites that module's GOT slots of the two
 * functions (R_X86_64_JUMP_SLOT / GLOB_DAT relocations, found through the
 * module's dynamic section) to point at the wrappers below.  Only calls made
 * from dynamically loaded modules are timed: nginx's own calls (ngx_slab_alloc()
 * and the like, direct calls inside the executable) are not, and the module
 * calls the _locked slab variants inside its sections anyway.
 *
 * What it measures.  lock(): t0, the real lock, t1 (wait = t1 - t0, the
 * section starts at t1).  unlock(): t2, the real unlock (hold = t2 - t1),
 * then the histogram update, outside the section.  Clock: CLOCK_MONOTONIC
 * (vDSO); the cost of one clock read is measured at start-up and stored in
 * the file (timer_ns): a hold time includes about one of them.
 *
 * Where it writes.  Each process that takes a lock maps its own file
 * $DSG_SHMTX_DIR/shmtx.<pid> (MAP_SHARED) and counts straight into it: a
 * reader sees the live counters at any time, so a measured window is the
 * difference of two reads, with no signal, no trigger file and no syscall
 * in the locked path.  Without DSG_SHMTX_DIR (read at start-up, in the
 * master: workers get a scrubbed environment) nothing is recorded.  A forked
 * child (an nginx worker) maps a file of its own on its first lock.
 *
 * The file (little-endian, all uint64):
 *   magic "DSGSHMTX", version (1), pid, sub (sub-buckets per power of two),
 *   nbuckets, sections, hold_sum_ns, wait_sum_ns, unmatched (unlocks of a
 *   mutex this process did not lock through the shim), patched (GOT slots
 *   rewritten in this process), timer_ns, reserved[5],
 *   hold[nbuckets], wait[nbuckets].
 * Bucket of a value v (ns): v < 2*sub: v itself; else with e = floor(log2 v)
 * and m the top log2(sub)+1 bits of v: (e - log2(sub)) * sub + m.  Bucket
 * b >= 2*sub covers [lo, lo + 2^(e-log2 sub)) with lo = m << (e - log2 sub):
 * a relative width of 1/sub to 2/sub (3 to 6% with sub = 32).
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>


#define SUB_BITS   5
#define SUB        (1u << SUB_BITS)
#define NBUCKETS   (64 * SUB)
#define MAXDEPTH   16


typedef struct {
    char      magic[8];
    uint64_t  version;
    uint64_t  pid;
    uint64_t  sub;
    uint64_t  nbuckets;
    uint64_t  sections;
    uint64_t  hold_sum_ns;
    uint64_t  wait_sum_ns;
    uint64_t  unmatched;
    uint64_t  patched;
    uint64_t  timer_ns;
    uint64_t  reserved[5];
    uint64_t  hold[NBUCKETS];
    uint64_t  wait[NBUCKETS];
} shmtx_stats_t;


typedef void (*mtx_fn)(void *mtx);

static mtx_fn          real_lock;
static mtx_fn          real_unlock;
static void         *(*real_dlopen)(const char *, int);

static char            dir[4096];
static shmtx_stats_t  *stats;           /* this process's file, or NULL */
static shmtx_stats_t   scratch;         /* before/without a file */
static int             mapped_pid;
static uint64_t        patched;
static uint64_t        timer_ns;

static struct {
    void      *mtx;
    uint64_t   t;
} held[MAXDEPTH];
static int             depth;


static inline uint64_t
now_ns(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}


static inline unsigned
bucket(uint64_t v)
{
    unsigned  e;

    if (v < 2 * SUB) {
        return (unsigned) v;
    }

    e = 63 - (unsigned) __builtin_clzll(v);
    return (e - SUB_BITS) * SUB + (unsigned) (v >> (e - SUB_BITS));
}


static void
map_file(void)
{
    int             fd;
    char            path[4200];
    shmtx_stats_t  *s;

    mapped_pid = getpid();
    stats = &scratch;

    if (dir[0] == '\0') {
        return;
    }

    snprintf(path, sizeof(path), "%s/shmtx.%d", dir, mapped_pid);

    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd == -1) {
        return;
    }

    if (ftruncate(fd, sizeof(shmtx_stats_t)) == -1) {
        close(fd);
        return;
    }

    s = mmap(NULL, sizeof(shmtx_stats_t), PROT_READ | PROT_WRITE, MAP_SHARED,
             fd, 0);
    close(fd);

    if (s == MAP_FAILED) {
        return;
    }

    s->version = 1;
    s->pid = (uint64_t) mapped_pid;
    s->sub = SUB;
    s->nbuckets = NBUCKETS;
    s->patched = patched;
    s->timer_ns = timer_ns;
    memcpy(s->magic, "DSGSHMTX", 8);     /* last: the file is ready */

    stats = s;
}


static void
wrap_lock(void *mtx)
{
    uint64_t  t0, t1;

    if (stats == NULL) {
        map_file();
    }

    t0 = now_ns();
    real_lock(mtx);
    t1 = now_ns();

    stats->wait_sum_ns += t1 - t0;
    stats->wait[bucket(t1 - t0)]++;

    if (depth < MAXDEPTH) {
        held[depth].mtx = mtx;
        held[depth].t = t1;
    }

    depth++;
}


static void
wrap_unlock(void *mtx)
{
    int       i;
    uint64_t  t2, hold;

    t2 = now_ns();
    real_unlock(mtx);

    if (stats == NULL) {
        map_file();
    }

    for (i = (depth < MAXDEPTH ? depth : MAXDEPTH) - 1; i >= 0; i--) {
        if (held[i].mtx == mtx) {
            break;
        }
    }

    if (i < 0) {
        stats->unmatched++;
        return;
    }

    hold = t2 - held[i].t;

    /* close the gap if sections were not nested in LIFO order */
    for (; i < depth - 1 && i < MAXDEPTH - 1; i++) {
        held[i] = held[i + 1];
    }

    depth--;

    stats->sections++;
    stats->hold_sum_ns += hold;
    stats->hold[bucket(hold)]++;
}


/* rewrites the GOT slots of ngx_shmtx_lock/unlock in one loaded object */

static void
patch_object(struct link_map *lm)
{
    long               pagesz;
    size_t             i, n, relsz, pltrelsz, syment;
    uintptr_t          base, slot, page;
    ElfW(Dyn)         *d;
    ElfW(Rela)        *rel, *pltrel, *tab, *r;
    ElfW(Sym)         *symtab;
    const char        *strtab, *name;
    void              *target;

    if (lm == NULL || lm->l_ld == NULL || real_lock == NULL) {
        return;
    }

    base = (uintptr_t) lm->l_addr;
    symtab = NULL;
    strtab = NULL;
    rel = pltrel = NULL;
    relsz = pltrelsz = 0;
    syment = sizeof(ElfW(Sym));

#define ADDR(v)  ((uintptr_t) (v) < base ? base + (uintptr_t) (v) : (uintptr_t) (v))

    for (d = lm->l_ld; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
        case DT_SYMTAB:   symtab = (ElfW(Sym) *) ADDR(d->d_un.d_ptr); break;
        case DT_STRTAB:   strtab = (const char *) ADDR(d->d_un.d_ptr); break;
        case DT_RELA:     rel = (ElfW(Rela) *) ADDR(d->d_un.d_ptr); break;
        case DT_RELASZ:   relsz = d->d_un.d_val; break;
        case DT_JMPREL:   pltrel = (ElfW(Rela) *) ADDR(d->d_un.d_ptr); break;
        case DT_PLTRELSZ: pltrelsz = d->d_un.d_val; break;
        case DT_SYMENT:   syment = d->d_un.d_val; break;
        }
    }

    if (symtab == NULL || strtab == NULL) {
        return;
    }

    pagesz = sysconf(_SC_PAGESIZE);

    for (int t = 0; t < 2; t++) {
        tab = t ? pltrel : rel;
        n = (t ? pltrelsz : relsz) / sizeof(ElfW(Rela));

        for (i = 0; tab != NULL && i < n; i++) {
            r = &tab[i];

            if (ELF64_R_TYPE(r->r_info) != R_X86_64_JUMP_SLOT
                && ELF64_R_TYPE(r->r_info) != R_X86_64_GLOB_DAT)
            {
                continue;
            }

            name = strtab
                   + ((ElfW(Sym) *) ((char *) symtab
                                     + ELF64_R_SYM(r->r_info) * syment))->st_name;

            if (strcmp(name, "ngx_shmtx_lock") == 0) {
                target = (void *) wrap_lock;

            } else if (strcmp(name, "ngx_shmtx_unlock") == 0) {
                target = (void *) wrap_unlock;

            } else {
                continue;
            }

            slot = base + r->r_offset;
            if (*(void **) slot == target) {
                continue;
            }

            page = slot & ~((uintptr_t) pagesz - 1);
            if (mprotect((void *) page, (size_t) pagesz,
                         PROT_READ | PROT_WRITE) == -1)
            {
                continue;
            }

            *(void **) slot = target;
            patched++;
        }
    }

#undef ADDR

    if (stats != NULL) {
        stats->patched = patched;
    }
}


void *
dlopen(const char *file, int mode)
{
    void              *h;
    struct link_map   *lm;

    if (real_dlopen == NULL) {
        real_dlopen = (void *(*)(const char *, int)) dlsym(RTLD_NEXT, "dlopen");
    }

    h = real_dlopen(file, mode);

    if (h != NULL && file != NULL && dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0) {
        patch_object(lm);
    }

    return h;
}


static void
atfork_child(void)
{
    /* a worker: its own file on its first lock */
    stats = NULL;
    depth = 0;
}


__attribute__((constructor))
static void
shim_init(void)
{
    const char  *e;
    uint64_t     t[65], best;
    int          i;

    e = getenv("DSG_SHMTX_DIR");
    if (e != NULL) {
        snprintf(dir, sizeof(dir), "%s", e);
    }

    real_lock = (mtx_fn) dlsym(RTLD_DEFAULT, "ngx_shmtx_lock");
    real_unlock = (mtx_fn) dlsym(RTLD_DEFAULT, "ngx_shmtx_unlock");

    if (real_lock == NULL || real_unlock == NULL) {
        /* not nginx: stay out of the way */
        real_lock = NULL;
        return;
    }

    /* the cost of one clock read: the least of 64 back-to-back differences */
    for (i = 0; i < 65; i++) {
        t[i] = now_ns();
    }

    best = UINT64_MAX;
    for (i = 1; i < 65; i++) {
        if (t[i] - t[i - 1] < best) {
            best = t[i] - t[i - 1];
        }
    }

    timer_ns = best;

    pthread_atfork(NULL, NULL, atfork_child);
}
