/* Built with a large initial memory (see the test): it never gets to run. */
#include <stdio.h>
int main(void) { puts("started"); return 0; }
