/* The contract suite's commands on the wasm tier, where there is no shell.
 *
 *   toolbox outerr CODE      print "out" on stdout, "err" on stderr, exit CODE
 *   toolbox cat              copy stdin to stdout
 *   toolbox getenv NAME      print $NAME
 *   toolbox write PATH TEXT  write TEXT to PATH
 *   toolbox readfile PATH    print PATH's contents
 *   toolbox membomb          allocate and touch 1 MiB blocks until malloc fails, then abort
 *   toolbox spin             loop forever
 *   toolbox sleep SECONDS    sleep (a WASI clock poll)
 *   toolbox flood            print forever
 *   toolbox echo WORDS...    print the words
 *   toolbox true             exit 0
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv) {
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "outerr") && argc > 2) {
        printf("out\n");
        fprintf(stderr, "err\n");
        return atoi(argv[2]);
    }
    if (!strcmp(cmd, "cat")) {
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) fwrite(buf, 1, n, stdout);
        return 0;
    }
    if (!strcmp(cmd, "getenv") && argc > 2) {
        const char *v = getenv(argv[2]);
        printf("%s\n", v ? v : "");
        return 0;
    }
    if (!strcmp(cmd, "write") && argc > 3) {
        FILE *f = fopen(argv[2], "w");
        if (!f) { perror(argv[2]); return 1; }
        fputs(argv[3], f);
        return fclose(f) == 0 ? 0 : 1;
    }
    if (!strcmp(cmd, "readfile") && argc > 2) {
        FILE *f = fopen(argv[2], "r");
        if (!f) { perror(argv[2]); return 1; }
        int c;
        while ((c = fgetc(f)) != EOF) putchar(c);
        return 0;
    }
    if (!strcmp(cmd, "membomb")) {
        for (;;) {
            char *volatile p = malloc(1 << 20);
            if (p == NULL) abort();
            memset((char *)p, 0x5a, 1 << 20);
        }
    }
    if (!strcmp(cmd, "spin")) {
        volatile unsigned long i = 0;
        for (;;) i++;
    }
    if (!strcmp(cmd, "sleep") && argc > 2) {
        struct timespec ts = {atoi(argv[2]), 0};
        nanosleep(&ts, NULL);
        return 0;
    }
    if (!strcmp(cmd, "flood")) {
        for (;;) puts("flooooooooooooooooooooooood");
    }
    if (!strcmp(cmd, "echo")) {
        for (int i = 2; i < argc; i++) printf(i > 2 ? " %s" : "%s", argv[i]);
        putchar('\n');
        return 0;
    }
    if (!strcmp(cmd, "true")) return 0;
    fprintf(stderr, "toolbox: unknown command %s\n", cmd);
    return 2;
}
