// The keeper's protocol and the daemon's side of starting it (see CKeeper.h).
#define _GNU_SOURCE
#include "CKeeper.h"
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

int ckeeper_send(int sock, const struct ckeeper_msg *msg, int fd) {
    struct iovec iov = { .iov_base = (void *)msg, .iov_len = sizeof *msg };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
    union { struct cmsghdr align; char bytes[CMSG_SPACE(sizeof(int))]; } control;
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        m.msg_control = control.bytes;
        m.msg_controllen = sizeof control.bytes;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    for (;;) {
        ssize_t n = sendmsg(sock, &m, MSG_NOSIGNAL);
        if (n == (ssize_t)sizeof *msg) return 0;
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : -EPROTO;
    }
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
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        for (int s = 1; s < NSIG; s++) if (s != SIGKILL && s != SIGSTOP) (void)sigaction(s, &sa, NULL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
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
