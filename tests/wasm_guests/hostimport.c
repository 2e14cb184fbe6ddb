/* Imports a function from a non-WASI module ("env"): tierbox must refuse it. */
__attribute__((import_module("env"), import_name("host_secret"))) int host_secret(int);

int main(void) { return host_secret(1); }
