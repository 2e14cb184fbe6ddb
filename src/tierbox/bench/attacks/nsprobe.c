/* nsprobe NAME...: try kernel interfaces a sandbox should refuse; print NAME=ERRNO.
 *
 * Each NAME runs in its own child process, so one that succeeds (a new user
 * namespace, a key in a keyring) cannot change what the next one sees. ERRNO
 * is 0 when the call succeeded, else the errno it failed with (1 EPERM,
 * 38 ENOSYS, ...). Names:
 *
 *   unshare_user      unshare(CLONE_NEWUSER)
 *   unshare_user_mnt  unshare(CLONE_NEWUSER | CLONE_NEWNS)
 *   userns_mount      unshare(CLONE_NEWUSER | CLONE_NEWNS), map uid 0, mount a tmpfs
 *   clone_newuser     clone(CLONE_NEWUSER)        clone_newns  clone(CLONE_NEWNS)
 *   clone_plain       clone() without namespace flags (what fork does)
 *   clone3_plain      clone3() without flags      clone3_newuser  clone3(CLONE_NEWUSER)
 *   setns             setns(0, CLONE_NEWUSER)
 *   keyctl            keyctl(KEYCTL_GET_KEYRING_ID, session keyring, create)
 *   add_key           add_key("user", ..., process keyring)
 *   request_key       request_key("user", ...)
 *   fork              fork()                      pthread  pthread_create()
 *   socket:D:T:P      socket(D, T, P)
 *
 * Built static so it runs in any image: cc -static -O2 -pthread -o nsprobe nsprobe.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static long raw_clone(unsigned long flags) {
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
    return pid;
}

static long raw_clone3(unsigned long flags) {
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = flags;
    args.exit_signal = SIGCHLD;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
    return pid;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* What `unshare -Umr sh -c 'mount -t tmpfs none /tmp'` does. */
static long userns_mount(void) {
    char map[64];
    uid_t uid = getuid();
    gid_t gid = getgid();
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0) return -1;
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "0 %u 1", (unsigned)uid);
    if (write_file("/proc/self/uid_map", map) < 0) return -1;
    snprintf(map, sizeof map, "0 %u 1", (unsigned)gid);
    if (write_file("/proc/self/gid_map", map) < 0) return -1;
    return mount("none", "/tmp", "tmpfs", 0, "size=64k");
}

static void *thread_main(void *arg) { return arg; }

static long try_one(const char *name) {
    int d, t, p;
    if (!strcmp(name, "unshare_user")) return unshare(CLONE_NEWUSER);
    if (!strcmp(name, "unshare_user_mnt")) return unshare(CLONE_NEWUSER | CLONE_NEWNS);
    if (!strcmp(name, "userns_mount")) return userns_mount();
    if (!strcmp(name, "clone_newuser")) return raw_clone(CLONE_NEWUSER);
    if (!strcmp(name, "clone_newns")) return raw_clone(CLONE_NEWNS);
    if (!strcmp(name, "clone_plain")) return raw_clone(0);
    if (!strcmp(name, "clone3_plain")) return raw_clone3(0);
    if (!strcmp(name, "clone3_newuser")) return raw_clone3(CLONE_NEWUSER);
    if (!strcmp(name, "setns")) return syscall(SYS_setns, 0, CLONE_NEWUSER);
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0, -3, 1);
    if (!strcmp(name, "add_key")) return syscall(SYS_add_key, "user", "tierbox", "x", 1, -2);
    if (!strcmp(name, "request_key")) return syscall(SYS_request_key, "user", "tierbox", NULL, 0);
    if (!strcmp(name, "fork")) {
        pid_t pid = fork();
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid(pid, NULL, 0);
        return pid;
    }
    if (!strcmp(name, "pthread")) {
        pthread_t th;
        int e = pthread_create(&th, NULL, thread_main, NULL);
        if (e == 0) pthread_join(th, NULL);
        errno = e;
        return e ? -1 : 0;
    }
    if (sscanf(name, "socket:%d:%d:%d", &d, &t, &p) == 3) return socket(d, t, p);
    errno = EINVAL;
    return -1;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) _exit(try_one(argv[i]) < 0 ? (errno & 0xff) : 0);
        int status = 0;
        if (pid < 0 || waitpid(pid, &status, 0) < 0) {
            printf("%s=fork:%d\n", argv[i], errno);
        } else if (WIFEXITED(status)) {
            printf("%s=%d\n", argv[i], WEXITSTATUS(status));
        } else {
            printf("%s=signal:%d\n", argv[i], WTERMSIG(status));
        }
    }
    printf("nsprobe_done=1\n");
    return 0;
}
