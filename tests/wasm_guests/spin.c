/* Spins forever without calling the host. */
int main(void) {
    volatile unsigned long i = 0;
    for (;;) i++;
}
