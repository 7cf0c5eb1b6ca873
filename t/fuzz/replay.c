/*
 * Copyright (C) ngx_deepseek_guard_module authors
 *
 * main() of the replay build of a fuzz target: feeds every file named on
 * the command line, or found (non-recursively) in a directory named
 * there, to LLVMFuzzerTestOneInput() once, in name order.  Built with gcc
 * and -fsanitize=address,undefined by build.sh: a regression input that
 * crashes, trips a sanitizer or fails an invariant fails the replay.
 */


#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"


int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));


static unsigned long  replayed;


static int
replay_file(const char *path)
{
    FILE     *fp;
    long      n;
    uint8_t  *buf;

    fp = fopen(path, "rb");
    if (fp == NULL) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
        return -1;
    }

    if (fseek(fp, 0, SEEK_END) != 0 || (n = ftell(fp)) < 0
        || fseek(fp, 0, SEEK_SET) != 0)
    {
        fprintf(stderr, "replay: %s: cannot size\n", path);
        fclose(fp);
        return -1;
    }

    /* a separate exact-size heap block: ASan sees any overread */
    buf = malloc(n > 0 ? (size_t) n : 1);
    if (buf == NULL || (n > 0 && fread(buf, 1, (size_t) n, fp) != (size_t) n))
    {
        fprintf(stderr, "replay: %s: cannot read\n", path);
        free(buf);
        fclose(fp);
        return -1;
    }

    fclose(fp);

    if (getenv("DSG_REPLAY_VERBOSE") != NULL) {
        fprintf(stderr, "replay: %s (%ld bytes)\n", path, n);
    }

    LLVMFuzzerTestOneInput(buf, (size_t) n);
    free(buf);
    replayed++;

    return 0;
}


static int
by_name(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}


int
main(int argc, char **argv)
{
    int              i, k, n, rc;
    char            *path;
    const char      *name;
    size_t           len;
    struct stat      st;
    struct dirent  **names;

    if (LLVMFuzzerInitialize != NULL) {
        LLVMFuzzerInitialize(&argc, &argv);
    }

    rc = 0;

    for (i = 1; i < argc; i++) {
        if (stat(argv[i], &st) != 0) {
            /* a target without regressions yet: nothing to replay */
            continue;
        }

        if (!S_ISDIR(st.st_mode)) {
            rc |= replay_file(argv[i]) != 0;
            continue;
        }

        n = scandir(argv[i], &names, NULL, by_name);
        if (n < 0) {
            fprintf(stderr, "replay: %s: %s\n", argv[i], strerror(errno));
            rc = 1;
            continue;
        }

        for (k = 0; k < n; k++) {
            if (names[k]->d_name[0] != '.') {
                len = strlen(argv[i]) + strlen(names[k]->d_name) + 2;
                path = malloc(len);
                if (path == NULL) {
                    return 2;
                }

                snprintf(path, len, "%s/%s", argv[i], names[k]->d_name);

                if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
                    rc |= replay_file(path) != 0;
                }

                free(path);
            }

            free(names[k]);
        }

        free(names);
    }

    name = strrchr(argv[0], '/');
    printf("%s: replayed %lu inputs\n", name ? name + 1 : argv[0], replayed);

    return rc;
}
