/*
 * memshape: the endings tierbox doctor is tested on, as one small C program
 * built statically for Linux tiers and to WASI for the wasm tier.
 *
 *   memshape leak STEP_MIB INTERVAL_MS      grow STEP_MIB every INTERVAL_MS until killed
 *   memshape spike STEADY_MS SIZE_MIB       hold 1 MiB for STEADY_MS, then SIZE_MIB at once
 *   memshape workingset SIZE_MIB CHUNK_MIB PAUSE_MS
 *                                           load SIZE_MIB in CHUNK_MIB pieces PAUSE_MS apart
 *                                           (reading a model, filling a cache), then work on it
 *   memshape childoom SIZE_MIB              a child allocates SIZE_MIB; the parent exits 0
 *   memshape cpu SECONDS                    spin for SECONDS of CPU time
 *
 * Memory is written as it is allocated so that every page is resident. An
 * allocation that fails (the wasm tier refuses memory.grow at its limit)
 * aborts, as a program out of memory does.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifndef __wasi__
#include <sys/wait.h>
#include <unistd.h>
#endif

#define MIB (1024 * 1024)

/* every allocation stays reachable, written through volatile: no compiler may drop it */
static char *volatile held[4096];
static size_t nheld;

static char *grab(size_t mib) {
    char *volatile p = malloc(mib * MIB);
    if (p == NULL) {
        fprintf(stderr, "memshape: out of memory allocating %zu MiB\n", mib);
        abort();
    }
    for (size_t i = 0; i < mib * MIB; i += 4096) ((volatile char *)p)[i] = (char)(i >> 12 | 1);
    held[nheld++ % 4096] = p;
    return p;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static volatile unsigned long sink;

static void work(char **chunks, size_t n, size_t chunk_mib, long ms) {
    /* touch the whole working set again and again for ms */
    for (long t = 0; t < ms; t += 50) {
        for (size_t c = 0; c < n; c++)
            for (size_t i = 0; i < chunk_mib * MIB; i += 4096) sink += (unsigned char)chunks[c][i];
        sleep_ms(50);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: memshape leak|spike|workingset|childoom|cpu ARGS\n");
        return 2;
    }
    const char *mode = argv[1];
    long a = argc > 2 ? atol(argv[2]) : 0, b = argc > 3 ? atol(argv[3]) : 0;
    setvbuf(stdout, NULL, _IONBF, 0);
    if (strcmp(mode, "leak") == 0) {
        for (long n = 1;; n++) {
            grab((size_t)a);
            printf("held %ld MiB\n", n * a);
            sleep_ms(b);
        }
    }
    if (strcmp(mode, "spike") == 0) {
        char *small = grab(1);
        work(&small, 1, 1, a);
        grab((size_t)b);
        printf("spike of %ld MiB survived\n", b);
        return 0;
    }
    if (strcmp(mode, "workingset") == 0) {
        size_t n = (size_t)(a / b);
        char **chunks = calloc(n, sizeof *chunks);
        long pause = argc > 4 ? atol(argv[4]) : 0;
        for (size_t c = 0; c < n; c++) {
            chunks[c] = grab((size_t)b);
            if (pause) sleep_ms(pause);
        }
        printf("working set of %ld MiB loaded\n", a);
        work(chunks, n, (size_t)b, 1000);
        return 0;
    }
#ifndef __wasi__
    if (strcmp(mode, "childoom") == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            grab((size_t)a);
            _exit(0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        printf("child ended: %s %d\n", WIFSIGNALED(status) ? "signal" : "exit",
               WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
        return 0;
    }
#endif
    if (strcmp(mode, "cpu") == 0) {
        double start = cpu_now();
        while (cpu_now() - start < (double)a)
            for (int i = 0; i < 100000; i++) sink += (unsigned long)i;
        printf("spun %ld s of CPU\n", a);
        return 0;
    }
    fprintf(stderr, "memshape: unknown mode %s\n", mode);
    return 2;
}
