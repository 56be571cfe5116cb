// chargefs-charge-helper: instantiates arena ranges for chargefsd inside a leaf cgroup of the
// memcg= target, so that the kernel charges their pages to that cgroup. Started by the daemon
// only (chargehelper_spawn in Sources/CChargeHelper), already in its cgroup, with the arena at
// fd 3 and its socket at fd 4; argv[1] is the daemon's pid. See CChargeHelper.h for the protocol.
//
// It is small on purpose: its own memory (a few pages of stack and data, its page tables, its
// task) is charged to the target once, when it starts, and never grows.
//
// OOM policy: idle, it keeps the daemon's oom_score_adj (with a few hundred KiB it is the last
// choice of any OOM killer, and killing it would free nothing: the daemon holds the arena). Only
// while its own fallocate charges does it raise itself to 1000, so that if the kernel runs the
// OOM killer for *that* charge (a workload grew between the daemon's headroom check and the
// fallocate), the helper dies and the daemon answers ENOSPC, instead of a workload dying.
#define _GNU_SOURCE
#include "CChargeHelper.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <signal.h>

static char idle_adj[16];
static size_t idle_len;

// Opened each time rather than held: the helper holds nothing but its two fds and stdio.
static void set_oom_adj(const char *value, size_t len) {
    if (len == 0) return;
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    (void)!write(fd, value, len);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    // Die with the daemon: any exit of the daemon, SIGKILL included, closes its end of the
    // socket, and the next recv here returns 0. No PR_SET_PDEATHSIG: it fires when the daemon's
    // forking *thread* ends, and libfuse ends idle worker threads, which killed live helpers.
    if (getppid() != (pid_t)strtol(argv[1], NULL, 10)) return 3;  // the daemon is gone already
    (void)prctl(PR_SET_NAME, "chargefs-helper");  // what ps, pgrep and the tests look for
    int fd = open("/proc/self/oom_score_adj", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, idle_adj, sizeof idle_adj - 1);
        idle_len = n > 0 ? (size_t)n : 0;
        close(fd);
    }
    char ready = CHARGEHELPER_READY;
    if (send(CHARGEHELPER_SOCK_FD, &ready, 1, MSG_NOSIGNAL) != 1) return 0;
    for (;;) {
        struct chargehelper_request rq;
        int fd = -1;
        ssize_t n = chargehelper_recv_with_fd(CHARGEHELPER_SOCK_FD, &rq, sizeof rq, &fd);
        if (n == 0) return 0;
        if (n < 0) { if (errno == EINTR) continue; return 4; }
        struct chargehelper_reply rp = { 0 };
        int created = -1;
        if (n != (ssize_t)sizeof rq) {
            rp.err = EINVAL;
        } else if (rq.op == CHARGEHELPER_CREATE_FILE) {
            // The new file's inode, dentry and file are allocated here, in the target.
            created = fd < 0 ? -1 : openat(fd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
            if (fd < 0) rp.err = EBADF; else if (created < 0) rp.err = errno;
        } else if (rq.offset < 0 || rq.length <= 0 || (rq.op != CHARGEHELPER_CHARGE_ARENA && rq.op != CHARGEHELPER_CHARGE_FILE)
                   || (rq.op == CHARGEHELPER_CHARGE_FILE && fd < 0)) {
            rp.err = EINVAL;
        } else {
            int target = rq.op == CHARGEHELPER_CHARGE_FILE ? fd : CHARGEHELPER_ARENA_FD;
            int mode = rq.op == CHARGEHELPER_CHARGE_FILE ? FALLOC_FL_KEEP_SIZE : 0;
            set_oom_adj("1000\n", 5);
            while (fallocate(target, mode, rq.offset, rq.length) != 0) {
                if (errno == EINTR) continue;
                rp.err = errno;
                break;
            }
            set_oom_adj(idle_adj, idle_len);
        }
        if (fd >= 0) close(fd);  // the helper keeps nothing of the daemon's files
        ssize_t sent = chargehelper_send_with_fd(CHARGEHELPER_SOCK_FD, &rp, sizeof rp, created);
        if (created >= 0) close(created);
        if (sent != (ssize_t)sizeof rp) return 0;
    }
}
