/* fileops OP ARGS...: file operations inside the sandbox, printing what happened.
 *   read PATH | write PATH TEXT | ls PATH | open PATH | symlink TARGET LINK | mkdir PATH */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int fail(const char *what, const char *path) {
    printf("%s %s failed: %s\n", what, path, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: fileops OP PATH [TEXT]\n"); return 2; }
    const char *op = argv[1], *path = argv[2];
    if (strcmp(op, "read") == 0 || strcmp(op, "open") == 0) {
        int fd = open(path, O_RDONLY);
        if (fd < 0) return fail(op, path);
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) return fail("read", path);
        printf("opened %s: %.*s", path, (int)n, buf);
        close(fd);
        return 0;
    }
    if (strcmp(op, "write") == 0 && argc > 3) {
        FILE *f = fopen(path, "w");
        if (!f) return fail(op, path);
        fprintf(f, "%s\n", argv[3]);
        fclose(f);
        printf("wrote %s\n", path);
        return 0;
    }
    if (strcmp(op, "ls") == 0) {
        DIR *d = opendir(path);
        if (!d) return fail(op, path);
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (e->d_name[0] != '.') printf("%s\n", e->d_name);
        closedir(d);
        return 0;
    }
    if (strcmp(op, "symlink") == 0 && argc > 3) {
        if (symlink(path, argv[3]) != 0) return fail(op, argv[3]);
        printf("linked %s -> %s\n", argv[3], path);
        return 0;
    }
    if (strcmp(op, "mkdir") == 0) {
        if (mkdir(path, 0755) != 0) return fail(op, path);
        printf("made %s\n", path);
        return 0;
    }
    fprintf(stderr, "unknown op %s\n", op);
    return 2;
}
