/* Allocates and touches 1 MiB blocks until malloc fails, then aborts (a trap). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    volatile unsigned long mib = 0;
    for (;;) {
        char *volatile p = malloc(1 << 20);
        if (p == NULL) {
            fprintf(stderr, "malloc failed after %lu MiB\n", (unsigned long)mib);
            abort();
        }
        memset((char *)p, 0x5a, 1 << 20);
        mib++;
    }
}
