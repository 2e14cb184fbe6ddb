/* dropexec UID GID NOFILE CORE -- PROGRAM ARGS...
 *
 * Become UID:GID with no supplementary groups and no capabilities, lower the
 * hard RLIMIT_NOFILE and RLIMIT_CORE, then exec PROGRAM (searched on PATH).
 * tierbox starts process-tier workloads through it so that the spawn can use
 * vfork (Python's subprocess falls back to a full fork, ~1 ms more here, as
 * soon as it has to switch users itself). A program that cannot be executed
 * ends with status 127 (not found) or 126 (not executable) and one line on
 * stderr, as a shell reports it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "tierbox: %s: %s\n", what, strerror(errno));
    _exit(125);
}

int main(int argc, char **argv) {
    if (argc < 7 || strcmp(argv[5], "--") != 0) {
        fprintf(stderr, "usage: dropexec UID GID NOFILE CORE -- PROGRAM ARGS...\n");
        return 125;
    }
    uid_t uid = (uid_t)strtoul(argv[1], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[2], NULL, 10);
    struct rlimit nofile = {strtoul(argv[3], NULL, 10), strtoul(argv[3], NULL, 10)};
    struct rlimit core = {strtoul(argv[4], NULL, 10), strtoul(argv[4], NULL, 10)};
    if (setrlimit(RLIMIT_NOFILE, &nofile) != 0) die("setrlimit NOFILE");
    if (setrlimit(RLIMIT_CORE, &core) != 0) die("setrlimit CORE");
    if (setgroups(0, NULL) != 0) die("setgroups");
    if (setresgid(gid, gid, gid) != 0) die("setresgid");
    if (setresuid(uid, uid, uid) != 0) die("setresuid");
    if (uid != 0 && (setuid(0) == 0 || geteuid() == 0)) {
        fprintf(stderr, "tierbox: could not drop root\n");
        return 125;
    }
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    execvp(argv[6], argv + 6);
    int err = errno;
    fprintf(stderr, "tierbox: %s: %s\n", argv[6],
            err == ENOENT ? "command not found" : strerror(err));
    return err == ENOENT ? 127 : 126;
}
