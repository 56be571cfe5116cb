#ifndef CHARGEFS_CFUSE_SHIM_H
#define CHARGEFS_CFUSE_SHIM_H

// libfuse 3.12+ API (Debian's 3.14). Everything Swift cannot reach directly (macros, bitfields,
// versioned symbols) gets a small inline function here, prefixed cfuse_.
// No _GNU_SOURCE: it changes glibc's struct layouts (fd_set) from what Swift's Glibc module
// sees, and the two then clash in any file that imports both. GNU-only calls go through syscall().
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <fcntl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>
#include <sys/xattr.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <linux/memfd.h>
#include <syslog.h>

extern pid_t _Fork(void);  /* glibc 2.34+, declared only under _GNU_SOURCE */

/* libfuse starts a worker when a request arrives and none is idle, up to max_threads, and ends
   workers beyond idle_threads once they are idle again. */
static inline int cfuse_session_loop_mt(struct fuse_session *se, int clone_fd, unsigned idle_threads, unsigned max_threads) {
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (cfg == NULL) return -ENOMEM;
    fuse_loop_cfg_set_clone_fd(cfg, (unsigned)clone_fd);
    fuse_loop_cfg_set_max_threads(cfg, max_threads);
    fuse_loop_cfg_set_idle_threads(cfg, idle_threads);
    int rc = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return rc;
}

/* The kernel's side of the protocol (newer than libfuse 3.14's): FuseKernelFeatures.swift reads it. */
#include <linux/fuse.h>
#include <sys/uio.h>

static void cfuse_discard_log(enum fuse_log_level level, const char *fmt, va_list ap) { (void)level; (void)fmt; (void)ap; }
/* libfuse prints its own lines on stderr; chargefsd reports every failure in one line itself. */
static inline void cfuse_silence_libfuse(void) { fuse_set_log_func(cfuse_discard_log); }

static inline void cfuse_fi_set_direct_io(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }
static inline void cfuse_fi_set_keep_cache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }
static inline void cfuse_fi_set_nonseekable(struct fuse_file_info *fi, int on) { fi->nonseekable = on ? 1 : 0; }
static inline int cfuse_fi_writepage(const struct fuse_file_info *fi) { return fi->writepage; }

/* syslog is variadic, which Swift cannot call. */
static inline void cfuse_syslog(int priority, const char *line) { syslog(priority, "%s", line); }
static inline void cfuse_openlog(void) { openlog("chargefsd", LOG_PID, LOG_DAEMON); }
enum { CFUSE_LOG_ERR = LOG_ERR, CFUSE_LOG_WARNING = LOG_WARNING };

static inline int64_t cfuse_physical_memory(void) { return (int64_t)sysconf(_SC_PHYS_PAGES) * (int64_t)sysconf(_SC_PAGESIZE); }
static inline int cfuse_memfd_create(const char *name, unsigned flags) { return (int)syscall(SYS_memfd_create, name, flags); }
static inline int cfuse_fallocate(int fd, int mode, int64_t offset, int64_t len) { return (int)syscall(SYS_fallocate, fd, mode, offset, len); }

enum {
    CFUSE_RENAME_NOREPLACE = RENAME_NOREPLACE,
    CFUSE_RENAME_EXCHANGE = RENAME_EXCHANGE,
    CFUSE_RENAME_WHITEOUT = RENAME_WHITEOUT,
    CFUSE_XATTR_CREATE = XATTR_CREATE,
    CFUSE_XATTR_REPLACE = XATTR_REPLACE,
    CFUSE_FALLOC_KEEP_SIZE = FALLOC_FL_KEEP_SIZE,
    CFUSE_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE,
    CFUSE_O_NOATIME = 01000000,  /* O_NOATIME, GNU-only in fcntl.h */
    CFUSE_SEEK_DATA = 3,  /* SEEK_DATA */
    CFUSE_SEEK_HOLE = 4,  /* SEEK_HOLE */
    CFUSE_MFD_CLOEXEC = MFD_CLOEXEC,
    CFUSE_TMPFS_MAGIC = TMPFS_MAGIC,
    CFUSE_CGROUP_SUPER_MAGIC = CGROUP_SUPER_MAGIC,
    CFUSE_CGROUP2_SUPER_MAGIC = CGROUP2_SUPER_MAGIC,
};


// ---- Arena (Sources/ChargeFS/Pages/Arena.swift) ----------------------------------------------
// A private tmpfs instance through the new mount API (Linux 5.2+): fsopen, fsconfig, fsmount.
// The mount is never attached anywhere; it lives as long as a file opened in it.
static inline int cfuse_fsopen(const char *fs_name, unsigned flags) { return (int)syscall(SYS_fsopen, fs_name, flags); }
static inline int cfuse_fsconfig(int fs_fd, unsigned cmd, const char *key, const char *value) {
    return (int)syscall(SYS_fsconfig, fs_fd, cmd, key, value, 0);
}
static inline int cfuse_fsmount(int fs_fd, unsigned flags, unsigned attr_flags) { return (int)syscall(SYS_fsmount, fs_fd, flags, attr_flags); }
static inline int cfuse_open_tmpfile(int dir_fd, mode_t mode) {
    return openat(dir_fd, ".", (020000000 | O_DIRECTORY) /* O_TMPFILE, GNU-only */ | O_RDWR | O_CLOEXEC, mode);
}
static inline int cfuse_madvise(void *addr, size_t length, int advice) { return madvise(addr, length, advice); }
enum {
    CFUSE_FSOPEN_CLOEXEC = FSOPEN_CLOEXEC,
    CFUSE_FSCONFIG_SET_FLAG = FSCONFIG_SET_FLAG,
    CFUSE_FSCONFIG_SET_STRING = FSCONFIG_SET_STRING,
    CFUSE_FSCONFIG_CMD_CREATE = FSCONFIG_CMD_CREATE,
    CFUSE_FSMOUNT_CLOEXEC = FSMOUNT_CLOEXEC,
    CFUSE_MOUNT_ATTR_PRIVATE_DATA = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
    CFUSE_MADV_NOHUGEPAGE = 15,  /* MADV_NOHUGEPAGE */
    CFUSE_MADV_DONTDUMP = 16,    /* MADV_DONTDUMP */
};

// ---- Charge helper (cgroup charging) --------------------------------------------------------
// A forked (never exec'd) child that sits in a leaf cgroup of the memcg= target and instantiates
// arena ranges with fallocate, so the kernel charges those pages to that cgroup. The child runs
// only raw syscalls (async-signal-safe: the parent is a multithreaded Swift process).
#include <signal.h>
#include <sys/wait.h>

enum { CFUSE_HELPER_ARENA_FD = 3, CFUSE_HELPER_SOCK_FD = 4 };
struct cfuse_charge_request { int64_t offset; int64_t length; };
struct cfuse_charge_reply { int32_t err; };

static inline __attribute__((noreturn)) void cfuse_charge_helper_main(pid_t parent, int arena_fd, int sock_fd) {
    // Die with the daemon. PDEATHSIG follows the forking *thread*; the socket's EOF (the daemon's
    // end closes when its process exits) is the primary exit path, this is the belt.
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) _exit(120);
    if (getppid() != parent) _exit(121);  // the daemon died before prctl took effect
    prctl(PR_SET_NAME, "chargefs-helper");  // 15 chars: how cleanupStale recognises helpers
    // Handlers inherited from the parent would run Swift code in this half-copied process.
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        (void)sigaction(sig, &sa, NULL);
    }
    sigset_t none;
    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
    // Move our two fds to 3 and 4 (via copies >= 5, so neither clobbers the other).
    int a = fcntl(arena_fd, F_DUPFD, 5), s = fcntl(sock_fd, F_DUPFD, 5);
    if (a < 0 || s < 0) _exit(122);
    if (dup2(a, CFUSE_HELPER_ARENA_FD) != CFUSE_HELPER_ARENA_FD) _exit(123);
    if (dup2(s, CFUSE_HELPER_SOCK_FD) != CFUSE_HELPER_SOCK_FD) _exit(123);
    // Every other fd goes, /dev/fuse above all: a helper holding it would keep a dead daemon's
    // mount from ever reporting ENOTCONN.
    if (syscall(SYS_close_range, 5U, ~0U, 0U) != 0) {
        struct { uint64_t cur, max; } rl;  // struct rlimit64, without <sys/resource.h>
        unsigned long max = 65536;
        if (syscall(SYS_prlimit64, 0, 7 /* RLIMIT_NOFILE */, NULL, &rl) == 0 && rl.cur < (1UL << 24)) max = rl.cur;
        for (unsigned long fd = 5; fd < max; fd++) (void)close((int)fd);
    }
    (void)close(0); (void)close(1); (void)close(2);
    for (int i = 0; i < 3; i++) if (open("/dev/null", O_RDWR) < 0) _exit(124);
    // Wait for "go": the parent first moves us into the leaf cgroup and sets oom_score_adj.
    char go = 0;
    ssize_t n;
    do n = recv(CFUSE_HELPER_SOCK_FD, &go, 1, 0); while (n < 0 && errno == EINTR);
    if (n != 1 || go != 'g') _exit(0);
    for (;;) {
        struct cfuse_charge_request rq;
        n = recv(CFUSE_HELPER_SOCK_FD, &rq, sizeof rq, 0);
        if (n == 0) _exit(0);
        if (n < 0) { if (errno == EINTR) continue; _exit(125); }
        struct cfuse_charge_reply rp = { 0 };
        if (n != (ssize_t)sizeof rq || rq.offset < 0 || rq.length <= 0) rp.err = EINVAL;
        else while (cfuse_fallocate(CFUSE_HELPER_ARENA_FD, 0, rq.offset, rq.length) != 0) {
            if (errno == EINTR) continue;
            rp.err = errno;
            break;
        }
        if (send(CFUSE_HELPER_SOCK_FD, &rp, sizeof rp, MSG_NOSIGNAL) != (ssize_t)sizeof rp) _exit(0);
    }
}

/// Forks a charge helper holding a copy of arena_fd. Returns its pid and stores the daemon's end
/// of a SOCK_SEQPACKET pair (close-on-exec) in *sock_out; -1 with errno on failure. The helper
/// waits for one byte 'g' before serving requests.
static inline pid_t cfuse_spawn_charge_helper(int arena_fd, int *sock_out) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    pid_t parent = getpid();
    pid_t pid = _Fork();  // no atfork handlers: the child must not touch locks or malloc
    if (pid < 0) {
        int e = errno;
        close(sv[0]); close(sv[1]);
        errno = e;
        return -1;
    }
    if (pid == 0) cfuse_charge_helper_main(parent, arena_fd, sv[1]);
    close(sv[1]);
    *sock_out = sv[0];
    return pid;
}

/// access(path, mode) as seen by uid/gid (no supplementary groups), checked by the kernel in a
/// forked child that drops to those ids. Returns 0 or -errno.
static inline int cfuse_access_as(const char *path, int mode, uid_t uid, gid_t gid) {
    pid_t pid = _Fork();
    if (pid < 0) return -errno;
    if (pid == 0) {
        if (syscall(SYS_setgroups, 0, NULL) != 0 || syscall(SYS_setresgid, gid, gid, gid) != 0 ||
            syscall(SYS_setresuid, uid, uid, uid) != 0) _exit(255);
        _exit(access(path, mode) == 0 ? 0 : (errno & 0x7f));
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0) if (errno != EINTR) return -errno;
    if (!WIFEXITED(st)) return -ECHILD;
    int code = WEXITSTATUS(st);
    return code == 255 ? -EPERM : -code;
}

static inline int cfuse_wifexited(int st) { return WIFEXITED(st); }
static inline int cfuse_wexitstatus(int st) { return WEXITSTATUS(st); }
static inline int cfuse_wifsignaled(int st) { return WIFSIGNALED(st); }
static inline int cfuse_wtermsig(int st) { return WTERMSIG(st); }
static inline int cfuse_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
static inline int cfuse_pidfd_send_signal(int pidfd, int sig) { return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0); }

#endif
