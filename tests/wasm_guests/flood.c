/* flood [stdout|stderr]: writes lines forever. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    FILE *out = (argc > 1 && strcmp(argv[1], "stderr") == 0) ? stderr : stdout;
    volatile unsigned long n = 0;
    for (;;) {
        fprintf(out, "flood line %lu xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n", (unsigned long)n);
        n++;
    }
}
