/*
 * takeover-probe: the kernel facts a chargefs takeover relies on, measured on the running kernel.
 * The evidence behind docs/takeover.md; asserted by scripts/tests/takeover-kernel.sh.
 *
 * Three roles, one binary:
 *   the orchestrator (main): makes a memfd for the state, starts the keeper, then acts as the
 *     callers (stat, read, write on the mount, each blocking call in a child so it can be timed)
 *     and kills servers with SIGKILL. It never holds /dev/fuse (except one pidfd_getfd copy that
 *     it closes at once).
 *   the keeper: holds the /dev/fuse file it received from the first server over SCM_RIGHTS and
 *     the memfd; when its server dies it fork+execs a successor (this binary, --serve).
 *   a server (--serve): a libfuse 3.14 low-level session on custom I/O hooks. The first one opens
 *     /dev/fuse, mounts with mount(2), saves the INIT request into the memfd and passes the fd to
 *     the keeper. A successor replays the saved INIT into its fresh session through
 *     fuse_session_process_buf, drops the reply in the writev hook, optionally writes
 *     FUSE_NOTIFY_RESEND, and serves the kernel's existing node ids. File contents and sizes live
 *     in the memfd, so they outlive every server.
 * Files: /hello (ino 2, read-write, 4 KiB max), /slow (ino 3: a server sleeps on a READ of it
 * when the orchestrator arms it, so a request is in flight when it is killed) and /new (ino 4,
 * made by CREATE; when armed, the server applies the create, then sleeps before answering).
 * Entry and attribute timeouts are 0 and files are direct_io, so every call reaches a server.
 *
 * Output: one line per fact, "FACT <name> <ok|FAIL|NA> <figures>"; exit 0 when no FAIL.
 * Everything is bounded: a 90 s alarm, 5-10 s waits; on any exit the mount is detached and every
 * process this probe started is killed by pid.
 *
 * Usage: takeover-probe MOUNTPOINT [KILLS]      (root; KILLS default 20)
 *        takeover-probe --state-cost [N]         (no mount: what keeping metadata in a memfd costs
 *                                                 per update, three layouts, N updates each)
 * Build: gcc -O2 -Wall -o takeover-probe scripts/bench/takeover-probe.c $(pkg-config --cflags --libs fuse3)
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <linux/kcmp.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Newer than the 7.38 header installed here (values from the kernel's include/uapi/linux/fuse.h). */
#define NOTIFY_RESEND 7
#define HAS_RESEND (1ULL << 39)
#define UNIQUE_RESEND (1ULL << 63)
#define OVER_IO_URING (1ULL << 41)   /* offered in INIT only while /sys/module/fuse/parameters/enable_uring is Y */

#define DATA_MAX 4096
struct state {                   /* lives in the memfd: outlives every server */
    unsigned char init[512];     /* the INIT request as the kernel sent it */
    int init_len;
    int devfd_in_keeper;         /* the fd number of /dev/fuse in the keeper */
    pid_t keeper, server;
    int generation;              /* 0 = first server */
    int ready_generation;        /* set by a server once it serves */
    double ready_at;             /* CLOCK_MONOTONIC seconds */
    int hold;                    /* keeper: do not start a successor while set */
    int want_resend;             /* successor: write FUSE_NOTIFY_RESEND after INIT replay */
    int use_clone;               /* next server serves on a FUSE_DEV_IOC_CLONE fd */
    int slow_armed, slow_reading;
    unsigned long long resent_seen; /* requests with bit 63 of unique that a server saw */
    int new_exists;              /* /new (ino 4) was created */
    int create_armed, create_applied; /* the server sleeps after applying a CREATE, before answering */
    int use_slot;                /* a server answers a resent CREATE it finds in the slot from it */
    unsigned long long slot_unique; /* the in-flight slot: unique of the CREATE applied, not answered */
    int size;
    unsigned char data[DATA_MAX];
};
static struct state *S;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* ---------------------------------------------------------------- server */
static int serve_fd = -1, drop_replies;
static uint64_t cur_unique;   /* the request being handled (one thread per server here) */

static ssize_t hook_read(int fd, void *buf, size_t len, void *u) {
    (void)u;
    ssize_t n = read(fd, buf, len);
    if (n >= (ssize_t)sizeof(struct fuse_in_header)) {
        struct fuse_in_header *h = buf;
        if (h->opcode == FUSE_INIT && n <= (ssize_t)sizeof S->init) { memcpy(S->init, buf, (size_t)n); S->init_len = (int)n; }
        cur_unique = h->unique;
        if (h->unique & UNIQUE_RESEND) __atomic_add_fetch(&S->resent_seen, 1, __ATOMIC_SEQ_CST);
    }
    return n;
}
static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *u) {
    (void)u;
    if (drop_replies) { size_t t = 0; for (int i = 0; i < count; i++) t += iov[i].iov_len; return (ssize_t)t; }
    return writev(fd, iov, count);
}
static void fill(struct stat *st, fuse_ino_t ino) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino; st->st_nlink = 1;
    st->st_mode = ino == 1 ? S_IFDIR | 0755 : S_IFREG | 0644;
    st->st_size = ino == 2 ? S->size : ino == 3 ? 9 : 0;
}
static void reply_new(fuse_req_t r, struct fuse_file_info *fi) {
    struct fuse_entry_param e; memset(&e, 0, sizeof e);
    e.ino = 4; e.generation = 1; fill(&e.attr, 4);
    fi->direct_io = 1; fi->fh = 1004;
    fuse_reply_create(r, &e, fi);
}
/* CREATE is not idempotent: applied twice, O_EXCL answers EEXIST for the caller's own file. The
 * slot (the unique of a create applied and not yet answered, kept in the memfd) lets a successor
 * recognise a resent request it already applied and answer it as the first time. */
static void op_create(fuse_req_t r, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
    (void)mode;
    uint64_t u = cur_unique & ~UNIQUE_RESEND;
    if (parent != 1 || strcmp(name, "new")) { fuse_reply_err(r, EACCES); return; }
    if (S->new_exists) {
        if (S->use_slot && S->slot_unique == u) { reply_new(r, fi); S->slot_unique = 0; return; }
        fuse_reply_err(r, EEXIST); return;
    }
    S->slot_unique = u;                       /* recorded with the change, before it is visible */
    __atomic_store_n(&S->new_exists, 1, __ATOMIC_RELEASE);
    if (S->create_armed) { S->create_applied = 1; sleep(60); }   /* killed here */
    reply_new(r, fi);
    S->slot_unique = 0;
}
static void op_lookup(fuse_req_t r, fuse_ino_t parent, const char *name) {
    struct fuse_entry_param e; memset(&e, 0, sizeof e);
    fuse_ino_t ino = parent != 1 ? 0 : !strcmp(name, "hello") ? 2 : !strcmp(name, "slow") ? 3 : !strcmp(name, "new") && S->new_exists ? 4 : 0;
    if (!ino) { fuse_reply_err(r, ENOENT); return; }
    e.ino = ino; e.generation = 1; fill(&e.attr, ino);
    fuse_reply_entry(r, &e);
}
static void op_getattr(fuse_req_t r, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi; struct stat st;
    if (ino > 4 || (ino == 4 && !S->new_exists)) { fuse_reply_err(r, ENOENT); return; }   /* a node id this filesystem never made */
    fill(&st, ino); fuse_reply_attr(r, &st, 0);
}
static void op_open(fuse_req_t r, fuse_ino_t ino, struct fuse_file_info *fi) {
    fi->direct_io = 1; fi->fh = 1000 + ino; fuse_reply_open(r, fi);
}
static void op_read(fuse_req_t r, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    if (fi->fh != 1000 + ino) { fuse_reply_err(r, EBADF); return; }  /* the kernel's fh is what we set */
    if (ino == 3) {
        if (S->slow_armed) { S->slow_reading = 1; sleep(60); }   /* killed here */
        fuse_reply_buf(r, "slow-data" + (off < 9 ? off : 9), off < 9 ? (size_t)(9 - off) < size ? (size_t)(9 - off) : size : 0);
        return;
    }
    size_t n = off < S->size ? (size_t)(S->size - off) : 0;
    fuse_reply_buf(r, (const char *)S->data + off, n < size ? n : size);
}
static void op_write(fuse_req_t r, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    if (ino != 2 || fi->fh != 1002 || off < 0 || off + (off_t)size > DATA_MAX) { fuse_reply_err(r, ino != 2 ? EACCES : EFBIG); return; }
    memcpy(S->data + off, buf, size);
    if (off + (off_t)size > S->size) S->size = (int)(off + (off_t)size);
    fuse_reply_write(r, size);
}
static void op_ok(fuse_req_t r, fuse_ino_t ino, struct fuse_file_info *fi) { (void)ino; (void)fi; fuse_reply_err(r, 0); }

static int send_fd(int sock, int fd) {
    char c = 'f', ctl[CMSG_SPACE(sizeof(int))];
    struct iovec io = { &c, 1 };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl };
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS; cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    return sendmsg(sock, &m, 0) == 1 ? 0 : -1;
}
static int recv_fd(int sock) {
    char c, ctl[CMSG_SPACE(sizeof(int))];
    struct iovec io = { &c, 1 };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl };
    if (recvmsg(sock, &m, 0) != 1) return -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    if (!cm || cm->cmsg_type != SCM_RIGHTS) return -1;
    int fd; memcpy(&fd, CMSG_DATA(cm), sizeof fd); return fd;
}

/* --serve DEVFD MEMFD SOCK MOUNTPOINT: DEVFD -1 means the first server (open, mount, hand over). */
static int serve(int devfd, int memfd, int sock, const char *mnt) {
    S = mmap(NULL, sizeof *S, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (S == MAP_FAILED) return 2;
    /* No PR_SET_PDEATHSIG here: a server must outlive its keeper (fact both_dead). If the probe
     * dies uncleanly, the detached mount gives the server ENODEV and its loop ends. */
    int first = devfd < 0;
    if (first) {
        devfd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
        if (devfd < 0) { perror("takeover-probe: /dev/fuse"); return 2; }
        char opts[128];
        snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", devfd);
        if (mount("takeover-probe", mnt, "fuse.takeover-probe", MS_NOSUID | MS_NODEV, opts) != 0) { perror("takeover-probe: mount"); return 2; }
        if (send_fd(sock, devfd) != 0) return 2;
    }
    serve_fd = devfd;
    if (S->use_clone) {   /* serve on a cloned device file: a second struct file of the same connection */
        int c = open("/dev/fuse", O_RDWR | O_CLOEXEC);
        uint32_t src = (uint32_t)devfd;
        if (c < 0 || ioctl(c, FUSE_DEV_IOC_CLONE, &src) != 0) { perror("takeover-probe: FUSE_DEV_IOC_CLONE"); return 2; }
        serve_fd = c;
    }
    struct fuse_lowlevel_ops ops; memset(&ops, 0, sizeof ops);
    ops.lookup = op_lookup; ops.getattr = op_getattr; ops.open = op_open; ops.read = op_read;
    ops.write = op_write; ops.create = op_create; ops.flush = op_ok; ops.release = op_ok;
    char *av[] = { "takeover-probe", NULL };
    struct fuse_args args = FUSE_ARGS_INIT(1, av);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    struct fuse_custom_io io; memset(&io, 0, sizeof io);
    io.read = hook_read; io.writev = hook_writev;
    if (!se || fuse_session_custom_io(se, &io, serve_fd) != 0) return 2;
    if (!first) {
        /* The successor never sees INIT: replay the saved one, drop libfuse's reply. */
        if (S->init_len <= 0) return 2;
        struct fuse_buf b = { .size = (size_t)S->init_len, .mem = S->init, .fd = -1 };
        drop_replies = 1; fuse_session_process_buf(se, &b); drop_replies = 0;
        if (S->want_resend) {
            struct fuse_out_header h = { .len = sizeof h, .error = NOTIFY_RESEND, .unique = 0 };
            if (write(serve_fd, &h, sizeof h) != sizeof h) fprintf(stderr, "takeover-probe: FUSE_NOTIFY_RESEND: %s\n", strerror(errno));
        }
    }
    S->server = getpid();
    S->ready_at = now();
    __atomic_store_n(&S->ready_generation, S->generation, __ATOMIC_SEQ_CST);
    fuse_session_loop(se);
    return 0;
}

/* ---------------------------------------------------------------- keeper */
static pid_t spawn_server(int devfd, int memfd, int sock, const char *mnt) {
    pid_t p = fork();
    if (p == 0) {
        char a[4][16];
        snprintf(a[0], 16, "%d", devfd); snprintf(a[1], 16, "%d", memfd); snprintf(a[2], 16, "%d", sock);
        execl("/proc/self/exe", "takeover-probe", "--serve", a[0], a[1], a[2], mnt, (char *)NULL);
        _exit(127);
    }
    return p;
}
static int keeper(int memfd, const char *mnt) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 2;
    pid_t server = spawn_server(-1, memfd, sv[1], mnt);
    int devfd = recv_fd(sv[0]);
    if (devfd < 0) { fprintf(stderr, "takeover-probe: keeper got no /dev/fuse fd\n"); kill(server, SIGKILL); return 2; }
    close(sv[1]);
    S->devfd_in_keeper = devfd;
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, 0);
        if (p < 0 && errno == ECHILD) { pause(); continue; }
        if (p != server) continue;
        while (__atomic_load_n(&S->hold, __ATOMIC_SEQ_CST)) usleep(1000);
        S->generation++;
        server = spawn_server(devfd, memfd, -1, mnt);
    }
}

/* ---------------------------------------------------------------- orchestrator */
static const char *MNT;
static pid_t keeper_pid, callers[8];
static int ncallers, failures;

static void cleanup(void) {
    for (int i = 0; i < ncallers; i++) if (callers[i] > 0) kill(callers[i], SIGKILL);
    if (S && S->server > 0) kill(S->server, SIGKILL);
    if (keeper_pid > 0) kill(keeper_pid, SIGKILL);
    umount2(MNT, MNT_DETACH);
    while (waitpid(-1, NULL, WNOHANG) > 0) {}
}
static void on_alarm(int sig) { (void)sig; static const char m[] = "FACT timeout FAIL the probe ran past its 90 s alarm\n"; write(1, m, sizeof m - 1); cleanup(); _exit(3); }

static void fact(int ok, const char *name, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    printf("FACT %s %s ", name, ok > 0 ? "ok" : ok == 0 ? "FAIL" : "NA");
    vprintf(fmt, ap); printf("\n"); fflush(stdout);
    va_end(ap);
    if (ok == 0) failures++;
}
static char path_hello[4096], path_slow[4096], path_new[4096];

/* A caller in a child: returns its pid; the exit code says what it saw (0 ok, else errno). */
enum { OP_STAT, OP_READ_SLOW, OP_CREATE_EXCL };
static pid_t caller(int op) {
    pid_t p = fork();
    if (p == 0) {
        if (op == OP_STAT) { struct stat st; _exit(stat(path_hello, &st) == 0 ? 0 : errno); }
        if (op == OP_CREATE_EXCL) { int f = open(path_new, O_CREAT | O_EXCL | O_RDWR, 0644); _exit(f >= 0 ? 0 : errno); }
        int fd = open(path_slow, O_RDONLY);
        if (fd < 0) _exit(errno);
        char b[32]; ssize_t n = read(fd, b, sizeof b);
        _exit(n == 9 && !memcmp(b, "slow-data", 9) ? 0 : n < 0 ? errno : 200);
    }
    callers[ncallers++ % 8] = p;
    return p;
}
/* Waits up to ms for pid; returns its exit code, or -1 when it is still running. */
static int wait_for(pid_t pid, int ms) {
    for (int i = 0; i < ms; i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        usleep(1000);
    }
    return -1;
}
static int wait_ready(int gen, int ms) {
    for (int i = 0; i < ms; i++) { if (__atomic_load_n(&S->ready_generation, __ATOMIC_SEQ_CST) == gen && S->server > 0) return 1; usleep(1000); }
    return 0;
}
static int wait_flag(int *f, int ms) { for (int i = 0; i < ms; i++) { if (__atomic_load_n(f, __ATOMIC_SEQ_CST)) return 1; usleep(1000); } return 0; }
/* Kills the serving process with SIGKILL and returns the generation its successor will have. */
static int kill_server(void) { int g = S->generation + 1; pid_t p = S->server; S->server = 0; kill(p, SIGKILL); return g; }

/* Writes FUSE_NOTIFY_RESEND on a copy of the keeper's /dev/fuse taken with pidfd_getfd. */
static int resend_via_pidfd(int *same_file) {
    int pidfd = (int)syscall(SYS_pidfd_open, keeper_pid, 0);
    int fd = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, S->devfd_in_keeper, 0);
    if (fd < 0) { if (pidfd >= 0) close(pidfd); return -errno; }
    *same_file = syscall(SYS_kcmp, getpid(), keeper_pid, KCMP_FILE, fd, S->devfd_in_keeper) == 0;
    struct fuse_out_header h = { .len = sizeof h, .error = NOTIFY_RESEND, .unique = 0 };
    int r = write(fd, &h, sizeof h) == sizeof h ? 0 : -errno;
    close(fd); close(pidfd);
    return r;
}

/* What a metadata update costs when the state must outlive the process, per layout:
 * in place (a 64-byte record in a MAP_SHARED memfd, guarded by a sequence word so a successor can
 * see a half-done update), an append-only journal in a mapped memfd (a 64-byte record and a
 * release-store of the tail), and the same journal written with pwrite (a syscall per record). */
struct rec { uint64_t seq, op, ino, a, b, c, d, e; };
static int state_cost(long n) {
    size_t cap = (size_t)n * sizeof(struct rec) + 4096;
    int fd = memfd_create("takeover-probe-journal", 0);
    if (fd < 0 || ftruncate(fd, (off_t)cap) != 0) return 2;
    unsigned char *m = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) return 2;
    memset(m, 0, cap);   /* pages in place first: the cost measured is the update, not the fault */
    struct rec *table = (struct rec *)m, r = { 0 };
    double t0 = now();
    for (long i = 0; i < n; i++) {   /* in place: seq odd while writing, even when done */
        struct rec *x = &table[(i * 7919) % 65536];
        __atomic_store_n(&x->seq, x->seq + 1, __ATOMIC_RELEASE);
        x->op = 1; x->ino = (uint64_t)i; x->a = (uint64_t)i; x->b = 0644;
        __atomic_store_n(&x->seq, x->seq + 1, __ATOMIC_RELEASE);
    }
    double inplace = (now() - t0) / (double)n * 1e9;
    uint64_t *tail = (uint64_t *)m;
    struct rec *log = (struct rec *)(m + 64);
    t0 = now();
    for (long i = 0; i < n; i++) {
        r.seq = (uint64_t)i; r.op = 2; r.ino = (uint64_t)i;
        log[i] = r;
        __atomic_store_n(tail, (uint64_t)i + 1, __ATOMIC_RELEASE);
    }
    double mapped = (now() - t0) / (double)n * 1e9;
    t0 = now();   /* a successor's replay reads every record once (applying them costs more) */
    uint64_t sum = 0, end = __atomic_load_n(tail, __ATOMIC_ACQUIRE);
    for (uint64_t i = 0; i < end; i++) sum += log[i].seq ^ log[i].ino;
    double scan_ms = (now() - t0) * 1e3;
    t0 = now();
    long w = n < 1000000 ? n : 1000000;
    for (long i = 0; i < w; i++) {
        r.seq = (uint64_t)i;
        if (pwrite(fd, &r, sizeof r, (off_t)(64 + (size_t)i * sizeof r)) != sizeof r) return 2;
    }
    double syscall_ns = (now() - t0) / (double)w * 1e9;
    printf("STATE in_place_ns %.1f journal_mmap_ns %.1f journal_pwrite_ns %.1f journal_scan_ms %.1f records %ld record_bytes %zu (check %llu)\n",
           inplace, mapped, syscall_ns, scan_ms, n, sizeof r, (unsigned long long)(sum & 1));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "--state-cost")) {
        long n = argc > 2 ? atol(argv[2]) : 10000000;
        if (n < 1 || n > 100000000) { fprintf(stderr, "takeover-probe: N must be 1..100000000\n"); return 2; }
        return state_cost(n);
    }
    if (argc == 6 && !strcmp(argv[1], "--serve")) return serve(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), argv[5]);
    if (argc < 2 || argc > 3) { fprintf(stderr, "usage: takeover-probe MOUNTPOINT [KILLS]\n"); return 2; }
    int kills = argc == 3 ? atoi(argv[2]) : 20;
    if (kills < 1 || kills > 1000) { fprintf(stderr, "takeover-probe: KILLS must be 1..1000\n"); return 2; }
    MNT = argv[1];
    snprintf(path_hello, sizeof path_hello, "%s/hello", MNT);
    snprintf(path_slow, sizeof path_slow, "%s/slow", MNT);
    snprintf(path_new, sizeof path_new, "%s/new", MNT);
    struct stat mst;
    if (stat(MNT, &mst) != 0 || !S_ISDIR(mst.st_mode)) { fprintf(stderr, "takeover-probe: %s is not a directory\n", MNT); return 2; }
    prctl(PR_SET_CHILD_SUBREAPER, 1);   /* servers orphaned by a dead keeper come back to us */
    int memfd = memfd_create("takeover-probe-state", 0);
    if (memfd < 0 || ftruncate(memfd, sizeof *S) != 0) return 2;
    S = mmap(NULL, sizeof *S, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (S == MAP_FAILED) return 2;
    memcpy(S->data, "before", 6); S->size = 6;
    signal(SIGALRM, on_alarm); alarm(90);
    atexit(cleanup);
    keeper_pid = fork();
    if (keeper_pid == 0) return keeper(memfd, MNT);
    close(memfd);

    /* 0. first server up; what INIT offered */
    int fd_before = -1; struct stat st;
    for (int i = 0; i < 5000 && fd_before < 0; i++) { fd_before = open(path_hello, O_RDWR); if (fd_before < 0) usleep(1000); }
    if (fd_before < 0 || !wait_ready(0, 5000)) { fact(0, "mount", "first server did not serve: %s", strerror(errno)); return 1; }
    const struct fuse_init_in *ii = (const void *)(S->init + sizeof(struct fuse_in_header));
    unsigned long long flags = ii->flags | ((unsigned long long)ii->flags2 << 32);
    int has_resend = (flags & HAS_RESEND) != 0;
    /* A request timeout (Linux 6.14+) would abort the mount during a long takeover; 0 = none. */
    char tmo[32] = "absent";
    FILE *tf = fopen("/proc/sys/fs/fuse/default_request_timeout", "r");
    if (tf) { if (!fgets(tmo, sizeof tmo, tf)) strcpy(tmo, "?"); tmo[strcspn(tmo, "\n")] = 0; fclose(tf); }
    fact(1, "init", "protocol 7.%u flags 0x%llx FUSE_HAS_RESEND=%s FUSE_OVER_IO_URING=%s saved_bytes=%d default_request_timeout=%s",
         ii->minor, flags, has_resend ? "yes" : "no", flags & OVER_IO_URING ? "offered" : "not-offered", S->init_len, tmo);
    struct stat st_before; fstat(fd_before, &st_before);

    /* 1. nobody serves: a caller waits; then the successor answers it */
    S->hold = 1;
    int g = kill_server();
    usleep(50000);
    pid_t c = caller(OP_STAT);
    double t0 = now();
    int r = wait_for(c, 1500);
    int waited = r == -1;
    S->hold = 0;
    int r2 = waited ? wait_for(c, 5000) : r;
    fact(waited && r2 == 0 && wait_ready(g, 5000), "survives_server_death",
         "keeper holds the same /dev/fuse file (SCM_RIGHTS); a stat with no server blocked %s for %.0f ms (held on purpose), then the successor answered it: %s",
         waited ? "yes" : "NO", (now() - t0) * 1e3, r2 == 0 ? "ok" : strerror(r2 > 0 && r2 < 128 ? r2 : EIO));

    /* 2. the successor serves the kernel's node ids and file handles */
    char b[16] = {0};
    int stat_ok = stat(path_hello, &st) == 0 && st.st_ino == 2;
    int fstat_ok = fstat(fd_before, &st) == 0 && st.st_ino == st_before.st_ino;
    int rd_ok = pread(fd_before, b, 6, 0) == 6 && !memcmp(b, "before", 6);
    int wr_ok = pwrite(fd_before, "after!", 6, 0) == 6;
    int fresh = open(path_hello, O_RDONLY);
    int rb_ok = fresh >= 0 && pread(fresh, b, 6, 0) == 6 && !memcmp(b, "after!", 6);
    if (fresh >= 0) close(fresh);
    fact(stat_ok && fstat_ok && rd_ok && wr_ok && rb_ok, "successor_serves",
         "INIT replayed into a fresh libfuse session: stat by path %s, fstat of a pre-kill fd %s, pread %s, pwrite %s, read back by a new open %s",
         stat_ok ? "ok" : "FAIL", fstat_ok ? "ok" : "FAIL", rd_ok ? "ok" : "FAIL", wr_ok ? "ok" : "FAIL", rb_ok ? "ok" : "FAIL");

    /* 3. a request in flight with FUSE_NOTIFY_RESEND */
    if (has_resend) {
        S->slow_armed = 1; S->slow_reading = 0; S->want_resend = 1;
        c = caller(OP_READ_SLOW);
        int reading = wait_flag(&S->slow_reading, 5000);
        S->slow_armed = 0;
        unsigned long long seen0 = S->resent_seen;
        t0 = now(); g = kill_server();
        r = wait_for(c, 5000);
        wait_ready(g, 5000);
        fact(reading && r == 0 && S->resent_seen > seen0, "resend",
             "a READ read by the server and killed before its answer: resent with bit 63 (%llu seen), caller got its bytes %.0f ms after the kill: %s",
             S->resent_seen - seen0, (now() - t0) * 1e3, r == 0 ? "ok" : r < 0 ? "still waiting" : strerror(r < 128 ? r : EIO));
    } else {
        fact(-1, "resend", "this kernel offers no FUSE_HAS_RESEND (protocol 7.%u < 7.40): a request in flight cannot be resent", ii->minor);
    }

    /* 3b. a CREATE O_EXCL applied, then killed before its answer, resent: without and with the slot */
    if (has_resend) {
        int got[2];
        for (int slot = 0; slot < 2; slot++) {
            S->new_exists = 0; S->slot_unique = 0; S->use_slot = slot; S->want_resend = 1;
            S->create_applied = 0; S->create_armed = 1;
            c = caller(OP_CREATE_EXCL);
            int applied = wait_flag(&S->create_applied, 5000);
            S->create_armed = 0;
            g = kill_server();
            got[slot] = applied ? wait_for(c, 5000) : -2;
            wait_ready(g, 5000);
        }
        S->use_slot = 0;
        fact(got[0] == EEXIST && got[1] == 0, "resend_create",
             "open(O_CREAT|O_EXCL) applied by the server, killed before the answer, resent: a successor that applies it again answers %s; one that finds its unique in the in-flight slot answers %s",
             got[0] == EEXIST ? "EEXIST (the caller's own file)" : got[0] == 0 ? "success (unexpected)" : got[0] < 0 ? "nothing" : strerror(got[0] < 128 ? got[0] : EIO),
             got[1] == 0 ? "success" : got[1] < 0 ? "nothing" : strerror(got[1] < 128 ? got[1] : EIO));
    } else {
        fact(-1, "resend_create", "no resend on this kernel: a CREATE in flight at a crash is never answered");
    }

    /* 4. a request in flight without the resend: the caller waits while the successor serves others */
    S->slow_armed = 1; S->slow_reading = 0; S->want_resend = 0;
    c = caller(OP_READ_SLOW);
    int reading = wait_flag(&S->slow_reading, 5000);
    S->slow_armed = 0;
    g = kill_server();
    int up = wait_ready(g, 5000);
    int others = stat(path_hello, &st) == 0;
    t0 = now();
    r = wait_for(c, 2000);
    double still = (now() - t0) * 1e3;
    int same = 0, rs = has_resend ? resend_via_pidfd(&same) : 0;
    r2 = has_resend ? wait_for(c, 5000) : -1;
    fact(reading && up && others && r == -1 && (!has_resend || (rs == 0 && same && r2 == 0)), "no_resend_waits",
         "without the notify the caller of a lost READ waited %.0f ms and on (others served: %s)%s",
         still, others ? "yes" : "NO",
         !has_resend ? "; no resend on this kernel: it waits until the mount is aborted" :
         rs != 0 ? "; the later resend failed" : r2 == 0 ? "; a later resend written on a pidfd_getfd copy (same file per kcmp) answered it" : "; the later resend did not answer it");
    if (!has_resend && c > 0) { kill(c, SIGKILL); wait_for(c, 2000); }

    /* 5. a server on a FUSE_DEV_IOC_CLONE fd: its death ends its in-flight requests, the mount lives on */
    S->use_clone = 1;
    g = kill_server(); wait_ready(g, 5000);
    S->use_clone = 0;
    S->slow_armed = 1; S->slow_reading = 0; S->want_resend = has_resend;
    c = caller(OP_READ_SLOW);
    reading = wait_flag(&S->slow_reading, 5000);
    S->slow_armed = 0;
    g = kill_server();
    r = wait_for(c, 5000);
    up = wait_ready(g, 5000);
    others = stat(path_hello, &st) == 0;
    fact(reading && r == ECONNABORTED && up && others, "clone_fd",
         "the server read on a cloned fd and was killed: its in-flight READ failed with %s (not resent), the mount lives on via the keeper's original fd: %s",
         r < 0 ? "nothing (still waiting)" : r == 0 ? "success" : strerror(r < 128 ? r : EIO), others ? "yes" : "NO");

    /* 6. kill -9 -> successor serving, repeated */
    double best = 1e9, worst = 0, sum = 0, ready_sum = 0; int served = 0;
    for (int k = 0; k < kills; k++) {
        t0 = now(); g = kill_server();
        int ok = stat(path_hello, &st) == 0;
        double dt = (now() - t0) * 1e3;
        if (!ok || !wait_ready(g, 5000)) continue;
        served++; sum += dt; ready_sum += (S->ready_at - t0) * 1e3;
        if (dt < best) best = dt;
        if (dt > worst) worst = dt;
    }
    memset(b, 0, sizeof b);
    int intact = pread(fd_before, b, 6, 0) == 6 && !memcmp(b, "after!", 6);
    fact(served == kills && intact, "respawn_ms",
         "%d kill -9 of the server, keeper fork+execs a successor: stat answered after min %.1f / mean %.1f / max %.1f ms (successor ready at mean %.1f ms); %d answered; pre-kill fd reads its bytes: %s",
         kills, best, served ? sum / served : 0, worst, served ? ready_sum / served : 0, served, intact ? "yes" : "NO");

    /* 7. the keeper dies: the server's fd keeps the mount; then the server dies too: abort */
    kill(keeper_pid, SIGKILL); waitpid(keeper_pid, NULL, 0); keeper_pid = 0;
    int alive = stat(path_hello, &st) == 0;
    t0 = now();
    pid_t last = S->server; kill(last, SIGKILL); waitpid(last, NULL, 0); S->server = 0;
    int e = stat(path_hello, &st) == 0 ? 0 : errno;
    double dt = (now() - t0) * 1e3;
    memset(b, 0, sizeof b);
    int e2 = pread(fd_before, b, 6, 0) < 0 ? errno : 0;
    fact(alive && e == ENOTCONN && e2 == ENOTCONN, "both_dead",
         "keeper killed: mount still served by the server: %s; server killed too (last /dev/fuse file closed): stat fails with %s after %.1f ms, the pre-kill fd with %s; data gone with the connection",
         alive ? "yes" : "NO", e ? strerror(e) : "success", dt, e2 ? strerror(e2) : "success");
    close(fd_before);
    return failures ? 1 : 0;
}
