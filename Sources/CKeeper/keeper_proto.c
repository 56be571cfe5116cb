// The keeper's protocol and the daemon's side of starting it (see CKeeper.h).
#define _GNU_SOURCE
#include "CKeeper.h"
#include "CChargeHelper.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <signal.h>
#include <poll.h>
#include <sys/wait.h>
#include <sys/prctl.h>
#include <sys/xattr.h>
#include <sys/resource.h>
#include <dirent.h>

int ckeeper_send(int sock, const struct ckeeper_msg *msg, int fd) {
    for (;;) {
        ssize_t n = chargehelper_send_with_fd(sock, msg, sizeof *msg, fd);
        if (n == (ssize_t)sizeof *msg) return 0;
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : -EPROTO;
    }
}

void ckeeper_reset_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++) if (s != SIGKILL && s != SIGSTOP) (void)sigaction(s, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

int ckeeper_recv(int sock, struct ckeeper_msg *msg, int *fd_out) {
    *fd_out = -1;
    for (;;) {
        struct iovec iov = { .iov_base = msg, .iov_len = sizeof *msg };
        union { struct cmsghdr align; char bytes[CMSG_SPACE(sizeof(int))]; } control;
        struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                            .msg_controllen = sizeof control.bytes };
        ssize_t n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int fd;
                memcpy(&fd, CMSG_DATA(c), sizeof fd);
                if (*fd_out >= 0) close(fd); else *fd_out = fd;
            }
        }
        if (n == 0) return 0;
        if (n != (ssize_t)sizeof *msg || (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            if (*fd_out >= 0) { close(*fd_out); *fd_out = -1; }
            return -EPROTO;
        }
        return 1;
    }
}

int ckeeper_become_keeper(const char *keeper_path, char *const keeper_argv[]) {
    int sv[2], report[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -errno;
    if (pipe2(report, O_CLOEXEC) != 0) {
        int e = errno;
        close(sv[0]); close(sv[1]);
        return -e;
    }
    pid_t child = fork();
    if (child < 0) {
        int e = errno;
        close(sv[0]); close(sv[1]); close(report[0]); close(report[1]);
        return -e;
    }
    if (child == 0) {
        // The server: wait until the keeper's exec succeeded (the pipe closes) or failed.
        close(sv[0]);
        close(report[1]);
        int err = 0;
        ssize_t n;
        do n = read(report[0], &err, sizeof err); while (n < 0 && errno == EINTR);
        close(report[0]);
        if (n == (ssize_t)sizeof err) { close(sv[1]); return -err; }
        return sv[1];
    }
    close(sv[1]);
    close(report[0]);
    int flags = fcntl(sv[0], F_GETFD);
    if (flags >= 0) (void)fcntl(sv[0], F_SETFD, flags & ~FD_CLOEXEC);
    char sockarg[16], pidarg[16];
    snprintf(sockarg, sizeof sockarg, "%d", sv[0]);
    snprintf(pidarg, sizeof pidarg, "%d", (int)child);
    size_t count = 0;
    while (keeper_argv[count]) count++;
    char **argv = calloc(count + 1, sizeof *argv);
    if (argv) {
        for (size_t i = 0; i < count; i++)
            argv[i] = !strcmp(keeper_argv[i], "%SOCK%") ? sockarg : !strcmp(keeper_argv[i], "%PID%") ? pidarg : keeper_argv[i];
        execv(keeper_path, argv);
    }
    int e = errno ? errno : ENOMEM;
    (void)!write(report[1], &e, sizeof e);
    _exit(1);
}

int ckeeper_notify_resend(int dev_fd) {
    // struct fuse_out_header with error = FUSE_NOTIFY_RESEND (7), unique 0: a notification.
    struct { uint32_t len; int32_t error; uint64_t unique; } h = { 16, 7, 0 };
    ssize_t n;
    do n = write(dev_fd, &h, sizeof h); while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof h ? 0 : n < 0 ? -errno : -EIO;
}

pid_t ckeeper_spawn(const char *path, char *const argv[], int *sock_out) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    pid_t pid = _Fork();  // no atfork handlers: the child touches no locks
    if (pid < 0) {
        int e = errno;
        close(sv[0]); close(sv[1]);
        errno = e;
        return -1;
    }
    if (pid == 0) {
        if (dup2(sv[1], CKEEPER_SUCCESSOR_FD) != CKEEPER_SUCCESSOR_FD) _exit(127);
        // Nothing of the server's but the socket: the keeper is sent what it must hold.
        if (syscall(SYS_close_range, CKEEPER_SUCCESSOR_FD + 1, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */) != 0) {
            for (int fd = CKEEPER_SUCCESSOR_FD + 1; fd < 65536; fd++) (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
        ckeeper_reset_signals();
        execv(path, argv);
        _exit(127);
    }
    close(sv[1]);
    *sock_out = sv[0];
    return pid;
}

int ckeeper_wait_for_exit(pid_t pid) {
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) return -errno;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    while (poll(&p, 1, -1) < 0 && errno == EINTR) {}
    close(fd);
    (void)waitpid(pid, NULL, WNOHANG);  // reaped if it was our child (a keeper we started)
    return 0;
}

static volatile sig_atomic_t handover_requested;

static void on_handover(int sig) {
    (void)sig;
    handover_requested = 1;
    raise(SIGTERM);  /* libfuse's handler: the session ends, the pool stops receiving */
}

int ckeeper_install_handover_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_handover;
    sigemptyset(&sa.sa_mask);
    return sigaction(CKEEPER_HANDOVER_SIGNAL, &sa, NULL) == 0 ? 0 : -errno;
}

int ckeeper_handover_requested(void) { return handover_requested != 0; }

long ckeeper_read_status(const char *mountpoint, char *buf, unsigned long len) {
    ssize_t n = getxattr(mountpoint, "user.chargefs.status", buf, len);
    return n < 0 ? -errno : (long)n;
}

void ckeeper_name_server(void) { (void)prctl(PR_SET_NAME, "chargefsd"); }

/* Sets `id`'s nice to `target`, or (target -100) CKEEPER_SUCCESSOR_BOOST levels lower, at most
   19. Raising nice needs no privilege. */
static void lower_priority(id_t id, int target) {
    if (target == -100) {
        errno = 0;
        int now = getpriority(PRIO_PROCESS, id);
        if (errno != 0) return;
        target = now + CKEEPER_SUCCESSOR_BOOST > 19 ? 19 : now + CKEEPER_SUCCESSOR_BOOST;
    }
    (void)setpriority(PRIO_PROCESS, id, target);
}

/* The autogroup's nice of `pid` ("/autogroup-19 nice 0"), 0 when unknown. */
static int autogroup_nice(pid_t pid) {
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/%d/autogroup", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    int nice = 0;
    if (fgets(line, sizeof line, f)) {
        char *at = strstr(line, " nice ");
        if (at) nice = atoi(at + 6);
    }
    fclose(f);
    return nice;
}

int ckeeper_restore_priority(pid_t keeper) {
    // The session's group (the keeper made one for this successor: autogroup scheduling) at the
    // keeper's group's nice; raising it needs no privilege.
    int ag = open("/proc/self/autogroup", O_WRONLY | O_CLOEXEC);
    if (ag >= 0) {
        char v[16];
        int n = snprintf(v, sizeof v, "%d", autogroup_nice(keeper));
        (void)!write(ag, v, (size_t)n);
        close(ag);
    }
    errno = 0;
    int target = getpriority(PRIO_PROCESS, (id_t)keeper);
    if (errno != 0) target = -100;
    // nice is per thread on Linux: each task, and the children each started.
    DIR *tasks = opendir("/proc/self/task");
    if (!tasks) { lower_priority(0, target); return target; }
    struct dirent *e;
    while ((e = readdir(tasks)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        id_t tid = (id_t)strtoul(e->d_name, NULL, 10);
        lower_priority(tid, target);
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%s/children", e->d_name);
        FILE *f = fopen(path, "re");
        if (!f) continue;
        unsigned long child;
        while (fscanf(f, "%lu", &child) == 1) lower_priority((id_t)child, target);
        fclose(f);
    }
    closedir(tasks);
    return target;
}
