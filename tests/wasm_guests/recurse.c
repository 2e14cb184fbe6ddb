/* recurse native|frames: unbounded recursion the compiler cannot turn into a loop.
 *   native: small frames kept in Wasm locals: overflows wasmtime's native stack.
 *   frames: 256-byte arrays on the C shadow stack in linear memory: runs off its
 *           bottom (wasm-ld puts the stack below the data), out of bounds. */
#include <stdio.h>
#include <string.h>

static int native(int n);
static int (*volatile native_ptr)(int) = native;  /* an indirect call: no tail-call elimination */

static int native(int n) { return native_ptr(n + 1) + 1; }

static int frames(volatile int n) {
    volatile char frame[256];
    frame[n & 255] = (char)n;
    return frames(n + 1) + frame[(n + 1) & 255];
}

int main(int argc, char **argv) {
    printf("recursing\n");
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "frames") == 0) return frames(0);
    return native(0);
}
