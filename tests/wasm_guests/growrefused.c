/* Asks for more linear memory than the sandbox allows, handles the refusal and
 * exits 0: the run ends "exited", and only the evidence tells what was refused. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 200;
    void *p = malloc(mib << 20);
    if (p == NULL) {
        printf("refused %lu MiB\n", mib);
        return 0;
    }
    printf("granted %lu MiB\n", mib);
    free(p);
    return 0;
}
