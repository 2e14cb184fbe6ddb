/*
 * hostile_agent: a guest root taking over tierbox's agent port, for
 * tests/security/test_guest_hostile.py (built there with gcc -static).
 *
 *     hostile_agent MODE [DELAY_MS]
 *
 * It returns at once (so the exec that started it ends), then, after
 * DELAY_MS (default 1500), finds the process holding the agent's
 * virtio-serial port, copies that descriptor with pidfd_getfd, stops the
 * agent with ptrace so only this program hears the host, and answers in
 * its place according to MODE:
 *
 *   deaf     read nothing, answer nothing (the host's sends back up)
 *   flood    answer GET and LIST with an endless stream of 1 MiB DATA frames
 *   badexit  answer EXEC with STARTED and an EXIT whose signal is -5
 *   markup   answer file requests with an ERR whose text is rich markup and
 *            terminal escapes, and PROCS with a process named the same
 *
 * HELLO, SYNC and STATS are answered as the agent would, so a new host
 * connection gets as far as the hostile answers.
 *
 *     hostile_agent console MIB     write MIB MiB to /dev/ttyS0 and return
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x31584254u
#define MAX_FRAME (1u << 20)
enum { T_HELLO = 1, T_EXEC = 2, T_GET = 5, T_STATS = 6, T_SYNC = 7, T_LIST = 8, T_PROCS = 13 };
enum { T_OK = 101, T_ERR = 102, T_EXIT = 105, T_DATA = 106, T_STARTED = 108 };

/* (a hex escape takes every hex digit after it: "\x07" "c" keeps them apart) */
static const char EVIL[] = "[/bold]\x1b[2J\x1b]8;;http://evil.example/\x07" "click\x1b]8;;\x07" "[red]pwned";

static int port = -1;

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void write_all(const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(port, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) _exit(3);
        p += w;
        n -= (size_t)w;
    }
}

static void send_frame(uint32_t type, uint32_t id, const void *data, uint32_t len) {
    unsigned char h[16];
    put32(h, MAGIC);
    put32(h + 4, type);
    put32(h + 8, id);
    put32(h + 12, len);
    write_all(h, 16);
    if (len) write_all(data, len);
}

static int find_port(pid_t *owner) {
    DIR *procs = opendir("/proc");
    struct dirent *p;
    while (procs && (p = readdir(procs))) {
        char path[300], link[256];
        pid_t pid = (pid_t)atoi(p->d_name);
        if (pid <= 0 || pid == getpid()) continue;
        snprintf(path, sizeof path, "/proc/%d/fd", pid);
        DIR *fds = opendir(path);
        struct dirent *f;
        while (fds && (f = readdir(fds))) {
            snprintf(path, sizeof path, "/proc/%d/fd/%s", pid, f->d_name);
            ssize_t n = readlink(path, link, sizeof link - 1);
            if (n > 0) {
                link[n] = 0;
                if (!strncmp(link, "/dev/vport", 10)) {
                    *owner = pid;
                    closedir(fds);
                    closedir(procs);
                    return atoi(f->d_name);
                }
            }
        }
        if (fds) closedir(fds);
    }
    if (procs) closedir(procs);
    return -1;
}

static int read_full(unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(port, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static void flood(uint32_t id) {
    static unsigned char chunk[MAX_FRAME];
    for (;;) send_frame(T_DATA, id, chunk, sizeof chunk);
}

static void serve(const char *mode) {
    static unsigned char data[MAX_FRAME];
    unsigned char h[16];
    for (;;) {
        /* find the next magic word: the agent may have stopped mid-frame */
        if (read_full(h, 4) < 0) return;
        while (get32(h) != MAGIC) {
            memmove(h, h + 1, 3);
            if (read_full(h + 3, 1) < 0) return;
        }
        if (read_full(h + 4, 12) < 0) return;
        uint32_t type = get32(h + 4), id = get32(h + 8), len = get32(h + 12);
        if (len > MAX_FRAME) continue;
        if (read_full(data, len) < 0) return;
        if (type == T_HELLO) {
            char reply[256];
            int n = snprintf(reply, sizeof reply, "agent=3\nkernel=hostile\nnonce=%.*s\n", (int)len,
                             (const char *)data);
            send_frame(T_OK, id, reply, (uint32_t)n);
        } else if (type == T_SYNC || type == T_STATS) {
            send_frame(T_OK, id, "procs=1\n", 8);
        } else if (!strcmp(mode, "flood") && (type == T_GET || type == T_LIST)) {
            flood(id);
        } else if (!strcmp(mode, "badexit") && type == T_EXEC) {
            unsigned char pid[4];
            put32(pid, 77);
            send_frame(T_STARTED, id, pid, 4);
            const char *exit_fields = "signal=-5\nreason=exited\n";
            send_frame(T_EXIT, id, exit_fields, (uint32_t)strlen(exit_fields));
        } else if (!strcmp(mode, "markup") && type == T_PROCS) {
            unsigned char out[256];
            uint32_t n = (uint32_t)sizeof EVIL; /* the name and its NUL */
            put32(out, 1);
            put32(out + 4, 0);
            put32(out + 8, 7);
            put32(out + 12, 1);
            put32(out + 16, 0);
            out[20] = 'S';
            put32(out + 21, n);
            memcpy(out + 25, EVIL, n);
            send_frame(T_OK, id, out, 25 + n);
        } else if (!strcmp(mode, "markup") && type != 14 /* SESSION */) {
            unsigned char out[256];
            put32(out, EIO);
            memcpy(out + 4, EVIL, sizeof EVIL - 1);
            send_frame(T_ERR, id, out, (uint32_t)(4 + sizeof EVIL - 1));
        }
    }
}

static int console(long mib) {
    static char line[1 << 16];
    memset(line, 'x', sizeof line);
    for (size_t i = 79; i < sizeof line; i += 80) line[i] = '\n';
    int fd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY);
    if (fd < 0) {
        perror("/dev/ttyS0");
        return 1;
    }
    for (long i = 0; i < mib * 16; i++)
        if (write(fd, line, sizeof line) < 0) {
            perror("write");
            return 1;
        }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: hostile_agent deaf|flood|badexit|markup [DELAY_MS] | console MIB\n");
        return 2;
    }
    if (!strcmp(argv[1], "console")) return console(argc > 2 ? atol(argv[2]) : 50);
    long delay_ms = argc > 2 ? atol(argv[2]) : 1500;
    pid_t child = fork();
    if (child < 0) return 1;
    if (child > 0) return 0; /* the exec that started it ends now */
    setsid();
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    struct timespec ts = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    pid_t owner = 0;
    int fd = find_port(&owner);
    if (fd < 0) return 4;
    int pidfd = (int)syscall(SYS_pidfd_open, owner, 0);
    if (pidfd < 0) return 5;
    port = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    if (port < 0) return 6;
    if (ptrace(PTRACE_SEIZE, owner, 0, 0) < 0 || ptrace(PTRACE_INTERRUPT, owner, 0, 0) < 0) return 7;
    int status;
    waitpid(owner, &status, __WALL);
    fcntl(port, F_SETFL, fcntl(port, F_GETFL) & ~O_NONBLOCK);
    if (!strcmp(argv[1], "deaf")) {
        for (;;) pause();
    }
    for (;;) { /* the host may hang up and come back (a VM's line is per call) */
        serve(argv[1]);
        usleep(50000);
    }
}
