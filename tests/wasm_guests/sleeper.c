/* sleeper SECONDS: sleeps (poll_oneoff in the host), then says so. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    unsigned s = argc > 1 ? (unsigned)atoi(argv[1]) : 1000;
    printf("sleeping %u\n", s);
    fflush(stdout);
    sleep(s);
    printf("woke\n");
    return 0;
}
