/*
 * tierbox-agent: the in-guest agent of the microvm and vm tiers.
 *
 * Runs as PID 1 of the guest (exec'd by the initramfs /init once the root
 * overlay is mounted at ROOT) and serves the host over a virtio-serial port
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
 * Protocol 3: one poll loop serves everything at once: any number of
 * commands (each known by its id, with its own pipes or pty and guest
 * cgroup), file streams and requests. Nothing in the loop waits for the
 * host: frames to it wait in a queue, and while more than OUTQ_HIGH bytes
 * wait the loop reads no command output and no file (the commands block on
 * their pipes), so a slow or absent host costs the guest a bounded buffer.
 * A command's stdin is credited: the host keeps at most a window of bytes
 * in flight and ACK frames say how many were written to the command.
 *
 * Commands run chroot'ed into ROOT as the requested uid/gid, in their own
 * cgroup v2 group (/sys/fs/cgroup/x<n>) with pids.max, so their accounting
 * (memory peak, OOM kills, refused forks) is their own. The group is killed
 * (cgroup.kill) on timeout, output overflow or when the host gives up on
 * the command. When a command's main process exits, what it left running
 * (`sleep 300 &`) lives on in its group until the guest ends, as in a
 * container, and the group is removed once it empties. Each host connection
 * starts with SESSION; the commands of earlier connections then lose their
 * pipes (their stdin ends, their output pipes close), their processes
 * otherwise run on.
 *
 * File requests (PUT, GET, LIST) resolve paths with openat2(RESOLVE_IN_ROOT)
 * under ROOT and run with the workload's file-system uid/gid (setfsuid), so
 * they reach only what the workload could. GET opens non-blocking, refuses
 * anything but a regular file on a data file system (FIFOs, devices, sockets,
 * directories, /proc and /sys files) and never sends more than the host's
 * cap. A KILL with a stream's id ends it (ERR ECANCELED).
 *
 * NET gives the guest's one NIC (virtio-net, present only when the sandbox
 * has an egress network) its IPv4 address and default route; the host sends
 * it after boot and again after a restore (a clone gets its own gateway).
 * The NIC is behind the host's filter: nothing here is a security boundary.
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
#include <net/route.h>
#include <netinet/in.h>
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
#include <termios.h>
#include <time.h>
#include <unistd.h>

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

#define MAGIC 0x31584254u /* "TBX1" */
#define MAX_FRAME (1u << 20)
#define CHUNK (64u * 1024u)
#define AGENT_VERSION "3"
#define PORT_NAME "tierbox.agent"
#define CG_ROOT "/sys/fs/cgroup"
/* ERR code (beyond errno values) for "not a regular file"; the message says what it is */
#define E_NOTREG 0x10000u
/* GET/LIST cap meaning "no cap" (the host streams to a file) */
#define NO_CAP UINT64_MAX
/* How many commands, file streams and file uploads can be open at once */
#define MAX_EXECS 64
#define MAX_STREAMS 16
#define MAX_PUTS 16
/* Above this many bytes queued for the host, produce no more output */
#define OUTQ_HIGH (2u << 20)
/* Bytes of input held at most: a frame and change (frames are handled as they come) */
#define IBUF_CAP (4u * MAX_FRAME)
/* A command's stdin held at most (the host keeps STDIN_WINDOW = 1 MiB in flight) */
#define STDIN_CAP (4u << 20)
/* Acknowledge stdin in steps of this many bytes (and whenever it drains) */
#define ACK_EVERY (32u * 1024u)
/* After a command's main process exits, how long its orphans may keep its output open */
#define ORPHAN_GRACE_MS 200
/* After killing a command's group, how long to wait for its main process */
#define KILL_GIVE_UP_MS 5000
/* Bytes of a process's command line that PROCS reports */
#define PROC_CMDLINE_MAX 4096
/* Groups of ended commands whose leftovers still run, waiting to be removed */
#define MAX_LINGER 1024

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
    T_RESIZE = 12,
    T_PROCS = 13,
    T_SESSION = 14,
    T_NET = 15,
    T_OK = 101,
    T_ERR = 102,
    T_STDOUT = 103,
    T_STDERR = 104,
    T_EXIT = 105,
    T_DATA = 106,
    T_ACK = 107,
    T_STARTED = 108,
};

/* EXEC flags */
#define F_STDIN 1u /* stdin comes in STDIN frames (else /dev/null) */
#define F_TTY 2u   /* on a pseudo-terminal: stdin, stdout and stderr are its slave */
/* KILL flags */
#define KILL_DEADLINE 1u /* the host gave up waiting: end with reason=killed */

struct frame {
    uint32_t type, id, len;
    unsigned char *data;
};

static const char *ROOT = "/newroot";
static int port = -1;
static int root_fd = -1;
static int host_up;      /* the guest sees the host's end of the port open */
static uint32_t session; /* bumped by each host's SESSION, its first frame */

static void die(const char *what) {
    fprintf(stderr, "tierbox-agent: %s: %s\n", what, strerror(errno));
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
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

/* ---- input from the port ----------------------------------------------------- */
/* ibuf[ipos..ilen) is what was read and not yet parsed. A frame returned by
 * try_frame points into ibuf and stays valid until the next read_port. */
static unsigned char *ibuf;
static size_t ilen, ipos;
static const size_t icap = IBUF_CAP;

/* Read what the port has: 1 when bytes came, 0 when the host is not
 * connected (the port reads as end of file), -1 when it has nothing now. */
static int read_port(void) {
    if (!ibuf && !(ibuf = malloc(icap))) die("malloc");
    if (ipos) {
        memmove(ibuf, ibuf + ipos, ilen - ipos);
        ilen -= ipos;
        ipos = 0;
    }
    if (ilen >= icap) return -1;
    for (;;) {
        ssize_t n = read(port, ibuf + ilen, icap - ilen);
        if (n > 0) {
            ilen += (size_t)n;
            return 1;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return -1;
        if (n < 0) die("read port");
        host_up = 0; /* no data, and no host */
        return 0;
    }
}

/* Parse the next complete frame, skipping bytes that are not one (resync
 * after garbage or a half frame from a host that went away). */
static int try_frame(struct frame *f) {
    for (;;) {
        size_t i = ipos;
        while (i + 4 <= ilen && get32(ibuf + i) != MAGIC) i++;
        if (i + 4 > ilen) {
            if (ilen - ipos > 3) ipos = ilen - 3; /* keep what may start a magic */
            return 0;
        }
        ipos = i;
        if (ilen - ipos < 16) return 0;
        uint32_t len = get32(ibuf + ipos + 12);
        if (len > MAX_FRAME) { /* not a frame header after all */
            ipos++;
            continue;
        }
        if (ilen - ipos < 16 + (size_t)len) return 0;
        f->type = get32(ibuf + ipos + 4);
        f->id = get32(ibuf + ipos + 8);
        f->len = len;
        f->data = ibuf + ipos + 16;
        ipos += 16 + (size_t)len;
        return 1;
    }
}

/* ---- output to the port ------------------------------------------------------- */
/* Frames wait in oq[oq_off..oq_len) until the port takes them. */
static unsigned char *oq;
static size_t oq_len, oq_off, oq_cap;

static size_t oq_pending(void) { return oq_len - oq_off; }

static void oq_add(const void *p, size_t n) {
    if (oq_off == oq_len) oq_off = oq_len = 0;
    if (oq_len + n > oq_cap) {
        if (oq_off) {
            memmove(oq, oq + oq_off, oq_len - oq_off);
            oq_len -= oq_off;
            oq_off = 0;
        }
        if (oq_len + n > oq_cap) {
            size_t c = oq_cap ? oq_cap : 256u * 1024u;
            while (c < oq_len + n) c *= 2;
            if (!(oq = realloc(oq, c))) die("realloc");
            oq_cap = c;
        }
    }
    memcpy(oq + oq_len, p, n);
    oq_len += n;
}

/* Queued even while no host is connected: a host's first frames can come
 * before the guest learns that it connected, and its answers must wait for
 * that, not be lost. What producers queue is bounded by OUTQ_HIGH. */
static void send_frame(uint32_t type, uint32_t id, const void *data, size_t len) {
    unsigned char h[16];
    put32(h, MAGIC);
    put32(h + 4, type);
    put32(h + 8, id);
    put32(h + 12, (uint32_t)len);
    oq_add(h, 16);
    if (len) oq_add(data, len);
}

static void flush_port(void) {
    while (host_up && oq_pending()) {
        ssize_t n = write(port, oq + oq_off, oq_pending());
        if (n > 0) {
            oq_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        break; /* EAGAIN (poll says when), or the host is going away (a read says so) */
    }
    if (oq_off == oq_len) oq_off = oq_len = 0;
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

/* ---- NET: the guest's NIC --------------------------------------------------- */

/* The first interface that is not loopback (the virtio-net NIC), waiting up
 * to 2 s for its driver to register it. */
static int find_nic(char *name, size_t cap) {
    for (int tries = 0; tries < 200; tries++) {
        DIR *d = opendir("/sys/class/net");
        struct dirent *e;
        int found = 0;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.' || !strcmp(e->d_name, "lo")) continue;
            if (strlen(e->d_name) >= cap) continue;
            strcpy(name, e->d_name);
            found = 1;
            break;
        }
        if (d) closedir(d);
        if (found) return 0;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return -1;
}

static void set_in(struct sockaddr *sa, uint32_t addr_be) {
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = addr_be;
    memcpy(sa, &sin, sizeof sin);
}

static void do_net(const struct frame *f) {
    /* payload: u32 address, u32 prefix length, u32 gateway; addresses in
     * network byte order. Replaces any earlier address and default route. */
    if (f->len < 12) {
        send_err(f->id, EINVAL, "net: short payload");
        return;
    }
    uint32_t addr, gw, prefix = get32(f->data + 4);
    memcpy(&addr, f->data, 4);
    memcpy(&gw, f->data + 8, 4);
    if (prefix > 32) {
        send_err(f->id, EINVAL, "net: prefix length %u", prefix);
        return;
    }
    char name[IFNAMSIZ];
    if (find_nic(name, sizeof name) < 0) {
        send_err(f->id, ENODEV, "net: the guest has no network interface");
        return;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        send_err(f->id, errno, "net: socket: %s", strerror(errno));
        return;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, name);
    const char *what = "SIOCGIFFLAGS";
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) goto fail;
    if (ifr.ifr_flags & IFF_UP) {
        /* down first: that forgets the neighbour entries and routes of the
         * gateway a restored clone's snapshot was taken behind */
        ifr.ifr_flags &= ~IFF_UP;
        what = "SIOCSIFFLAGS down";
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) goto fail;
    }
    what = "SIOCSIFADDR";
    set_in(&ifr.ifr_addr, addr);
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) goto fail;
    what = "SIOCSIFNETMASK";
    set_in(&ifr.ifr_netmask, prefix ? htonl(0xffffffffu << (32 - prefix)) : 0);
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) goto fail;
    what = "SIOCSIFFLAGS";
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) goto fail;
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) goto fail;
    struct rtentry rt;
    for (int i = 0; i < 8; i++) { /* drop old default routes (a restored clone's) */
        memset(&rt, 0, sizeof rt);
        set_in(&rt.rt_dst, 0);
        set_in(&rt.rt_genmask, 0);
        rt.rt_flags = RTF_UP;
        if (ioctl(s, SIOCDELRT, &rt) < 0) break;
    }
    if (gw) {
        memset(&rt, 0, sizeof rt);
        set_in(&rt.rt_dst, 0);
        set_in(&rt.rt_genmask, 0);
        set_in(&rt.rt_gateway, gw);
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        rt.rt_dev = name;
        what = "SIOCADDRT";
        if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) goto fail;
    }
    close(s);
    char reply[64];
    int n = snprintf(reply, sizeof reply, "ifname=%s\n", name);
    send_frame(T_OK, f->id, reply, (size_t)n);
    return;
fail:;
    int saved = errno;
    close(s);
    send_err(f->id, saved, "net: %s on %s: %s", what, name, strerror(saved));
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


/* The common head of GET and LIST: u64 cap, u32 uid, u32 gid, path\0.
 * The path is copied out, NUL-terminated within the frame. */
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

/* ---- GET and LIST: streams, one chunk per turn of the loop ------------------------ */
struct stream {
    int used, list;
    uint32_t id, uid, gid;
    int fd;   /* GET: the open file */
    DIR *dir; /* LIST: the open directory */
    uint64_t cap, total, n;
};
static struct stream streams[MAX_STREAMS];

static struct stream *stream_slot(void) {
    for (int i = 0; i < MAX_STREAMS; i++)
        if (!streams[i].used) return &streams[i];
    return NULL;
}

static void stream_close(struct stream *s) {
    if (s->fd >= 0) close(s->fd);
    if (s->dir) closedir(s->dir);
    memset(s, 0, sizeof *s);
    s->fd = -1;
}

/* Open a regular file for GET, as the workload (fs_as is in force): -1 and
 * an ERR sent when refused (E_NOTREG for FIFOs, devices, sockets, directories
 * and kernel interfaces; EFBIG when st_size is over the cap). */
static int get_open(uint32_t id, const char *path, uint64_t cap) {
    int fd = openat2_in_root(path, O_RDONLY | O_NONBLOCK | O_NOCTTY, 0);
    if (fd < 0) {
        send_err(id, errno, "%s", strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        send_err(id, e, "fstat: %s", strerror(e));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        send_err(id, (int)E_NOTREG, "it is %s", what_is(st.st_mode));
        return -1;
    }
    const char *fs = pseudo_fs(fd);
    if (fs) {
        close(fd);
        send_err(id, (int)E_NOTREG, "it is a %s kernel interface", fs);
        return -1;
    }
    if (cap != NO_CAP && (uint64_t)st.st_size > cap) {
        close(fd);
        send_err(id, EFBIG, "it is %llu bytes, over the max_bytes cap of %llu",
                 (unsigned long long)st.st_size, (unsigned long long)cap);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

/* GET and LIST share their head: u64 cap, u32 uid, u32 gid, path\0. */
static void stream_start(const struct frame *f, int list) {
    uint32_t id = f->id, uid, gid;
    uint64_t cap;
    char path[PATH_MAX];
    const char *what = list ? "list" : "get";
    if (parse_file_req(f, &cap, &uid, &gid, path, sizeof path) < 0) {
        send_err(id, EINVAL, "%s: malformed request", what);
        return;
    }
    struct stream *s = stream_slot();
    if (!s) {
        send_err(id, EAGAIN, "%s: %d file transfers are running already", what, MAX_STREAMS);
        return;
    }
    if (fs_as(uid, gid) < 0) {
        fs_root();
        send_err(id, errno, "%s: cannot take uid %u: %s", what, uid, strerror(errno));
        return;
    }
    int fd = -1;
    DIR *d = NULL;
    if (list) {
        fd = openat2_in_root(path, O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_NOCTTY, 0);
        if (fd < 0) {
            send_err(id, errno, "%s", strerror(errno));
        } else if (!(d = fdopendir(fd))) {
            int e = errno;
            close(fd);
            send_err(id, e, "%s", strerror(e));
        }
        fd = -1;
    } else {
        fd = get_open(id, path, cap);
    }
    fs_root();
    if (fd < 0 && !d) return;
    memset(s, 0, sizeof *s);
    s->used = 1;
    s->list = list;
    s->id = id;
    s->uid = uid;
    s->gid = gid;
    s->fd = fd;
    s->dir = d;
    s->cap = cap;
}

/* One chunk of a file: DATA, or at the end OK "size=N"; at most cap bytes
 * are ever sent (a file that grows past it ends in EFBIG). */
static void get_step(struct stream *s) {
    static unsigned char buf[CHUNK * 4];
    size_t want = sizeof buf;
    if (s->cap != NO_CAP && s->cap - s->total + 1 < want) want = (size_t)(s->cap - s->total + 1);
    ssize_t n = read(s->fd, buf, want);
    if (n < 0 && errno == EINTR) return;
    if (n < 0) {
        send_err(s->id, errno, "read: %s", strerror(errno));
        stream_close(s);
        return;
    }
    if (n == 0) {
        char done[64];
        int dl = snprintf(done, sizeof done, "size=%llu\n", (unsigned long long)s->total);
        send_frame(T_OK, s->id, done, (size_t)dl);
        stream_close(s);
        return;
    }
    if (s->cap != NO_CAP && s->total + (uint64_t)n > s->cap) {
        send_err(s->id, EFBIG, "it grew past the max_bytes cap of %llu while it was read",
                 (unsigned long long)s->cap);
        stream_close(s);
        return;
    }
    send_frame(T_DATA, s->id, buf, (size_t)n);
    s->total += (uint64_t)n;
}

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

/* One chunk of a listing: a DATA frame of records (u8 kind, u64 size,
 * name\0; lstat, never followed), or at the end OK "entries=N"; ERR EFBIG
 * once the records pass the cap. Runs as the workload (its fstatat). */
static void list_step(struct stream *s) {
    static unsigned char out[CHUNK];
    size_t o = 0;
    if (fs_as(s->uid, s->gid) < 0) {
        fs_root();
        send_err(s->id, errno, "list: cannot take uid %u: %s", s->uid, strerror(errno));
        stream_close(s);
        return;
    }
    int end = 0, rerr = 0;
    while (o < sizeof out - 9 - 256 - 1) {
        errno = 0;
        struct dirent *e = readdir(s->dir);
        if (!e) {
            rerr = errno;
            end = 1;
            break;
        }
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat st;
        unsigned char kind;
        uint64_t size = 0;
        if (fstatat(dirfd(s->dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
            kind = kind_of(st.st_mode);
            size = (uint64_t)st.st_size;
        } else if (errno == ENOENT) {
            continue; /* removed while we listed */
        } else {
            kind = kind_of_dtype(e->d_type);
        }
        size_t l = strlen(e->d_name) + 1;
        s->total += 9 + l;
        if (s->cap != NO_CAP && s->total > s->cap) {
            fs_root();
            send_err(s->id, EFBIG, "its listing is over the cap of %llu bytes", (unsigned long long)s->cap);
            stream_close(s);
            return;
        }
        out[o] = kind;
        put32(out + o + 1, (uint32_t)size);
        put32(out + o + 5, (uint32_t)(size >> 32));
        memcpy(out + o + 9, e->d_name, l);
        o += 9 + l;
        s->n++;
    }
    fs_root();
    if (o) send_frame(T_DATA, s->id, out, o);
    if (!end) return;
    if (rerr) {
        send_err(s->id, rerr, "readdir: %s", strerror(rerr));
    } else {
        char done[64];
        int dl = snprintf(done, sizeof done, "entries=%llu\n", (unsigned long long)s->n);
        send_frame(T_OK, s->id, done, (size_t)dl);
    }
    stream_close(s);
}

/* ---- PUT: a header, DATA_IN chunks, an empty one ends the file -------------------- */
struct put {
    int used;
    uint32_t id, mode, uid, gid;
    int fd, err;
    char errmsg[512];
};
static struct put puts_[MAX_PUTS];

static struct put *find_put(uint32_t id) {
    for (int i = 0; i < MAX_PUTS; i++)
        if (puts_[i].used && puts_[i].id == id) return &puts_[i];
    return NULL;
}

static void put_close(struct put *p) {
    if (p->fd >= 0) close(p->fd);
    memset(p, 0, sizeof *p);
    p->fd = -1;
}

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

/* header: u32 mode, u32 uid, u32 gid, path\0. A refused header is answered
 * (ERR) once its data has come, as a good one is (OK). */
static void put_start(const struct frame *hdr) {
    uint32_t id = hdr->id;
    struct put *p = NULL;
    for (int i = 0; i < MAX_PUTS && !p; i++)
        if (!puts_[i].used) p = &puts_[i];
    if (!p) {
        send_err(id, EAGAIN, "put: %d uploads are running already", MAX_PUTS);
        return;
    }
    memset(p, 0, sizeof *p);
    p->used = 1;
    p->id = id;
    p->fd = -1;
    if (hdr->len < 13 || !cstr(hdr, 12) || strlen(cstr(hdr, 12)) >= PATH_MAX) {
        p->err = EINVAL;
        snprintf(p->errmsg, sizeof p->errmsg, "put: bad header");
        return;
    }
    p->mode = get32(hdr->data);
    p->uid = get32(hdr->data + 4);
    p->gid = get32(hdr->data + 8);
    if (fs_as(p->uid, p->gid) < 0) {
        p->err = errno;
        snprintf(p->errmsg, sizeof p->errmsg, "put: cannot take the workload's uid: %s", strerror(p->err));
    } else {
        p->fd = open_for_put(cstr(hdr, 12), p->mode, &p->err, p->errmsg, sizeof p->errmsg);
    }
    fs_root();
}

static void put_data(const struct frame *f) {
    struct put *p = find_put(f->id);
    if (!p) return; /* refused for want of a slot, or cancelled */
    if (f->len) {
        size_t done = 0;
        while (p->fd >= 0 && !p->err && done < f->len) {
            ssize_t w = write(p->fd, f->data + done, f->len - done);
            if (w < 0) {
                if (errno == EINTR) continue;
                p->err = errno;
                snprintf(p->errmsg, sizeof p->errmsg, "write: %s", strerror(p->err));
                break;
            }
            done += (size_t)w;
        }
        return;
    }
    if (p->fd >= 0) {
        /* the mode as the workload would set it (setuid bits follow its rights) */
        if (!p->err && (fs_as(p->uid, p->gid) < 0 || fchmod(p->fd, p->mode & 07777) < 0)) {
            p->err = errno;
            snprintf(p->errmsg, sizeof p->errmsg, "chmod: %s", strerror(p->err));
        }
        fs_root();
        if (close(p->fd) < 0 && !p->err) {
            p->err = errno;
            snprintf(p->errmsg, sizeof p->errmsg, "close: %s", strerror(p->err));
        }
        p->fd = -1;
    }
    if (p->err)
        send_err(p->id, p->err, "%s", p->errmsg);
    else
        send_frame(T_OK, p->id, NULL, 0);
    put_close(p);
}
struct exec_req {
    uint32_t timeout_ms, output_cap, pids_max, uid, gid, flags, argc, envc;
    char *workdir;
    char **argv, **envp;
};



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

/* Child side: never returns. With a terminal, in_fd is its slave and
 * becomes the controlling terminal of the command's new session. */
static void exec_child(struct exec_req *r, const char *join_cg, int in_fd, int out_fd, int err_fd,
                       int errpipe, int tty) {
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
    if (!e && tty && ioctl(in_fd, TIOCSCTTY, 0) < 0) e = errno;
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

/* Send sig to every process of a group (cg_kill is the atomic SIGKILL). */
static void cg_signal(const char *cg, int sig) {
    char p[128];
    snprintf(p, sizeof p, "%s/cgroup.procs", cg);
    FILE *f = fopen(p, "re");
    if (!f) return;
    int pid;
    while (fscanf(f, "%d", &pid) == 1)
        if (pid > 1) kill(pid, sig);
    fclose(f);
}

static int cg_populated(const char *cg) {
    char p[128];
    snprintf(p, sizeof p, "%s/cgroup.events", cg);
    long long v = keyed(p, "populated");
    return v != 0;
}

/* Groups of ended commands whose leftovers still run: removed once empty
 * (checked when a child is reaped: the leftovers are the agent's orphans). */
static char linger[MAX_LINGER][64];
static int nlinger;

static void cg_release(const char *cg) {
    if (!cg_populated(cg) && rmdir(cg) == 0) return;
    if (nlinger < MAX_LINGER) snprintf(linger[nlinger++], sizeof linger[0], "%s", cg);
}

static void linger_check(void) {
    for (int i = 0; i < nlinger;) {
        if (!cg_populated(linger[i]) && rmdir(linger[i]) == 0) {
            memcpy(linger[i], linger[--nlinger], sizeof linger[0]);
        } else {
            i++;
        }
    }
}

/* Append to out the kernel's OOM lines about this command's group (logged
 * since it started): the oom-kill line naming its cgroup, and the "Killed
 * process" line of that victim. Other commands' OOMs are not its evidence. */
static size_t oom_lines(int kmsg, const char *cg, char *out, size_t cap) {
    size_t o = 0;
    if (kmsg < 0) return 0;
    const char *leaf = strrchr(cg, '/');
    char memcg[64];
    snprintf(memcg, sizeof memcg, "task_memcg=%s,", leaf ? leaf : cg);
    long victims[16];
    int nv = 0;
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
        int keep = 0;
        char *k;
        if (strstr(msg, "oom-kill:") && strstr(msg, memcg)) {
            char *pp = strstr(msg, ",pid=");
            if (pp && nv < 16) victims[nv++] = strtol(pp + 5, NULL, 10);
            keep = 1;
        } else if ((k = strstr(msg, "Killed process "))) {
            long pid = strtol(k + 15, NULL, 10);
            for (int i = 0; i < nv; i++) keep |= victims[i] == pid;
        }
        if (keep) {
            int w = snprintf(out + o, cap - o, "kmsg=%s\n", msg);
            if (w > 0 && (size_t)w < cap - o) o += (size_t)w;
        }
    }
    return o;
}

/* ---- commands ---------------------------------------------------------------------- */
struct exec {
    int used;
    uint32_t id;
    pid_t pid;
    int tty;                  /* out_fd is the pty master; it takes stdin too */
    int out_fd, err_fd, in_fd; /* our ends, -1 once closed */
    unsigned char *sbuf;      /* stdin received, not yet written */
    size_t slen, scap;
    int stdin_eof, eot_sent;  /* the host ended stdin; (tty) the EOF character went */
    uint32_t unacked;         /* stdin bytes consumed and not yet acknowledged */
    int main_done, status, killed, detached;
    uint32_t session; /* of the host that started it */
    const char *why;
    int64_t start, deadline, kill_at, done_at;
    uint64_t nout, nerr, output_cap;
    int trunc_out, trunc_err;
    uint32_t pids_max;
    char cg[64];
    long long oom_before;
    int kmsg;
};
static struct exec execs[MAX_EXECS];

static struct exec *find_exec(uint32_t id) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used && execs[i].id == id) return &execs[i];
    return NULL;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void exec_stop(struct exec *e, const char *why) {
    if (e->killed) return;
    e->why = why;
    e->killed = 1;
    e->kill_at = now_ms();
    cg_kill(e->cg);
}

static void exec_ack(struct exec *e, int force) {
    if (!e->unacked || (!force && e->unacked < ACK_EVERY && e->slen)) return;
    unsigned char b[4];
    put32(b, e->unacked);
    send_frame(T_ACK, e->id, b, 4);
    e->unacked = 0;
}

/* Write what stdin holds; the command closing its end (EPIPE, a pty gone:
 * EIO) drops the rest. Every byte taken is acknowledged. */
static void exec_write_stdin(struct exec *e) {
    int fd = e->tty ? e->out_fd : e->in_fd;
    while (e->slen && fd >= 0) {
        ssize_t w = write(fd, e->sbuf, e->slen);
        if (w > 0) {
            memmove(e->sbuf, e->sbuf + w, e->slen - (size_t)w);
            e->slen -= (size_t)w;
            e->unacked += (uint32_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        e->unacked += (uint32_t)e->slen;
        e->slen = 0;
        e->stdin_eof = e->eot_sent = 1;
        if (!e->tty) close_fd(&e->in_fd);
        break;
    }
    if (!e->slen && e->stdin_eof) {
        if (e->tty && !e->eot_sent && e->out_fd >= 0) {
            /* a terminal's end of input is its EOF character (^D by default) */
            struct termios t;
            char eof = tcgetattr(e->out_fd, &t) == 0 ? (char)t.c_cc[VEOF] : 4;
            if (write(e->out_fd, &eof, 1) == 1 || errno != EAGAIN) e->eot_sent = 1;
        } else if (!e->tty) {
            close_fd(&e->in_fd);
        }
    }
    exec_ack(e, 0);
}

static void exec_stdin(struct exec *e, const unsigned char *data, uint32_t len) {
    if (!len) {
        e->stdin_eof = 1;
    } else if (e->stdin_eof || (e->tty ? e->out_fd : e->in_fd) < 0 || e->slen + len > STDIN_CAP) {
        e->unacked += len; /* nobody reads it: taken and dropped */
    } else {
        if (e->slen + len > e->scap) {
            size_t c = e->scap ? e->scap : 64u * 1024u;
            while (c < e->slen + len) c *= 2;
            unsigned char *nb = realloc(e->sbuf, c);
            if (!nb) die("realloc");
            e->sbuf = nb;
            e->scap = c;
        }
        memcpy(e->sbuf + e->slen, data, len);
        e->slen += len;
    }
    exec_write_stdin(e);
}

static void exec_read(struct exec *e, int err_side) {
    static unsigned char obuf[CHUNK];
    int *fd = err_side ? &e->err_fd : &e->out_fd;
    ssize_t n = read(*fd, obuf, sizeof obuf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) { /* end of output (a pty reads EIO once its last slave is closed) */
        close_fd(fd);
        return;
    }
    uint64_t *cnt = err_side ? &e->nerr : &e->nout;
    int *tr = err_side ? &e->trunc_err : &e->trunc_out;
    size_t send = (size_t)n;
    if (*cnt + send > e->output_cap) {
        send = *cnt < e->output_cap ? (size_t)(e->output_cap - *cnt) : 0;
        *tr = 1;
        exec_stop(e, "output_limit");
    }
    if (send) send_frame(err_side ? T_STDERR : T_STDOUT, e->id, obuf, send);
    *cnt += send;
}

/* The host went away: the command's pipes go with it, its processes run on. */
static void exec_detach(struct exec *e) {
    e->detached = 1;
    close_fd(&e->out_fd);
    close_fd(&e->err_fd);
    close_fd(&e->in_fd);
    e->slen = 0;
}

/* The command is over: EXIT with the evidence read from its group, then
 * its group is removed, now or (leftovers still running) once it empties. */
static void exec_finish(struct exec *e) {
    close_fd(&e->out_fd);
    close_fd(&e->err_fd);
    close_fd(&e->in_fd);
    if (!e->detached) {
        exec_ack(e, 1);
        char p[128], vbuf[64];
        static char out[8192];
        size_t o = 0;
        if (e->main_done && WIFEXITED(e->status))
            o += (size_t)snprintf(out + o, sizeof out - o, "exit_code=%d\n", WEXITSTATUS(e->status));
        if (e->main_done && WIFSIGNALED(e->status))
            o += (size_t)snprintf(out + o, sizeof out - o, "signal=%d\n", WTERMSIG(e->status));
        o += (size_t)snprintf(out + o, sizeof out - o, "reason=%s\nduration_ms=%lld\n", e->why,
                              (long long)(now_ms() - e->start));
        o += (size_t)snprintf(out + o, sizeof out - o, "stdout_truncated=%d\nstderr_truncated=%d\n",
                              e->trunc_out, e->trunc_err);
        snprintf(p, sizeof p, "%s/memory.peak", e->cg);
        if (read_file(p, vbuf, sizeof vbuf) > 0)
            o += (size_t)snprintf(out + o, sizeof out - o, "memory_peak_bytes=%lld\n", strtoll(vbuf, NULL, 10));
        snprintf(p, sizeof p, "%s/memory.events", e->cg);
        o += (size_t)snprintf(out + o, sizeof out - o, "cgroup_oom_kill=%lld\n", keyed(p, "oom_kill"));
        snprintf(p, sizeof p, "%s/pids.events", e->cg);
        o += (size_t)snprintf(out + o, sizeof out - o, "pids_max_hit=%lld\npids_max=%u\n", keyed(p, "max"),
                              e->pids_max);
        long long oom_after = keyed("/proc/vmstat", "oom_kill");
        o += (size_t)snprintf(out + o, sizeof out - o, "oom_kill_before=%lld\noom_kill_after=%lld\n",
                              e->oom_before, oom_after);
        o += (size_t)snprintf(out + o, sizeof out - o, "mem_total_kib=%lld\n", keyed("/proc/meminfo", "MemTotal"));
        if (oom_after > e->oom_before) o += oom_lines(e->kmsg, e->cg, out + o, sizeof out - o);
        send_frame(T_EXIT, e->id, out, o);
    }
    close_fd(&e->kmsg);
    cg_release(e->cg);
    free(e->sbuf);
    memset(e, 0, sizeof *e);
    e->out_fd = e->err_fd = e->in_fd = e->kmsg = -1;
}

/* Deadlines of one command; returns ms until its next one (-1: none). */
static int exec_tick(struct exec *e, int64_t t) {
    if (e->deadline && !e->killed && t >= e->deadline) exec_stop(e, "timeout");
    if (e->main_done) {
        if ((e->out_fd < 0 && e->err_fd < 0) || t >= e->done_at + ORPHAN_GRACE_MS) {
            exec_finish(e);
            return -1;
        }
        return (int)(e->done_at + ORPHAN_GRACE_MS - t);
    }
    if (e->killed) {
        if (t >= e->kill_at + KILL_GIVE_UP_MS) { /* its main process is reaped whenever it goes */
            exec_finish(e);
            return -1;
        }
        return (int)(e->kill_at + KILL_GIVE_UP_MS - t);
    }
    return e->deadline ? (int)(e->deadline - t) : -1;
}

/* A pseudo-terminal from the root's devpts instance: the master (ours) and
 * its slave, owned by the command's user as a login terminal is. */
static int open_pty(int *master, int *slave, uint32_t uid, uint32_t gid) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/dev/pts/ptmx", ROOT);
    int m = open(p, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (m < 0) return -1;
    int unlock = 0, s = -1;
    if (ioctl(m, TIOCSPTLCK, &unlock) == 0) {
        s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (s < 0) {
            unsigned n;
            if (ioctl(m, TIOCGPTN, &n) == 0) {
                snprintf(p, sizeof p, "%s/dev/pts/%u", ROOT, n);
                s = open(p, O_RDWR | O_NOCTTY | O_CLOEXEC);
            }
        }
    }
    if (s < 0) {
        int saved = errno;
        close(m);
        errno = saved;
        return -1;
    }
    if (fchown(s, uid, gid) < 0 || fchmod(s, 0620) < 0) { /* best effort: the fds work regardless */
    }
    struct winsize ws = {24, 80, 0, 0};
    ioctl(m, TIOCSWINSZ, &ws);
    *master = m;
    *slave = s;
    return 0;
}

static void exec_start(const struct frame *f) {
    uint32_t id = f->id;
    struct exec_req r;
    memset(&r, 0, sizeof r);
    int inp[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1}, ep[2] = {-1, -1};
    int devnull = -1, master = -1, slave = -1, kmsg = -1;
    struct exec *e = NULL;
    char cg[64];
    int cgfd = -1;
    if (find_exec(id)) {
        send_err(id, EEXIST, "exec: a command with id %u runs already", id);
        return;
    }
    for (int i = 0; i < MAX_EXECS && !e; i++)
        if (!execs[i].used) e = &execs[i];
    if (!e) {
        send_err(id, EAGAIN, "exec: %d commands are running already", MAX_EXECS);
        return;
    }
    if (parse_exec(f, &r) < 0) {
        send_err(id, EINVAL, "exec: malformed request");
        goto out;
    }
    int tty = (r.flags & F_TTY) != 0;
    prepare_cg();
    if (next_cg_fd < 0) {
        send_err(id, errno, "mkdir %s: %s", next_cg, strerror(errno));
        goto out;
    }
    snprintf(cg, sizeof cg, "%s", next_cg);
    cgfd = next_cg_fd;
    next_cg_fd = -1;
    if (r.pids_max) {
        char p[128], v[32];
        snprintf(p, sizeof p, "%s/pids.max", cg);
        snprintf(v, sizeof v, "%u", r.pids_max);
        write_file(p, v);
    }
    if (tty) {
        if (open_pty(&master, &slave, r.uid, r.gid) < 0) {
            send_err(id, errno, "cannot open a pseudo-terminal: %s", strerror(errno));
            goto fail;
        }
    } else {
        if (r.flags & F_STDIN) {
            if (pipe2(inp, O_CLOEXEC) < 0) die("pipe");
        } else {
            devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
        }
        if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0) die("pipe");
    }
    if (pipe2(ep, O_CLOEXEC) < 0) die("pipe");
    long long oom_before = keyed("/proc/vmstat", "oom_kill");
    kmsg = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (kmsg >= 0) lseek(kmsg, 0, SEEK_END);
    int64_t start = now_ms();
    int joined = 0;
    pid_t pid = fork_into(cgfd, &joined);
    if (pid < 0) {
        send_err(id, errno, "fork: %s", strerror(errno));
        goto fail;
    }
    if (pid == 0) {
        if (tty)
            exec_child(&r, joined ? NULL : cg, slave, slave, slave, ep[1], 1);
        exec_child(&r, joined ? NULL : cg, (r.flags & F_STDIN) ? inp[0] : devnull, outp[1], errp[1], ep[1], 0);
    }
    close_fd(&ep[1]);
    close_fd(&slave);
    close_fd(&outp[1]);
    close_fd(&errp[1]);
    close_fd(&inp[0]);
    close_fd(&devnull);
    int32_t code[2];
    ssize_t en = read(ep[0], code, sizeof code);
    close_fd(&ep[0]);
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
        goto fail;
    }
    memset(e, 0, sizeof *e);
    e->used = 1;
    e->id = id;
    e->pid = pid;
    e->tty = tty;
    e->out_fd = tty ? master : outp[0];
    e->err_fd = errp[0];
    e->in_fd = inp[1];
    e->stdin_eof = !tty && !(r.flags & F_STDIN);
    e->why = "exited";
    e->session = session;
    e->start = start;
    e->deadline = r.timeout_ms ? start + r.timeout_ms : 0;
    e->output_cap = r.output_cap;
    e->pids_max = r.pids_max;
    snprintf(e->cg, sizeof e->cg, "%s", cg);
    e->oom_before = oom_before;
    e->kmsg = kmsg;
    for (int *fd = &e->out_fd; fd <= &e->in_fd; fd++)
        if (*fd >= 0) fcntl(*fd, F_SETFL, fcntl(*fd, F_GETFL) | O_NONBLOCK);
    close(cgfd);
    unsigned char b[4];
    put32(b, (uint32_t)pid);
    send_frame(T_STARTED, id, b, 4);
    free(r.argv);
    free(r.envp);
    return;
fail:
    for (int *fd = inp; fd < inp + 2; fd++) close_fd(fd);
    for (int *fd = outp; fd < outp + 2; fd++) close_fd(fd);
    for (int *fd = errp; fd < errp + 2; fd++) close_fd(fd);
    for (int *fd = ep; fd < ep + 2; fd++) close_fd(fd);
    close_fd(&devnull);
    close_fd(&master);
    close_fd(&slave);
    close_fd(&kmsg);
    if (cgfd >= 0) close(cgfd);
    rmdir(cg);
out:
    free(r.argv);
    free(r.envp);
}

static void do_kill(const struct frame *f) {
    uint32_t sig = f->len >= 4 ? get32(f->data) : SIGKILL;
    uint32_t flags = f->len >= 8 ? get32(f->data + 4) : 0;
    struct exec *e = find_exec(f->id);
    if (e) {
        if (flags & KILL_DEADLINE) {
            exec_stop(e, "killed");
        } else if (sig == SIGKILL) {
            if (!e->killed) {
                e->killed = 1;
                e->kill_at = now_ms();
            }
            cg_kill(e->cg);
        } else if (sig > 0 && sig < 65) {
            cg_signal(e->cg, (int)sig);
        }
        return;
    }
    for (int i = 0; i < MAX_STREAMS; i++) {
        if (streams[i].used && streams[i].id == f->id) {
            send_err(f->id, ECANCELED, "cancelled by the host");
            stream_close(&streams[i]);
            return;
        }
    }
    struct put *p = find_put(f->id);
    if (p) {
        send_err(f->id, ECANCELED, "put: cancelled by the host");
        put_close(p);
    }
}

static void do_resize(const struct frame *f) {
    struct exec *e = find_exec(f->id);
    if (!e || !e->tty || e->out_fd < 0 || f->len < 8) return;
    uint32_t rows = get32(f->data), cols = get32(f->data + 4);
    struct winsize ws = {(unsigned short)(rows > 0xffff ? 0xffff : rows),
                         (unsigned short)(cols > 0xffff ? 0xffff : cols), 0, 0};
    ioctl(e->out_fd, TIOCSWINSZ, &ws);
}

/* Reap children: a command's main process ends its wait; anything else is an
 * orphan the agent inherited as PID 1 (a command's leftover) and is let go. */
static void reap(void) {
    int st;
    pid_t w;
    while ((w = waitpid(-1, &st, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec *e = &execs[i];
            if (e->used && !e->main_done && e->pid == w) {
                e->status = st;
                e->main_done = 1;
                e->done_at = now_ms();
            }
        }
    }
    linger_check();
}

/* ---- PROCS: what runs in the guest -------------------------------------------------- */
/* OK payload: u32 count, u32 truncated, then per process: u32 pid, u32 ppid,
 * u32 uid, u8 state, u32 len, len bytes of command line (NUL separated).
 * Kernel threads and the agent itself are left out; at most the host's cap
 * (and never more than a frame) is sent. */
static void do_procs(const struct frame *f) {
    static unsigned char out[MAX_FRAME];
    static char cmd[PROC_CMDLINE_MAX];
    size_t cap = MAX_FRAME - 64;
    if (f->len >= 4 && get32(f->data) < cap) cap = get32(f->data);
    if (cap < 8) cap = 8;
    DIR *d = opendir("/proc");
    if (!d) {
        send_err(f->id, errno, "opendir /proc: %s", strerror(errno));
        return;
    }
    size_t o = 8;
    uint32_t n = 0, truncated = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);
        if (*end || pid <= 1) continue;
        char p[64], st[1024];
        snprintf(p, sizeof p, "/proc/%ld/stat", pid);
        if (read_file(p, st, sizeof st) <= 0) continue;
        char *rp = strrchr(st, ')');
        char state;
        int ppid;
        unsigned long flags;
        if (!rp || sscanf(rp + 1, " %c %d %*d %*d %*d %*d %lu", &state, &ppid, &flags) != 3) continue;
        if (flags & 0x00200000ul) continue; /* PF_KTHREAD */
        snprintf(p, sizeof p, "/proc/%ld/status", pid);
        long long uid = keyed(p, "Uid");
        snprintf(p, sizeof p, "/proc/%ld/cmdline", pid);
        size_t len = 0;
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t r;
            while (len < sizeof cmd && (r = read(fd, cmd + len, sizeof cmd - len)) > 0) len += (size_t)r;
            close(fd);
        }
        if (o + 17 + len > cap) {
            truncated = 1;
            break;
        }
        put32(out + o, (uint32_t)pid);
        put32(out + o + 4, (uint32_t)ppid);
        put32(out + o + 8, (uint32_t)(uid < 0 ? 0 : uid));
        out[o + 12] = (unsigned char)state;
        put32(out + o + 13, (uint32_t)len);
        memcpy(out + o + 17, cmd, len);
        o += 17 + len;
        n++;
    }
    closedir(d);
    put32(out, n);
    put32(out + 4, truncated);
    send_frame(T_OK, f->id, out, o);
}
/* ---- start-up ------------------------------------------------------------------ */
/*
 * As /init of the initramfs (PID 1, no arguments) the agent first sets the
 * guest up, with plain syscalls (a shell would fork ~20 busybox processes,
 * ~0.15 s under TCG):
 *   - load the modules listed in /etc/tierbox-modules, in order (virtio-mmio,
 *     virtio-console, virtio-rng, overlay; virtio-blk when a disk is attached,
 *     virtio-net when the machine has a NIC);
 *   - mount the root disk /dev/vda (ext4, read-only) or use /rootfs (busybox)
 *     as the lower layer, a tmpfs as the upper, overlayfs at /newroot;
 *   - give /newroot proc, sysfs, devtmpfs, devpts, /dev/shm; loopback up.
 * Kernel command line knobs: tierbox.disk=0|1, tierbox.net=0|1, tierbox.rw_mib=N (size cap of
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

static void load_modules(int disk, int net) {
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
            if (!strcmp(flag, "net") && !net) continue;
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
    long net = cmdline_knob(cmdline, "tierbox.net", 0);
    init_debug = (int)cmdline_knob(cmdline, "tierbox.debug", 0);
    step("init");
    load_modules((int)disk, (int)net);
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


/* ---- the loop ------------------------------------------------------------------ */
static void do_poweroff(const struct frame *f) {
    send_frame(T_OK, f->id, NULL, 0);
    for (int i = 0; i < 20 && host_up && oq_pending(); i++) { /* the answer first, briefly */
        struct pollfd p = {port, POLLOUT, 0};
        poll(&p, 1, 50);
        flush_port();
    }
    sync();
    reboot(RB_POWER_OFF);
}

/* A host connected (SESSION is the first frame on every connection). What
 * is queued was for the hosts before, and so are the commands, transfers
 * and uploads still open: their pipes close (stdin ends, output pipes break)
 * and their processes run on. Done here rather than when the port reads as
 * disconnected: a host's first frames can be read before the guest has
 * seen the previous one leave, so only the new host's own word tells which
 * frames are whose. */
static void new_session(void) {
    session++;
    oq_off = oq_len = 0;
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used && execs[i].session != session) exec_detach(&execs[i]);
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].used) stream_close(&streams[i]);
    for (int i = 0; i < MAX_PUTS; i++)
        if (puts_[i].used) put_close(&puts_[i]);
}

/* Whether a host is connected, and what it sent. While none is, the port
 * reads as end of file and polls as hung up (so it is not polled then); the
 * kernel sends SIGIO when one connects. */
static void port_check(void) {
    struct pollfd p = {port, POLLIN | POLLOUT, 0};
    if (poll(&p, 1, 0) < 0) return;
    host_up = !(p.revents & POLLHUP);
    if (p.revents & POLLIN) read_port();
}

static void dispatch(const struct frame *f) {
    struct exec *e;
    switch (f->type) {
    case T_HELLO: do_hello(f); break;
    case T_EXEC: exec_start(f); break;
    case T_STDIN:
        if ((e = find_exec(f->id))) exec_stdin(e, f->data, f->len);
        break; /* else: a command that ended already */
    case T_KILL: do_kill(f); break;
    case T_RESIZE: do_resize(f); break;
    case T_PUT: put_start(f); break;
    case T_DATA_IN: put_data(f); break;
    case T_GET: stream_start(f, 0); break;
    case T_LIST: stream_start(f, 1); break;
    case T_STATS: do_stats(f); break;
    case T_SYNC: do_sync(f); break;
    case T_PROCS: do_procs(f); break;
    case T_POWEROFF: do_poweroff(f); break;
    case T_SESSION: new_session(); break;
    case T_NET: do_net(f); break;
    default: send_err(f->id, ENOSYS, "unknown request type %u", f->type);
    }
}

#define MAX_POLL (2 + 3 * MAX_EXECS)

static void serve(int sigfd) {
    static struct pollfd p[MAX_POLL];
    static struct exec *who[MAX_POLL];
    static int role[MAX_POLL]; /* 0 stdout (or pty), 1 stderr, 2 stdin */
    port_check();
    for (;;) {
        struct frame f;
        while (try_frame(&f)) dispatch(&f);
        int room = host_up && oq_pending() < OUTQ_HIGH;
        int busy_streams = 0;
        for (int i = 0; i < MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (!s->used) continue;
            if (room) {
                if (s->list)
                    list_step(s);
                else
                    get_step(s);
            }
            busy_streams |= s->used;
        }
        int64_t t = now_ms();
        int wait = -1;
        for (int i = 0; i < MAX_EXECS; i++) {
            if (!execs[i].used) continue;
            int w = exec_tick(&execs[i], t);
            if (w >= 0 && (wait < 0 || w < wait)) wait = w;
        }
        prepare_cg();
        flush_port();
        room = host_up && oq_pending() < OUTQ_HIGH;
        if (busy_streams && room) wait = 0;
        int np = 0;
        p[np].fd = sigfd;
        p[np].events = POLLIN;
        np++;
        int i_port = -1;
        if (host_up) {
            p[np].fd = port;
            p[np].events = (short)((ilen - ipos < icap - CHUNK ? POLLIN : 0) | (oq_pending() ? POLLOUT : 0));
            i_port = np++;
        } else if (wait < 0 || wait > 200) {
            wait = 200; /* look for a host now and then, should a SIGIO be missed */
        }
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec *e = &execs[i];
            if (!e->used) continue;
            int fds[3] = {e->out_fd, e->err_fd, e->in_fd};
            for (int k = 0; k < 3; k++) {
                if (fds[k] < 0) continue;
                short ev = 0;
                if (k < 2 && room) ev |= POLLIN;
                if ((k == 2 || (k == 0 && e->tty)) && e->slen) ev |= POLLOUT;
                if (!ev) continue;
                p[np].fd = fds[k];
                p[np].events = ev;
                who[np] = e;
                role[np] = k;
                np++;
            }
        }
        int pr = poll(p, (nfds_t)np, wait);
        if (pr < 0 && errno != EINTR) die("poll");
        if (pr <= 0) {
            if (!host_up) port_check();
            continue;
        }
        if (p[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sigfd, &si, sizeof si) > 0) {
            }
            reap();
            if (!host_up) port_check();
        }
        if (i_port >= 0 && (p[i_port].revents & (POLLIN | POLLHUP | POLLERR))) read_port();
        if (i_port >= 0 && host_up && (p[i_port].revents & POLLOUT)) flush_port();
        for (int k = 2; k < np; k++) {
            if (k == i_port || !p[k].revents) continue;
            struct exec *e = who[k];
            if (!e->used) continue;
            if (role[k] < 2 && (p[k].revents & (POLLIN | POLLHUP | POLLERR)) &&
                (role[k] == 0 ? e->out_fd : e->err_fd) == p[k].fd)
                exec_read(e, role[k]);
            if ((role[k] == 2 || (role[k] == 0 && e->tty)) && (p[k].revents & (POLLOUT | POLLERR | POLLHUP)) && e->slen)
                exec_write_stdin(e);
        }
    }
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
    /* the port raises SIGIO when a host connects (see port_check) */
    fcntl(port, F_SETOWN, getpid());
    fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC | O_NONBLOCK);
    int sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0) die("signalfd");
    for (int i = 0; i < MAX_EXECS; i++) execs[i].out_fd = execs[i].err_fd = execs[i].in_fd = execs[i].kmsg = -1;
    for (int i = 0; i < MAX_STREAMS; i++) streams[i].fd = -1;
    for (int i = 0; i < MAX_PUTS; i++) puts_[i].fd = -1;
    fprintf(stderr, "tierbox-agent: ready on " PORT_NAME "\n");
    serve(sigfd);
}
