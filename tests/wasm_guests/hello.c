/* hello [CODE [ARGS...]]: prints its argv, $GREETING and stdin, exits with CODE. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    printf("argc=%d\n", argc);
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    const char *greeting = getenv("GREETING");
    if (greeting) printf("GREETING=%s\n", greeting);
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    if (n > 0) printf("stdin=%.*s\n", (int)n, buf);
    fprintf(stderr, "to-stderr\n");
    return argc > 1 ? atoi(argv[1]) : 0;
}
