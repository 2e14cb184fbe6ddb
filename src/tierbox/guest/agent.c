/*
 * tierbox-agent: the in-guest agent of the microvm tier.
 *
 * Runs as PID 1 of the guest (exec'd by the initramfs /init once the root
 * overlay is mounted at ROOT) and serves one host over a virtio-serial port
 * named "tierbox.agent". Built statically at set-up:
 *
 *     gcc -static -O2 -Wall -Wextra -o tierbox-agent agent.c
 *
 * Wire format (little endian), both directions:
 *
 *     u32 magic "TBX1" | u32 type | u32 id | u32 len | payload[len]
 *
 * Requests carry an id; every answer frame repeats it. Payloads are at most
 * MAX_FRAME bytes; bigger things (files, stdin, output) travel in chunks.
 * The host side lives in src/tierbox/vmm/agent.py, which documents each type.
 *
 * Workloads run chroot'ed into ROOT, in their own cgroup v2 group
 * (/sys/fs/cgroup/x<id>) with pids.max, killed as a group (cgroup.kill) on
 * timeout, output overflow or when the main process exits.
 *
 * File requests (PUT, GET, LIST) resolve paths with openat2(RESOLVE_IN_ROOT)
 * under ROOT and run with the workload's file-system uid/gid (setfsuid), so
 * they reach only what the workload could. GET opens non-blocking, refuses
 * anything but a regular file on a data file system (FIFOs, devices, sockets,
 * directories, /proc and /sys files) and never sends more than the host's
 * cap. Streams (GET data, LIST records) check the port between chunks: a KILL
 * for the stream or any new request ends them, so a host that gave up never
 * leaves the agent busy sending.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/openat2.h>
#include <linux/random.h>
#include <linux/sched.h>
#include <net/if.h>
#include <sys/socket.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x31584254u /* "TBX1" */
#define MAX_FRAME (1u << 20)
#define CHUNK (64u * 1024u)
#define AGENT_VERSION "2"
#define PORT_NAME "tierbox.agent"
#define CG_ROOT "/sys/fs/cgroup"
/* ERR code (beyond errno values) for "not a regular file"; the message says what it is */
#define E_NOTREG 0x10000u
/* GET/LIST cap meaning "no cap" (the host streams to a file) */
#define NO_CAP UINT64_MAX

enum {
    T_HELLO = 1,
    T_EXEC = 2,
    T_STDIN = 3,
    T_PUT = 4,
    T_GET = 5,
    T_STATS = 6,
    T_SYNC = 7,
    T_LIST = 8,
    T_POWEROFF = 9,
    T_KILL = 10,
    T_DATA_IN = 11,
    T_OK = 101,
    T_ERR = 102,
    T_STDOUT = 103,
    T_STDERR = 104,
    T_EXIT = 105,
    T_DATA = 106,
};

struct frame {
    uint32_t type, id, len;
    unsigned char *data;
};

static const char *ROOT = "/newroot";
static int port = -1;
static int root_fd = -1;

/* ---- input buffer over the port ------------------------------------------ */
static unsigned char *ibuf;
static size_t ilen, icap;

static void die(const char *what) {
    fprintf(stderr, "tierbox-agent: %s: %s\n", what, strerror(errno));
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static int64_t now_ms(void);
static int64_t port_quiet_until; /* host disconnected: do not poll the port before this */

/* Read what the port has into ibuf. Blocking mode waits for the host (SIGIO
 * announces its connection); non-blocking mode is used after poll() said the
 * port is readable. Returns 1 when bytes arrived. */
static int fill_once(int blocking) {
    if (icap - ilen < CHUNK) {
        icap = icap ? icap * 2 : 2 * MAX_FRAME;
        ibuf = realloc(ibuf, icap);
        if (!ibuf) die("realloc");
    }
    for (;;) {
        ssize_t n = read(port, ibuf + ilen, icap - ilen);
        if (n > 0) {
            ilen += (size_t)n;
            return 1;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EAGAIN) die("read port");
        /* 0: the host is not connected (between QEMU start or restore and the
         * host's connect). Wait for the SIGIO sent when it connects. */
        if (!blocking) {
            port_quiet_until = now_ms() + 100;
            return 0;
        }
        sigset_t io;
        sigemptyset(&io);
        sigaddset(&io, SIGIO);
        struct timespec ts = {1, 0};
        sigtimedwait(&io, NULL, &ts);
    }
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const unsigned char *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* Drop bytes until the buffer starts at a magic word (resync after garbage). */
static void resync(void) {
    size_t i = 0;
    while (i + 4 <= ilen && get32(ibuf + i) != MAGIC) i++;
    if (i + 4 > ilen) i = ilen >= 3 ? ilen - 3 : 0;
    if (i) {
        memmove(ibuf, ibuf + i, ilen - i);
        ilen -= i;
    }
}

static size_t consumed; /* bytes of ibuf held by the last frame returned */

static void release_frame(void) {
    if (consumed) {
        memmove(ibuf, ibuf + consumed, ilen - consumed);
        ilen -= consumed;
        consumed = 0;
    }
}

/* Parse one frame if complete; returns 1 and fills *f (valid until the next call). */
static int try_frame(struct frame *f) {
    release_frame();
    for (;;) {
        resync();
        if (ilen < 16) return 0;
        uint32_t len = get32(ibuf + 12);
        if (len > MAX_FRAME) { /* not a frame header after all: skip the magic */
            memmove(ibuf, ibuf + 1, ilen - 1);
            ilen -= 1;
            continue;
        }
        if (ilen < 16 + (size_t)len) return 0;
        f->type = get32(ibuf + 4);
        f->id = get32(ibuf + 8);
        f->len = len;
        f->data = ibuf + 16;
        consumed = 16 + (size_t)len;
        return 1;
    }
}

static void next_frame(struct frame *f) {
    while (!try_frame(f)) fill_once(1);
}

/* ---- output to the port --------------------------------------------------- */
static void write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd pf = {fd, POLLOUT, 0};
                poll(&pf, 1, 100);
                continue;
            }
            die("write port");
        }
        p += w;
        n -= (size_t)w;
    }
}

static void send_frame(uint32_t type, uint32_t id, const void *data, size_t len) {
    unsigned char h[16];
    put32(h, MAGIC);
    put32(h + 4, type);
    put32(h + 8, id);
    put32(h + 12, (uint32_t)len);
    /* one write for small frames keeps header and body together */
    if (len <= 4096) {
        unsigned char b[16 + 4096];
        memcpy(b, h, 16);
        if (len) memcpy(b + 16, data, len);
        write_all(port, b, 16 + len);
    } else {
        write_all(port, h, 16);
        write_all(port, data, len);
    }
}

static void send_err(uint32_t id, int err, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg + 4, sizeof msg - 4, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n > sizeof msg - 5) n = (int)(sizeof msg - 5);
    put32((unsigned char *)msg, (uint32_t)err);
    send_frame(T_ERR, id, msg, 4 + (size_t)n);
}

/* ---- small helpers --------------------------------------------------------- */
static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int write_file(const char *path, const char *value) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, value, strlen(value));
    int saved = errno;
    close(fd);
    errno = saved;
    return n < 0 ? -1 : 0;
}

static ssize_t read_file(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t got = 0;
    while (got + 1 < cap) {
        ssize_t n = read(fd, buf + got, cap - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = 0;
    return (ssize_t)got;
}

/* Value of "key value" or "key: value" from a /proc-style file, or -1. */
static long long keyed(const char *path, const char *key) {
    static char buf[16384];
    if (read_file(path, buf, sizeof buf) < 0) return -1;
    size_t kl = strlen(key);
    for (char *line = buf; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, key, kl) == 0 && (line[kl] == ' ' || line[kl] == ':'))
            return strtoll(line + kl + 1 + (line[kl] == ':'), NULL, 10);
        line = nl ? nl + 1 : NULL;
    }
    return -1;
}

static int openat2_in_root(const char *path, int flags, mode_t mode) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)flags | O_CLOEXEC;
    how.mode = (flags & O_CREAT) ? mode : 0;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
    while (*path == '/') path++;
    if (!*path) path = ".";
    return (int)syscall(SYS_openat2, root_fd, path, &how, sizeof how);
}

/* mkdir -p of the parent directories of path, inside the root. Runs with the
 * workload's file-system credentials, so what it makes belongs to the workload. */
static int mkparents(const char *path) {
    char tmp[PATH_MAX];
    if (strlen(path) >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(tmp, path);
    char *slash = strrchr(tmp, '/');
    if (!slash) return 0;
    *slash = 0;
    for (char *p = tmp + 1; ; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p;
            *p = 0;
            if (tmp[0]) {
                int d = openat2_in_root(tmp, O_PATH | O_DIRECTORY, 0);
                if (d >= 0) {
                    close(d);
                } else if (errno == ENOENT) {
                    /* create the last component inside its (resolved) parent */
                    char *last = strrchr(tmp, '/');
                    int parent;
                    if (last && last != tmp) {
                        *last = 0;
                        parent = openat2_in_root(tmp, O_PATH | O_DIRECTORY, 0);
                        *last = '/';
                    } else {
                        parent = dup(root_fd);
                    }
                    if (parent < 0) return -1;
                    const char *name = last ? last + 1 : tmp;
                    if (mkdirat(parent, name, 0755) < 0 && errno != EEXIST) {
                        int saved = errno;
                        close(parent);
                        errno = saved;
                        return -1;
                    }
                    close(parent);
                } else {
                    return -1;
                }
            }
            *p = c;
            if (!c) break;
        }
    }
    return 0;
}

/* ---- HELLO / STATS / SYNC ------------------------------------------------- */
static void do_hello(const struct frame *f) {
    struct utsname u;
    uname(&u);
    char reply[1024];
    int n = snprintf(reply, sizeof reply, "agent=%s\nkernel=%s\nmachine=%s\nnonce=", AGENT_VERSION,
                     u.release, u.machine);
    size_t nl = f->len > 256 ? 256 : f->len;
    memcpy(reply + n, f->data, nl);
    send_frame(T_OK, f->id, reply, (size_t)n + nl);
}

static void do_stats(const struct frame *f) {
    static char out[4096];
    static char buf[4096];
    size_t o = 0;
    const char *mem_keys[] = {"MemTotal", "MemFree", "MemAvailable", "Shmem", "Cached", NULL};
    for (int i = 0; mem_keys[i]; i++)
        o += (size_t)snprintf(out + o, sizeof out - o, "%s=%lld\n", mem_keys[i],
                              keyed("/proc/meminfo", mem_keys[i]));
    o += (size_t)snprintf(out + o, sizeof out - o, "oom_kill=%lld\n", keyed("/proc/vmstat", "oom_kill"));
    if (read_file("/proc/stat", buf, sizeof buf) > 0) {
        unsigned long long v[8] = {0};
        sscanf(buf, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
               &v[5], &v[6], &v[7]);
        o += (size_t)snprintf(out + o, sizeof out - o, "cpu_busy_ticks=%llu\nclk_tck=%ld\n",
                              v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sysconf(_SC_CLK_TCK));
    }
    if (read_file("/proc/loadavg", buf, sizeof buf) > 0) {
        char *slash = strchr(buf, '/');
        if (slash) o += (size_t)snprintf(out + o, sizeof out - o, "procs=%ld\n", strtol(slash + 1, NULL, 10));
    }
    if (read_file("/proc/uptime", buf, sizeof buf) > 0)
        o += (size_t)snprintf(out + o, sizeof out - o, "uptime_s=%.2f\n", strtod(buf, NULL));
    send_frame(T_OK, f->id, out, o);
}

static void do_sync(const struct frame *f) {
    /* payload: u64 realtime ns, then random bytes to mix into the pool */
    if (f->len < 8) {
        send_err(f->id, EINVAL, "sync: short payload");
        return;
    }
    uint64_t ns = (uint64_t)get32(f->data) | (uint64_t)get32(f->data + 4) << 32;
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    if (ns && clock_settime(CLOCK_REALTIME, &ts) < 0) {
        send_err(f->id, errno, "clock_settime: %s", strerror(errno));
        return;
    }
    size_t nrand = f->len - 8;
    if (nrand > 512) nrand = 512;
    if (nrand) {
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0) {
            send_err(f->id, errno, "open /dev/urandom: %s", strerror(errno));
            return;
        }
        struct {
            int entropy_count;
            int buf_size;
            unsigned char buf[512];
        } e;
        e.entropy_count = (int)nrand * 8;
        e.buf_size = (int)nrand;
        memcpy(e.buf, f->data + 8, nrand);
        int rc = ioctl(fd, RNDADDENTROPY, &e);
        if (rc == 0) ioctl(fd, RNDRESEEDCRNG);
        int saved = errno;
        close(fd);
        if (rc < 0) {
            send_err(f->id, saved, "RNDADDENTROPY: %s", strerror(saved));
            return;
        }
    }
    send_frame(T_OK, f->id, NULL, 0);
}

static char *cstr(const struct frame *f, size_t off) {
    /* NUL-terminated string starting at off, or NULL if it runs past the frame */
    if (off >= f->len) return NULL;
    if (!memchr(f->data + off, 0, f->len - off)) return NULL;
    return (char *)f->data + off;
}

/* ---- files: credentials, kinds, streams -------------------------------------- */

/* Take the workload's file-system uid/gid for one file request (the kernel
 * drops CAP_DAC_OVERRIDE and friends with them); fs_root() gives them back. */
static int fs_as(uint32_t uid, uint32_t gid) {
    setfsgid(gid);
    setfsuid(uid);
    if ((uint32_t)setfsgid((gid_t)-1) != gid || (uint32_t)setfsuid((uid_t)-1) != uid) {
        errno = EPERM;
        return -1;
    }
    return 0;
}

static void fs_root(void) {
    setfsuid(0);
    setfsgid(0);
}

static const char *what_is(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a named pipe (FIFO)";
    if (S_ISSOCK(m)) return "a socket";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISLNK(m)) return "a symlink";
    return "not a regular file";
}

/* Name of the file system if fd is on one whose "files" are kernel interfaces. */
static const char *pseudo_fs(int fd) {
    struct statfs sf;
    if (fstatfs(fd, &sf) < 0) return NULL;
    switch ((uint32_t)sf.f_type) {
    case 0x9fa0u: return "procfs";
    case 0x62656572u: return "sysfs";
    case 0x27e0ebu: return "cgroup";
    case 0x63677270u: return "cgroup2";
    case 0x64626720u: return "debugfs";
    case 0x74726163u: return "tracefs";
    case 0x73636673u: return "securityfs";
    case 0xcafe4a11u: return "bpf";
    default: return NULL;
    }
}

/* Between the chunks of a stream: has the host given up on it? A KILL with
 * the stream's id, or any new request, says so; the new request is left in
 * the buffer for the main loop. Stale STDIN/DATA_IN/KILL frames are dropped. */
static int stream_cancelled(uint32_t id) {
    if (now_ms() >= port_quiet_until) {
        struct pollfd p = {port, POLLIN, 0};
        if (poll(&p, 1, 0) > 0 && (p.revents & POLLIN)) fill_once(0);
    }
    struct frame sf;
    while (try_frame(&sf)) {
        if (sf.type == T_KILL && sf.id == id) return 1;
        if (sf.type == T_STDIN || sf.type == T_DATA_IN || sf.type == T_KILL) continue;
        consumed = 0; /* not ours to handle here: keep it */
        return 1;
    }
    return 0;
}

/* The common head of GET and LIST: u64 cap, u32 uid, u32 gid, path\0.
 * The path is copied out: the frame's memory is reused by the next read. */
static int parse_file_req(const struct frame *f, uint64_t *cap, uint32_t *uid, uint32_t *gid,
                          char *path, size_t path_cap) {
    const char *p = f->len > 16 ? cstr(f, 16) : NULL;
    if (!p || strlen(p) >= path_cap) return -1;
    *cap = get64(f->data);
    *uid = get32(f->data + 8);
    *gid = get32(f->data + 12);
    strcpy(path, p);
    return 0;
}

/* ---- LIST ------------------------------------------------------------------------- */
enum { K_OTHER = 0, K_FILE = 1, K_DIR = 2, K_SYMLINK = 3 };

static unsigned char kind_of(mode_t m) {
    if (S_ISREG(m)) return K_FILE;
    if (S_ISDIR(m)) return K_DIR;
    if (S_ISLNK(m)) return K_SYMLINK;
    return K_OTHER;
}

static unsigned char kind_of_dtype(unsigned char t) {
    switch (t) {
    case DT_REG: return K_FILE;
    case DT_DIR: return K_DIR;
    case DT_LNK: return K_SYMLINK;
    default: return K_OTHER;
    }
}

/* Entries as DATA frames of records (u8 kind, u64 size, name\0; lstat, never
 * followed), then OK "entries=N"; ERR EFBIG once the records pass the cap. */
static void list_entries(uint32_t id, const char *path, uint64_t cap) {
    int fd = openat2_in_root(path, O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_NOCTTY, 0);
    if (fd < 0) {
        send_err(id, errno, "%s", strerror(errno));
        return;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        send_err(id, e, "%s", strerror(e));
        return;
    }
    static unsigned char out[CHUNK];
    size_t o = 0;
    uint64_t total = 0, n = 0;
    struct dirent *e;
    for (;;) {
        errno = 0;
        e = readdir(d);
        if (!e) break;
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat st;
        unsigned char kind;
        uint64_t size = 0;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
            kind = kind_of(st.st_mode);
            size = (uint64_t)st.st_size;
        } else if (errno == ENOENT) {
            continue; /* removed while we listed */
        } else {
            kind = kind_of_dtype(e->d_type);
        }
        size_t l = strlen(e->d_name) + 1;
        if (o + 9 + l > sizeof out) {
            if (stream_cancelled(id)) {
                closedir(d);
                send_err(id, ECANCELED, "list: cancelled by the host");
                return;
            }
            send_frame(T_DATA, id, out, o);
            o = 0;
        }
        total += 9 + l;
        if (cap != NO_CAP && total > cap) {
            closedir(d);
            send_err(id, EFBIG, "its listing is over the cap of %llu bytes", (unsigned long long)cap);
            return;
        }
        out[o] = kind;
        put32(out + o + 1, (uint32_t)size);
        put32(out + o + 5, (uint32_t)(size >> 32));
        memcpy(out + o + 9, e->d_name, l);
        o += 9 + l;
        n++;
    }
    int rerr = errno;
    closedir(d);
    if (rerr) {
        send_err(id, rerr, "readdir: %s", strerror(rerr));
        return;
    }
    if (o) send_frame(T_DATA, id, out, o);
    char done[64];
    int dl = snprintf(done, sizeof done, "entries=%llu\n", (unsigned long long)n);
    send_frame(T_OK, id, done, (size_t)dl);
}

static void do_list(const struct frame *f) {
    uint32_t id = f->id, uid, gid;
    uint64_t cap;
    char path[PATH_MAX];
    if (parse_file_req(f, &cap, &uid, &gid, path, sizeof path) < 0) {
        send_err(id, EINVAL, "list: malformed request");
        return;
    }
    if (fs_as(uid, gid) < 0) {
        fs_root();
        send_err(id, errno, "list: cannot take uid %u: %s", uid, strerror(errno));
        return;
    }
    list_entries(id, path, cap);
    fs_root();
}

/* ---- PUT / GET -------------------------------------------------------------- */
/* Open path for writing as a regular file (non-blocking, so a FIFO cannot
 * stall the agent; refused before any write). Sets err/errmsg on failure. */
static int open_for_put(const char *path, uint32_t mode, int *err, char *errmsg, size_t cap) {
    if (mkparents(path) < 0) {
        *err = errno;
        snprintf(errmsg, cap, "cannot make parent directories: %s", strerror(*err));
        return -1;
    }
    int fd = openat2_in_root(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY,
                             mode & 07777);
    if (fd < 0) {
        *err = errno;
        snprintf(errmsg, cap, "%s", strerror(*err));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        *err = errno;
        snprintf(errmsg, cap, "fstat: %s", strerror(*err));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        *err = (int)E_NOTREG;
        snprintf(errmsg, cap, "it is %s", what_is(st.st_mode));
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

static void put_file(const struct frame *hdr) {
    /* header: u32 mode, u32 uid, u32 gid, path\0 ; then T_DATA_IN frames, len 0 ends */
    uint32_t id = hdr->id;
    int fd = -1, err = 0;
    char errmsg[512] = "";
    char path[PATH_MAX];
    uint32_t mode = 0644;
    if (hdr->len < 13 || !cstr(hdr, 12) || strlen(cstr(hdr, 12)) >= sizeof path) {
        err = EINVAL;
        snprintf(errmsg, sizeof errmsg, "put: bad header");
        path[0] = 0;
    } else {
        mode = get32(hdr->data);
        strcpy(path, cstr(hdr, 12));
        if (fs_as(get32(hdr->data + 4), get32(hdr->data + 8)) < 0) {
            err = errno;
            snprintf(errmsg, sizeof errmsg, "put: cannot take the workload's uid: %s", strerror(err));
        } else {
            fd = open_for_put(path, mode, &err, errmsg, sizeof errmsg);
        }
    }
    struct frame f;
    for (;;) {
        next_frame(&f);
        if (f.type != T_DATA_IN || f.id != id) {
            /* protocol error: the host gave up on this put; treat as abort */
            if (fd >= 0) close(fd);
            send_err(id, EPROTO, "put: unexpected frame type %u", f.type);
            return;
        }
        if (f.len == 0) break;
        if (fd >= 0 && !err) {
            size_t done = 0;
            while (done < f.len) {
                ssize_t w = write(fd, f.data + done, f.len - done);
                if (w < 0) {
                    if (errno == EINTR) continue;
                    err = errno;
                    snprintf(errmsg, sizeof errmsg, "write: %s", strerror(err));
                    break;
                }
                done += (size_t)w;
            }
        }
    }
    if (fd >= 0) {
        if (!err && fchmod(fd, mode & 07777) < 0) {
            err = errno;
            snprintf(errmsg, sizeof errmsg, "chmod: %s", strerror(err));
        }
        if (close(fd) < 0 && !err) {
            err = errno;
            snprintf(errmsg, sizeof errmsg, "close: %s", strerror(err));
        }
    }
    if (err)
        send_err(id, (int)err, "%s", errmsg);
    else
        send_frame(T_OK, id, NULL, 0);
}

static void do_put(const struct frame *hdr) {
    put_file(hdr);
    fs_root();
}

/* Stream a regular file: DATA frames, then OK "size=N". Refused with E_NOTREG
 * (FIFO, device, socket, directory, kernel interface) or EFBIG (st_size over
 * the cap, or the file grew past it: at most cap bytes are ever sent). */
static void get_file(uint32_t id, const char *path, uint64_t cap) {
    int fd = openat2_in_root(path, O_RDONLY | O_NONBLOCK | O_NOCTTY, 0);
    if (fd < 0) {
        send_err(id, errno, "%s", strerror(errno));
        return;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        send_err(id, e, "fstat: %s", strerror(e));
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        send_err(id, (int)E_NOTREG, "it is %s", what_is(st.st_mode));
        return;
    }
    const char *fs = pseudo_fs(fd);
    if (fs) {
        close(fd);
        send_err(id, (int)E_NOTREG, "it is a %s kernel interface", fs);
        return;
    }
    if (cap != NO_CAP && (uint64_t)st.st_size > cap) {
        close(fd);
        send_err(id, EFBIG, "it is %llu bytes, over the max_bytes cap of %llu",
                 (unsigned long long)st.st_size, (unsigned long long)cap);
        return;
    }
    fs_root(); /* the file is open: reading it needs no credentials */
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    static unsigned char buf[CHUNK * 4];
    uint64_t total = 0;
    for (;;) {
        if (stream_cancelled(id)) {
            close(fd);
            send_err(id, ECANCELED, "get: cancelled by the host");
            return;
        }
        size_t want = sizeof buf;
        if (cap != NO_CAP && cap - total + 1 < want) want = (size_t)(cap - total + 1);
        ssize_t n = read(fd, buf, want);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            send_err(id, e, "read: %s", strerror(e));
            return;
        }
        if (n == 0) break;
        if (cap != NO_CAP && total + (uint64_t)n > cap) {
            close(fd);
            send_err(id, EFBIG, "it grew past the max_bytes cap of %llu while it was read",
                     (unsigned long long)cap);
            return;
        }
        send_frame(T_DATA, id, buf, (size_t)n);
        total += (uint64_t)n;
    }
    close(fd);
    char done[64];
    int dl = snprintf(done, sizeof done, "size=%llu\n", (unsigned long long)total);
    send_frame(T_OK, id, done, (size_t)dl);
}

static void do_get(const struct frame *f) {
    uint32_t id = f->id, uid, gid;
    uint64_t cap;
    char path[PATH_MAX];
    if (parse_file_req(f, &cap, &uid, &gid, path, sizeof path) < 0) {
        send_err(id, EINVAL, "get: malformed request");
        return;
    }
    if (fs_as(uid, gid) < 0) {
        fs_root();
        send_err(id, errno, "get: cannot take uid %u: %s", uid, strerror(errno));
        return;
    }
    get_file(id, path, cap);
    fs_root();
}

/* ---- EXEC -------------------------------------------------------------------- */
struct exec_req {
    uint32_t timeout_ms, output_cap, pids_max, uid, gid, flags, argc, envc;
    char *workdir;
    char **argv, **envp;
};

#define F_STDIN 1u

static int parse_exec(const struct frame *f, struct exec_req *r) {
    if (f->len < 32) return -1;
    uint32_t *fields[] = {&r->timeout_ms, &r->output_cap, &r->pids_max, &r->uid,
                          &r->gid,        &r->flags,      &r->argc,     &r->envc};
    for (int i = 0; i < 8; i++) *fields[i] = get32(f->data + 4 * i);
    if (r->argc == 0 || r->argc > 65536 || r->envc > 65536) return -1;
    size_t off = 32;
    r->workdir = cstr(f, off);
    if (!r->workdir) return -1;
    off += strlen(r->workdir) + 1;
    r->argv = calloc(r->argc + 1, sizeof(char *));
    r->envp = calloc(r->envc + 1, sizeof(char *));
    if (!r->argv || !r->envp) return -1;
    for (uint32_t i = 0; i < r->argc; i++) {
        if (!(r->argv[i] = cstr(f, off))) return -1;
        off += strlen(r->argv[i]) + 1;
    }
    for (uint32_t i = 0; i < r->envc; i++) {
        if (!(r->envp[i] = cstr(f, off))) return -1;
        off += strlen(r->envp[i]) + 1;
    }
    return 0;
}

static const char *env_get(char **envp, const char *key) {
    size_t kl = strlen(key);
    for (; *envp; envp++)
        if (!strncmp(*envp, key, kl) && (*envp)[kl] == '=') return *envp + kl + 1;
    return NULL;
}

/* Child side: never returns. */
static void exec_child(struct exec_req *r, const char *join_cg, int in_fd, int out_fd, int err_fd,
                       int errpipe) {
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    int e = 0;
    if (join_cg) { /* clone3 could not place us: join by hand */
        char procs[128];
        snprintf(procs, sizeof procs, "%s/cgroup.procs", join_cg);
        if (write_file(procs, "0") < 0) e = errno;
    }
    write_file("/proc/self/oom_score_adj", "0");
    if (!e && chroot(ROOT) < 0) e = errno;
    if (!e && chdir(r->workdir) < 0) e = errno;
    if (!e && setgroups(0, NULL) < 0) e = errno;
    if (!e && setgid(r->gid) < 0) e = errno;
    if (!e && setuid(r->uid) < 0) e = errno;
    if (e) {
        int32_t code[2] = {1, e};
        if (write(errpipe, code, sizeof code) < 0) _exit(126);
        _exit(126);
    }
    dup2(in_fd, 0);
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    umask(022);
    const char *file = r->argv[0];
    int last = ENOENT;
    if (strchr(file, '/')) {
        execve(file, r->argv, r->envp);
        last = errno;
    } else {
        const char *path = env_get(r->envp, "PATH");
        if (!path) path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        char buf[PATH_MAX];
        while (*path) {
            const char *end = strchrnul(path, ':');
            size_t dl = (size_t)(end - path);
            if (dl + strlen(file) + 2 < sizeof buf) {
                memcpy(buf, path, dl);
                buf[dl] = '/';
                strcpy(buf + dl + 1, file);
                if (!dl) strcpy(buf, file);
                execve(buf, r->argv, r->envp);
                if (errno != ENOENT && errno != ENOTDIR) last = errno;
            }
            path = *end ? end + 1 : end;
        }
    }
    int32_t code[2] = {2, last};
    if (write(errpipe, code, sizeof code) < 0) _exit(127);
    _exit(127);
}

/* The next exec's cgroup is made ahead of time, off the request's path. */
static char next_cg[64];
static int next_cg_fd = -1;
static unsigned cg_seq;

static void prepare_cg(void) {
    if (next_cg_fd >= 0) return;
    snprintf(next_cg, sizeof next_cg, CG_ROOT "/x%u", ++cg_seq);
    if (mkdir(next_cg, 0755) < 0 && errno != EEXIST) return;
    next_cg_fd = open(next_cg, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

/* fork() straight into a cgroup (clone3 + CLONE_INTO_CGROUP); *joined is 0
 * when the kernel could not, and the child must join by itself. */
static pid_t fork_into(int cgfd, int *joined) {
    struct clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = CLONE_INTO_CGROUP;
    ca.exit_signal = SIGCHLD;
    ca.cgroup = (uint64_t)cgfd;
    pid_t pid = cgfd >= 0 ? (pid_t)syscall(SYS_clone3, &ca, sizeof ca) : -1;
    if (pid >= 0) {
        *joined = 1;
        return pid;
    }
    *joined = 0;
    return fork();
}

static void cg_kill(const char *cg) {
    char p[128];
    snprintf(p, sizeof p, "%s/cgroup.kill", cg);
    write_file(p, "1");
}

static int cg_populated(const char *cg) {
    char p[128];
    snprintf(p, sizeof p, "%s/cgroup.events", cg);
    long long v = keyed(p, "populated");
    return v != 0;
}

/* Append the kernel's OOM lines logged since the exec started to out. */
static size_t oom_lines(int kmsg, char *out, size_t cap) {
    size_t o = 0;
    if (kmsg < 0) return 0;
    char rec[2048];
    for (;;) {
        ssize_t n = read(kmsg, rec, sizeof rec - 1);
        if (n < 0) {
            if (errno == EPIPE) continue; /* overwritten records */
            break;
        }
        rec[n] = 0;
        char *msg = strchr(rec, ';');
        if (!msg) continue;
        msg++;
        char *nl = strchr(msg, '\n');
        if (nl) *nl = 0;
        if (strstr(msg, "Out of memory") || strstr(msg, "oom-kill") || strstr(msg, "Killed process")) {
            int w = snprintf(out + o, cap - o, "kmsg=%s\n", msg);
            if (w > 0 && (size_t)w < cap - o) o += (size_t)w;
        }
    }
    return o;
}

static void do_exec(const struct frame *req, int sigfd) {
    uint32_t id = req->id;
    struct exec_req r;
    memset(&r, 0, sizeof r);
    /* copy the request: the frame memory is reused by the next read */
    struct frame f = *req;
    f.data = malloc(req->len ? req->len : 1);
    if (!f.data) die("malloc");
    memcpy(f.data, req->data, req->len);
    int inp[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1}, ep[2] = {-1, -1};
    int devnull = -1, kmsg = -1;
    unsigned char *sbuf = NULL;
    char cg[64];
    int made_cg = 0, cgfd = -1;

    if (parse_exec(&f, &r) < 0) {
        send_err(id, EINVAL, "exec: malformed request");
        goto out;
    }
    prepare_cg();
    if (next_cg_fd < 0) {
        send_err(id, errno, "mkdir %s: %s", next_cg, strerror(errno));
        goto out;
    }
    memcpy(cg, next_cg, sizeof cg);
    cgfd = next_cg_fd;
    next_cg_fd = -1;
    made_cg = 1;
    if (r.pids_max) {
        char p[128], v[32];
        snprintf(p, sizeof p, "%s/pids.max", cg);
        snprintf(v, sizeof v, "%u", r.pids_max);
        write_file(p, v);
    }
    if (r.flags & F_STDIN) {
        if (pipe2(inp, O_CLOEXEC) < 0) die("pipe");
    } else {
        devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
    if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 || pipe2(ep, O_CLOEXEC) < 0) die("pipe");
    long long oom_before = keyed("/proc/vmstat", "oom_kill");
    kmsg = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (kmsg >= 0) lseek(kmsg, 0, SEEK_END);
    int64_t start = now_ms();
    int joined = 0;
    pid_t pid = fork_into(cgfd, &joined);
    if (pid < 0) {
        send_err(id, errno, "fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0)
        exec_child(&r, joined ? NULL : cg, (r.flags & F_STDIN) ? inp[0] : devnull, outp[1], errp[1], ep[1]);
    close(outp[1]);
    outp[1] = -1;
    close(errp[1]);
    errp[1] = -1;
    close(ep[1]);
    ep[1] = -1;
    if (inp[0] >= 0) {
        close(inp[0]);
        inp[0] = -1;
    }
    int32_t code[2];
    ssize_t en = read(ep[0], code, sizeof code);
    if (en == (ssize_t)sizeof code) {
        int st;
        waitpid(pid, &st, 0);
        if (code[0] == 2 && code[1] == ENOENT)
            send_err(id, ENOENT, "command not found: %s", r.argv[0]);
        else if (code[0] == 2)
            send_err(id, code[1], "cannot execute %s: %s", r.argv[0], strerror(code[1]));
        else
            send_err(id, code[1], "cannot start %s (workdir %s, uid %u): %s", r.argv[0], r.workdir, r.uid,
                     strerror(code[1]));
        goto out;
    }
    fcntl(outp[0], F_SETFL, O_NONBLOCK);
    fcntl(errp[0], F_SETFL, O_NONBLOCK);
    if (inp[1] >= 0) fcntl(inp[1], F_SETFL, O_NONBLOCK);

    /* stdin bytes received but not yet written to the child */
    size_t slen = 0, scap = 0;
    int stdin_eof = !(r.flags & F_STDIN);
    int out_open = 1, err_open = 1, main_done = 0, killed = 0;
    const char *why = "exited";
    int status = 0;
    uint64_t nout = 0, nerr = 0;
    int trunc_out = 0, trunc_err = 0;
    int64_t deadline = r.timeout_ms ? start + r.timeout_ms : 0;
    int64_t kill_at = 0;
    static unsigned char obuf[CHUNK];

    while (!(main_done && !out_open && !err_open)) {
        /* frames already buffered (stdin, a kill) */
        struct frame sf;
        while (try_frame(&sf)) {
            if (sf.type == T_STDIN && sf.id == id) {
                if (sf.len == 0) {
                    stdin_eof = 1;
                } else if (inp[1] >= 0) {
                    if (slen + sf.len > scap) {
                        scap = (slen + sf.len) * 2;
                        sbuf = realloc(sbuf, scap);
                        if (!sbuf) die("realloc");
                    }
                    memcpy(sbuf + slen, sf.data, sf.len);
                    slen += sf.len;
                }
            } else if (sf.type == T_KILL && sf.id == id && !killed) {
                why = "killed";
                killed = 1;
                kill_at = now_ms();
                cg_kill(cg);
            }
            /* anything else is stale while an exec runs: drop it */
        }
        release_frame();
        if (stdin_eof && !slen && inp[1] >= 0) {
            close(inp[1]);
            inp[1] = -1;
        }
        struct pollfd p[5];
        int np = 0;
        int i_port = -1, i_out = -1, i_err = -1, i_in = -1;
        int64_t t = now_ms();
        p[np].fd = sigfd;
        p[np].events = POLLIN;
        int i_sig = np++;
        int wait = -1;
        if (slen < 4 * MAX_FRAME) {
            if (t >= port_quiet_until) {
                p[np].fd = port;
                p[np].events = POLLIN;
                i_port = np++;
            } else {
                wait = (int)(port_quiet_until - t);
            }
        }
        if (out_open) {
            p[np].fd = outp[0];
            p[np].events = POLLIN;
            i_out = np++;
        }
        if (err_open) {
            p[np].fd = errp[0];
            p[np].events = POLLIN;
            i_err = np++;
        }
        if (inp[1] >= 0 && slen) {
            p[np].fd = inp[1];
            p[np].events = POLLOUT;
            i_in = np++;
        }
        if (deadline && !killed) {
            int left = deadline > t ? (int)(deadline - t) : 0;
            if (wait < 0 || left < wait) wait = left;
        }
        if (killed && (wait < 0 || wait > 50)) wait = 50;
        int pr = poll(p, (nfds_t)np, wait);
        if (pr < 0 && errno != EINTR) die("poll");
        t = now_ms();
        if (deadline && !killed && t >= deadline) {
            why = "timeout";
            killed = 1;
            kill_at = t;
            cg_kill(cg);
        }
        if (killed && t - kill_at > 5000) break; /* give up waiting on the pipes */
        if (pr <= 0) {
            if (killed) cg_kill(cg);
            continue;
        }
        if (p[i_sig].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sigfd, &si, sizeof si) > 0) {
            }
            int st;
            pid_t w;
            while ((w = waitpid(-1, &st, WNOHANG)) > 0) {
                if (w == pid) {
                    status = st;
                    main_done = 1;
                    /* the main process is gone: stop whatever it left behind */
                    cg_kill(cg);
                }
            }
        }
        if (i_port >= 0 && (p[i_port].revents & (POLLIN | POLLHUP))) fill_once(0);
        int idx[2] = {i_out, i_err};
        for (int k = 0; k < 2; k++) {
            if (idx[k] < 0 || !(p[idx[k]].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            int fd = k ? errp[0] : outp[0];
            ssize_t n = read(fd, obuf, sizeof obuf);
            if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (n <= 0) {
                close(fd);
                if (k) {
                    err_open = 0;
                    errp[0] = -1;
                } else {
                    out_open = 0;
                    outp[0] = -1;
                }
                continue;
            }
            uint64_t *cnt = k ? &nerr : &nout;
            int *tr = k ? &trunc_err : &trunc_out;
            size_t send = (size_t)n;
            if (*cnt + send > r.output_cap) {
                send = *cnt < r.output_cap ? (size_t)(r.output_cap - *cnt) : 0;
                *tr = 1;
                if (!killed) {
                    why = "output_limit";
                    killed = 1;
                    kill_at = now_ms();
                    cg_kill(cg);
                }
            }
            if (send) send_frame(k ? T_STDERR : T_STDOUT, id, obuf, send);
            *cnt += send;
        }
        if (i_in >= 0 && (p[i_in].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(inp[1], sbuf, slen);
            if (w > 0) {
                memmove(sbuf, sbuf + w, slen - (size_t)w);
                slen -= (size_t)w;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                /* the child closed its stdin: drop the rest */
                slen = 0;
                stdin_eof = 1;
            }
        }
    }
    if (!main_done) cg_kill(cg); /* only after the 5 s give-up; reaped later */
    int64_t duration = now_ms() - start;
    /* evidence, read from the exec's cgroup before it goes */
    char p[128];
    char out[8192];
    size_t o = 0;
    if (main_done && WIFEXITED(status))
        o += (size_t)snprintf(out + o, sizeof out - o, "exit_code=%d\n", WEXITSTATUS(status));
    if (main_done && WIFSIGNALED(status))
        o += (size_t)snprintf(out + o, sizeof out - o, "signal=%d\n", WTERMSIG(status));
    o += (size_t)snprintf(out + o, sizeof out - o, "reason=%s\nduration_ms=%lld\n", why, (long long)duration);
    o += (size_t)snprintf(out + o, sizeof out - o, "stdout_truncated=%d\nstderr_truncated=%d\n", trunc_out,
                          trunc_err);
    snprintf(p, sizeof p, "%s/memory.peak", cg);
    char vbuf[64];
    if (read_file(p, vbuf, sizeof vbuf) > 0)
        o += (size_t)snprintf(out + o, sizeof out - o, "memory_peak_bytes=%lld\n", strtoll(vbuf, NULL, 10));
    snprintf(p, sizeof p, "%s/memory.events", cg);
    o += (size_t)snprintf(out + o, sizeof out - o, "cgroup_oom_kill=%lld\n", keyed(p, "oom_kill"));
    snprintf(p, sizeof p, "%s/pids.events", cg);
    o += (size_t)snprintf(out + o, sizeof out - o, "pids_max_hit=%lld\npids_max=%u\n", keyed(p, "max"),
                          r.pids_max);
    long long oom_after = keyed("/proc/vmstat", "oom_kill");
    o += (size_t)snprintf(out + o, sizeof out - o, "oom_kill_before=%lld\noom_kill_after=%lld\n", oom_before,
                          oom_after);
    o += (size_t)snprintf(out + o, sizeof out - o, "mem_total_kib=%lld\n", keyed("/proc/meminfo", "MemTotal"));
    if (oom_after > oom_before) o += oom_lines(kmsg, out + o, sizeof out - o);
    send_frame(T_EXIT, id, out, o);
    /* after the answer: the group is empty once its last process is reaped */
    for (int i = 0; i < 200 && cg_populated(cg); i++) {
        int st;
        while (waitpid(-1, &st, WNOHANG) > 0) {
        }
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }

out:
    for (int i = 0; i < 2; i++) {
        int *fds[] = {inp, outp, errp, ep};
        for (int k = 0; k < 4; k++)
            if (fds[k][i] >= 0) close(fds[k][i]);
    }
    if (devnull >= 0) close(devnull);
    if (kmsg >= 0) close(kmsg);
    if (cgfd >= 0) close(cgfd);
    if (made_cg) rmdir(cg);
    prepare_cg();
    free(sbuf);
    free(f.data);
    free(r.argv);
    free(r.envp);
}

/* ---- start-up ------------------------------------------------------------------ */
/*
 * As /init of the initramfs (PID 1, no arguments) the agent first sets the
 * guest up, with plain syscalls (a shell would fork ~20 busybox processes,
 * ~0.15 s under TCG):
 *   - load the modules listed in /etc/tierbox-modules, in order (virtio-mmio,
 *     virtio-console, virtio-rng, overlay; virtio-blk when a disk is attached);
 *   - mount the root disk /dev/vda (ext4, read-only) or use /rootfs (busybox)
 *     as the lower layer, a tmpfs as the upper, overlayfs at /newroot;
 *   - give /newroot proc, sysfs, devtmpfs, devpts, /dev/shm; loopback up.
 * Kernel command line knobs: tierbox.disk=0|1, tierbox.rw_mib=N (size cap of
 * the writable layer), tierbox.agent=0 (set up, then never answer: tests),
 * tierbox.debug=1 (time each step on the console).
 */
static void warn(const char *what) { fprintf(stderr, "tierbox-init: %s: %s\n", what, strerror(errno)); }

static int init_debug; /* tierbox.debug=1: log each step's time since boot */

static void step(const char *what) {
    if (!init_debug) return;
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    fprintf(stderr, "tierbox-init: %ld.%03ld %s\n", (long)ts.tv_sec, ts.tv_nsec / 1000000, what);
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags,
                       const char *data) {
    if (mount(src, dst, type, flags, data) < 0) {
        fprintf(stderr, "tierbox-init: mount %s on %s: %s\n", type, dst, strerror(errno));
        die("mount");
    }
}

static long cmdline_knob(const char *cmdline, const char *key, long dflt) {
    const char *p = cmdline;
    size_t kl = strlen(key);
    while ((p = strstr(p, key))) {
        if ((p == cmdline || p[-1] == ' ') && p[kl] == '=') return strtol(p + kl + 1, NULL, 10);
        p += kl;
    }
    return dflt;
}

static void load_modules(int disk) {
    static char list[8192];
    if (read_file("/etc/tierbox-modules", list, sizeof list) < 0) {
        warn("read /etc/tierbox-modules");
        return;
    }
    for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n")) {
        char *flag = strchr(line, ' ');
        if (flag) {
            *flag++ = 0;
            if (!strcmp(flag, "disk") && !disk) continue;
        }
        int fd = open(line, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            warn(line);
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST) warn(line);
        close(fd);
        step(strrchr(line, '/') ? strrchr(line, '/') + 1 : line);
    }
}

static void guest_init(void) {
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    static char cmdline[4096];
    read_file("/proc/cmdline", cmdline, sizeof cmdline);
    long disk = cmdline_knob(cmdline, "tierbox.disk", 0);
    long rw_mib = cmdline_knob(cmdline, "tierbox.rw_mib", 0);
    long agent = cmdline_knob(cmdline, "tierbox.agent", 1);
    init_debug = (int)cmdline_knob(cmdline, "tierbox.debug", 0);
    step("init");
    load_modules((int)disk);
    step("modules loaded");
    mkdir("/run/lower", 0755);
    mkdir("/run/rw", 0755);
    mkdir("/newroot", 0755);
    char opts[64] = "mode=0755";
    if (rw_mib > 0) snprintf(opts, sizeof opts, "mode=0755,size=%ldm", rw_mib);
    must_mount("rw", "/run/rw", "tmpfs", 0, opts);
    mkdir("/run/rw/upper", 0755);
    mkdir("/run/rw/work", 0755);
    const char *lower = "/rootfs";
    if (disk) {
        struct stat st;
        for (int i = 0; i < 500 && stat("/dev/vda", &st) < 0; i++) {
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        step("disk present");
        must_mount("/dev/vda", "/run/lower", "ext4", MS_RDONLY, "noload");
        step("disk mounted");
        lower = "/run/lower";
    }
    char ovl[256];
    snprintf(ovl, sizeof ovl, "lowerdir=%s,upperdir=/run/rw/upper,workdir=/run/rw/work", lower);
    must_mount("overlay", "/newroot", "overlay", 0, ovl);
    const char *dirs[] = {"/newroot/proc", "/newroot/sys", "/newroot/dev", "/newroot/tmp", NULL};
    for (int i = 0; dirs[i]; i++) mkdir(dirs[i], 0755);
    chmod("/newroot/tmp", 01777);
    must_mount("proc", "/newroot/proc", "proc", 0, NULL);
    must_mount("sysfs", "/newroot/sys", "sysfs", 0, NULL);
    must_mount("devtmpfs", "/newroot/dev", "devtmpfs", 0, NULL);
    mkdir("/newroot/dev/pts", 0755);
    mkdir("/newroot/dev/shm", 01777);
    if (mount("devpts", "/newroot/dev/pts", "devpts", 0, "newinstance,ptmxmode=0666") < 0) warn("devpts");
    if (mount("shm", "/newroot/dev/shm", "tmpfs", 0, "mode=1777") < 0) warn("/dev/shm");
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s >= 0) {
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strcpy(ifr.ifr_name, "lo");
        if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
            ifr.ifr_flags |= IFF_UP;
            if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) warn("loopback up");
        }
        close(s);
    }
    sethostname("tierbox", 7);
    step("root ready");
    if (!agent) {
        fprintf(stderr, "tierbox-init: agent disabled by tierbox.agent=0\n");
        for (;;) pause();
    }
}

static int open_port(void) {
    for (int tries = 0; tries < 500; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char p[512], name[128];
            snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
            if (read_file(p, name, sizeof name) <= 0) continue;
            name[strcspn(name, "\n")] = 0;
            if (strcmp(name, PORT_NAME)) continue;
            snprintf(p, sizeof p, "/dev/%s", e->d_name);
            int fd = open(p, O_RDWR | O_CLOEXEC);
            if (fd >= 0) {
                closedir(d);
                return fd;
            }
        }
        if (d) closedir(d);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    errno = ENODEV;
    return -1;
}

int main(int argc, char **argv) {
    if (argc > 1)
        ROOT = argv[1];
    else if (getpid() == 1)
        guest_init();
    signal(SIGPIPE, SIG_IGN);
    setgroups(0, NULL); /* file requests run with the workload's fsuid/fsgid and no groups */
    write_file("/proc/self/oom_score_adj", "-1000");
    root_fd = open(ROOT, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0) die("open root");
    if (mount("cgroup2", CG_ROOT, "cgroup2", 0, NULL) < 0 && errno != EBUSY) die("mount cgroup2");
    write_file(CG_ROOT "/cgroup.subtree_control", "+pids +memory");
    port = open_port();
    if (port < 0) die("open virtio port " PORT_NAME);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGIO);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    sigdelset(&mask, SIGIO);
    /* the port raises SIGIO when the host connects (see fill_once) */
    fcntl(port, F_SETOWN, getpid());
    fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC);
    int sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0) die("signalfd");
    fprintf(stderr, "tierbox-agent: ready on " PORT_NAME "\n");
    for (;;) {
        struct frame f;
        next_frame(&f);
        /* reap orphans re-parented to us between requests */
        int st;
        while (waitpid(-1, &st, WNOHANG) > 0) {
        }
        switch (f.type) {
        case T_HELLO: do_hello(&f); break;
        case T_EXEC: do_exec(&f, sigfd); break;
        case T_PUT: do_put(&f); break;
        case T_GET: do_get(&f); break;
        case T_STATS: do_stats(&f); break;
        case T_SYNC: do_sync(&f); break;
        case T_LIST: do_list(&f); break;
        case T_POWEROFF:
            send_frame(T_OK, f.id, NULL, 0);
            sync();
            reboot(RB_POWER_OFF);
            break;
        case T_STDIN:
        case T_DATA_IN:
        case T_KILL:
            break; /* leftovers of an exec or put that already ended */
        default: send_err(f.id, ENOSYS, "unknown request type %u", f.type);
        }
    }
}
