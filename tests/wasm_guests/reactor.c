/* A WASI reactor (library): exports _initialize and add, but no _start. */
__attribute__((export_name("add"))) int add(int a, int b) { return a + b; }
