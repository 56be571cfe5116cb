// Starting the charge helper from a multithreaded daemon: everything the child does between fork
// and exec is a raw, async-signal-safe call (no malloc, no locks, no atfork handlers).
#define _GNU_SOURCE
#include "CChargeHelper.h"
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <linux/sched.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif

struct clone_args_v2 {  // struct clone_args up to CLONE_ARGS_SIZE_VER2 (cgroup), 88 bytes
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};

// Child side: report (stage, errno) on the pipe and die.
static __attribute__((noreturn)) void child_fail(int report_fd, int stage) {
    int msg[2] = { stage, errno };
    (void)!write(report_fd, msg, sizeof msg);
    _exit(127);
}

static __attribute__((noreturn)) void child_exec(const char *path, int exe_fd, char *const argv[], int arena_fd,
                                                 int sock_fd, int procs_fd, int report_fd) {
    if (procs_fd >= 0 && write(procs_fd, "0\n", 2) != 2) child_fail(report_fd, 1);
    // The daemon's threads (libfuse workers) block signals, and it ignores SIGPIPE: start clean.
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
    // Our two fds to 3 and 4 via copies above both, so neither clobbers the other; and the
    // report pipe above them (close-on-exec: it reads EOF when the exec succeeds).
    int a = fcntl(arena_fd, F_DUPFD, 10), s = fcntl(sock_fd, F_DUPFD, 10), r = fcntl(report_fd, F_DUPFD_CLOEXEC, 10);
    if (a < 0 || s < 0 || r < 0) child_fail(report_fd, 0);
    report_fd = r;
    if (dup2(a, CHARGEHELPER_ARENA_FD) != CHARGEHELPER_ARENA_FD) child_fail(report_fd, 0);
    if (dup2(s, CHARGEHELPER_SOCK_FD) != CHARGEHELPER_SOCK_FD) child_fail(report_fd, 0);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0) child_fail(report_fd, 0);
    for (int fd = 0; fd < 3; fd++) if (dup2(null, fd) != fd) child_fail(report_fd, 0);
    // Every other fd goes, /dev/fuse above all: a helper holding it would keep a dead daemon's
    // mount from ever reporting ENOTCONN. (Close-on-exec for the rest: the report pipe must live.)
    if (syscall(SYS_close_range, 5U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */) != 0) {
        for (int fd = 5; fd < 65536; fd++) if (fd != report_fd) (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    char *const env[] = { NULL };
    if (exe_fd >= 0) syscall(SYS_execveat, exe_fd, "", argv, env, AT_EMPTY_PATH);
    else execve(path, argv, env);
    child_fail(report_fd, 2);
}

pid_t chargehelper_spawn(const char *path, int exe_fd, int arena_fd, int cgroup_dir_fd, int procs_fd,
                         int *sock_out, int *stage_out) {
    *stage_out = 0;
    char pidarg[24];
    snprintf(pidarg, sizeof pidarg, "%d", (int)getpid());
    char *const argv[] = { (char *)path, pidarg, NULL };
    int sv[2], report[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    if (pipe2(report, O_CLOEXEC) != 0) {
        int e = errno;
        close(sv[0]); close(sv[1]);
        errno = e;
        return -1;
    }
    pid_t pid = -1;
    int moved_by_clone = 0;
    if (cgroup_dir_fd >= 0) {
        struct clone_args_v2 args;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_INTO_CGROUP;
        args.exit_signal = SIGCHLD;
        args.cgroup = (uint64_t)cgroup_dir_fd;
        pid = (pid_t)syscall(SYS_clone3, &args, sizeof args);
        if (pid >= 0) moved_by_clone = 1;
        else if (errno != ENOSYS && errno != E2BIG) {
            int e = errno;
            close(sv[0]); close(sv[1]); close(report[0]); close(report[1]);
            errno = e;
            *stage_out = 1;
            return -1;
        }
    }
    if (!moved_by_clone) pid = _Fork();  // no atfork handlers: the child touches no locks
    if (pid < 0) {
        int e = errno;
        close(sv[0]); close(sv[1]); close(report[0]); close(report[1]);
        errno = e;
        return -1;
    }
    if (pid == 0) {
        close(report[0]);
        child_exec(path, exe_fd, argv, arena_fd, sv[1], moved_by_clone ? -1 : procs_fd, report[1]);
    }
    close(sv[1]);
    close(report[1]);
    int msg[2];
    ssize_t n;
    do n = read(report[0], msg, sizeof msg); while (n < 0 && errno == EINTR);
    close(report[0]);
    if (n == (ssize_t)sizeof msg) {  // the child failed before or at exec, and has exited
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
        close(sv[0]);
        *stage_out = msg[0];
        errno = msg[1];
        return -1;
    }
    *sock_out = sv[0];
    return pid;
}

int chargehelper_wifsignaled(int status) { return WIFSIGNALED(status); }
int chargehelper_wtermsig(int status) { return WTERMSIG(status); }
int chargehelper_wexitstatus(int status) { return WEXITSTATUS(status); }
