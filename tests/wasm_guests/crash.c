/* crash unreachable|divzero: traps the way C programs crash. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    printf("about to crash\n");
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "divzero") == 0) {
        volatile int zero = 0;
        volatile int x = 42 / zero;
        return x;
    }
    __builtin_trap();
}
