// chargefs-keeper: holds a chargefsd mount's files while its server may die, and starts a
// successor when it does (issue 21; docs/takeover.md, "The keeper").
//
// chargefsd -o takeover splits in two before it does anything else: this program in the original
// process (the parent; so every server is its child and it knows how each one died), the server
// in the child. The server sends, over a SOCK_SEQPACKET pair, every file a successor needs (the
// same open file of /dev/fuse, never a FUSE_DEV_IOC_CLONE; the arena, its tmpfs root, the state
// memfds, each large file's backing file) as it makes them, and forgets them as they go
// (CKeeper.h). Nothing here parses user input: only those fixed-size messages, and its own argv,
// which chargefsd writes.
//
// When the server exits 0 (unmounted, or stopped by a signal it handles), the keeper exits 0.
// When it dies otherwise (a signal, a non-zero exit) after it handed over /dev/fuse, the keeper
// logs the cause and starts `chargefsd ARGS... --takeover` with a new socket pair at fd 3, sends
// it every file and value, and goes on. At most 5 successors in 60 s: past that, or when a
// successor says it cannot take over (exit 75), it logs why, aborts the connection
// (/sys/fs/fuse/connections/N/abort: callers get ENOTCONN instead of waiting forever) and exits 1.
//
// Upgrade in place (chargefsd --upgrade; docs/takeover.md, "Upgrade in place"): on SIGUSR1 (the
// kernel lets only root or our own uid send it) the keeper opens the server's binary
// (/proc/PID/exe, O_PATH: the file it runs, even once replaced) and sends the server SIGUSR2;
// the server stops reading requests (callers wait in the kernel's queue), answers those it has,
// takes a checkpoint and exits 76 (handed over). The keeper then starts the binary now at the
// daemon's path (a path, not /proc/self/exe: a replaced file is picked up) with --takeover. If
// that one dies before it serves (exit 75: it cannot read this state), the keeper starts the
// previous binary from the kept O_PATH file (execveat AT_EMPTY_PATH), which takes the state back.
// Crash successors then run that previous binary too, until an upgrade succeeds.
// Upgrades are counted apart from crashes (upgrades=, upgrade_failures= in the status) and never
// count toward the crash-loop bound.
//
// usage (by chargefsd only): chargefs-keeper SOCKFD SERVERPID MAX [--detached] [--adopted] -- CHARGEFSD ARGS...
// (--adopted: started by a server whose keeper died; that server is not our child)
// (MAX: successors allowed in 60 s)
#define _GNU_SOURCE
#include "CKeeper.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

enum { MAX_SUCCESSORS_LIMIT = 1000, WINDOW_S = 60, EXIT_CANNOT_TAKE_OVER = 75,
       EXIT_HANDED_OVER = CKEEPER_EXIT_HANDED_OVER };
/* Successors allowed in WINDOW_S seconds (-o takeover_max=N, default 5). */
static unsigned max_successors = 5;

struct held { uint32_t kind; uint64_t id; int fd; };
static struct held *files;
static size_t nfiles, capfiles;
struct value { uint32_t kind; uint64_t value; };
static struct value values[16];
static size_t nvalues;

static int use_syslog;
/* The server is not our child (a server restarted this keeper): its exit status cannot be read;
   its BYE says it exits 0. Cleared once we start a successor (our child). */
static int adopted, bye;
static volatile sig_atomic_t stop_signal, upgrade_asked;
/* An upgrade under way: 1 the server was asked to hand over, 2 the binary at the daemon's path
   was started and has not said SERVING, 3 the previous binary was started again (fallback). */
static int upgrading;
static int old_exe = -1;  /* O_PATH of the binary the handing-over server ran */
/* After a failed upgrade: the previous binary, which crash successors run too (the file at the
   daemon's path refused the state) until an upgrade succeeds. */
static int pinned_exe = -1;
static int handed_over;   /* an adopted server said it exits 76 */
/* The server said SERVING: its handover handler is in place (a SIGUSR2 before would kill it),
   so an upgrade asked before then waits for it. */
static int server_serving;

static void say(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (use_syslog) syslog(LOG_WARNING, "%s", line);
    else dprintf(STDERR_FILENO, "chargefs-keeper: %s\n", line);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static struct held *find(uint32_t kind, uint64_t id) {
    for (size_t i = 0; i < nfiles; i++) if (files[i].kind == kind && files[i].id == id) return &files[i];
    return NULL;
}

static void keep(uint32_t kind, uint64_t id, int fd) {
    struct held *h = find(kind, id);
    if (h) { close(h->fd); h->fd = fd; return; }
    if (nfiles == capfiles) {
        size_t cap = capfiles ? capfiles * 2 : 64;
        struct held *more = realloc(files, cap * sizeof *more);
        if (!more) { say("out of memory holding file %u/%llu", kind, (unsigned long long)id); close(fd); return; }
        files = more;
        capfiles = cap;
    }
    files[nfiles++] = (struct held){ kind, id, fd };
}

static void forget(uint32_t kind, uint64_t id) {
    struct held *h = find(kind, id);
    if (!h) return;
    close(h->fd);
    *h = files[--nfiles];
}

static void set_value(uint32_t kind, uint64_t v) {
    for (size_t i = 0; i < nvalues; i++) if (values[i].kind == kind) { values[i].value = v; return; }
    if (nvalues < sizeof values / sizeof values[0]) values[nvalues++] = (struct value){ kind, v };
}

static int get_value(uint32_t kind, uint64_t *v) {
    for (size_t i = 0; i < nvalues; i++) if (values[i].kind == kind) { *v = values[i].value; return 1; }
    return 0;
}

/* One message from the server; 0 at EOF or on a broken socket (then it is closed). */
static int handle(int *sock, pid_t server, double started_ms) {
    struct ckeeper_msg m;
    int fd;
    int r = ckeeper_recv(*sock, &m, &fd);
    if (r <= 0) {
        if (r < 0) say("the socket of server %d failed: %s", (int)server, strerror(-r));
        close(*sock);
        *sock = -1;
        return 0;
    }
    switch (m.op) {
    case CKEEPER_KEEP:
        if (fd >= 0) keep(m.kind, m.id, fd);
        return 1;
    case CKEEPER_FORGET: forget(m.kind, m.id); break;
    case CKEEPER_SET: set_value(m.kind, m.value); break;
    case CKEEPER_BYE:
        if (m.value == EXIT_HANDED_OVER) handed_over = 1; else bye = 1;
        break;
    case CKEEPER_SERVING:
        server_serving = 1;
        if (upgrading >= 2) {
            say("%s %d serves, %.1f ms after its predecessor handed over (its own start: %.1f ms)",
                upgrading == 2 ? "upgraded server" : "previous binary's server", (int)server,
                now_ms() - started_ms, (double)m.value / 1e3);
            if (upgrading == 3) {
                if (pinned_exe >= 0) close(pinned_exe);
                pinned_exe = old_exe;  /* crash successors run the previous binary from here on */
            } else {
                if (old_exe >= 0) close(old_exe);
                if (pinned_exe >= 0) { close(pinned_exe); pinned_exe = -1; }
            }
            old_exe = -1;
            upgrading = 0;
        } else if (started_ms > 0)
            say("successor %d serves, %.1f ms after its predecessor's death (its own start: %.1f ms)",
                (int)server, now_ms() - started_ms, (double)m.value / 1e3);
        break;
    default: break;
    }
    if (fd >= 0) close(fd);
    return 1;
}

/* The connection's abort file: /sys/fs/fuse/connections/N/abort where fusectl is mounted there,
   else through a private fusectl mount of our own (fsopen + fsmount: attached nowhere, gone with
   the fd), so the host's mounts are never changed. -1 with errno when neither works. */
static int open_abort_file(unsigned long long conn) {
    char rel[48], path[96];
    snprintf(rel, sizeof rel, "%llu/abort", conn);
    snprintf(path, sizeof path, "/sys/fs/fuse/connections/%s", rel);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd >= 0 || errno != ENOENT) return fd;
    int fs = (int)syscall(SYS_fsopen, "fusectl", 1 /* FSOPEN_CLOEXEC */);
    if (fs < 0) return -1;
    int mnt = -1;
    if (syscall(SYS_fsconfig, fs, 6 /* FSCONFIG_CMD_CREATE */, NULL, NULL, 0) == 0)
        mnt = (int)syscall(SYS_fsmount, fs, 1 /* FSMOUNT_CLOEXEC */, 0);
    int e = errno;
    close(fs);
    if (mnt < 0) { errno = e; return -1; }
    fd = openat(mnt, rel, O_WRONLY | O_CLOEXEC);
    e = errno;
    close(mnt);
    errno = e;
    return fd;
}

static void abort_connection(void) {
    uint64_t conn;
    if (!get_value(CKEEPER_CONN_DEV, &conn)) { say("no connection number known: the mount ends when this keeper exits"); return; }
    int fd = open_abort_file((unsigned long long)conn);
    if (fd < 0 || write(fd, "1", 1) != 1)
        say("cannot abort connection %llu (%s): it ends when this keeper exits", (unsigned long long)conn, strerror(errno));
    else
        say("aborted connection %llu: callers now get ENOTCONN; unmount it", (unsigned long long)conn);
    if (fd >= 0) close(fd);
}

static void on_signal(int sig) { stop_signal = sig; }
static void on_upgrade(int sig) { (void)sig; upgrade_asked = 1; }

static void describe(int status, char *out, size_t len) {
    if (WIFSIGNALED(status)) snprintf(out, len, "killed by signal %d (%s)%s", WTERMSIG(status), strsignal(WTERMSIG(status)),
                                      WCOREDUMP(status) ? ", core dumped" : "");
    else snprintf(out, len, "exited with status %d", WEXITSTATUS(status));
}

/* Starts `chargefsd ARGS... --takeover` with its end of a new pair at fd 3; returns its pid and
   our end in *sock, or -1. The flag goes last: ARGS may begin with a dynamic loader's own
   options (the CSI host bundle runs LOADER --library-path DIR/lib DIR/lib/chargefsd ARGS).
   `exe` >= 0: run that file (O_PATH) instead of the path args[0]. */
static pid_t start_successor(char **args, int nargs, int *sock, int exe) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    char **argv = calloc((size_t)nargs + 2, sizeof *argv);
    if (!argv) { close(sv[0]); close(sv[1]); return -1; }
    for (int i = 0; i < nargs; i++) argv[i] = args[i];
    argv[nargs] = "--takeover";
    pid_t pid = fork();
    if (pid == 0) {
        int high = exe >= 0 ? fcntl(exe, F_DUPFD, 10) : -1;
        if (exe >= 0 && high < 0) _exit(127);
        if (dup2(sv[1], CKEEPER_SUCCESSOR_FD) != CKEEPER_SUCCESSOR_FD) _exit(127);
        int exe_fd = CKEEPER_SUCCESSOR_FD + 1;
        if (high >= 0 && (dup2(high, exe_fd) != exe_fd || fcntl(exe_fd, F_SETFD, FD_CLOEXEC) != 0)) _exit(127);
        // Everything else it needs comes over the socket; nothing of ours leaks into it.
        syscall(SYS_close_range, high >= 0 ? exe_fd + 1 : CKEEPER_SUCCESSOR_FD + 1, ~0U, 0);
        ckeeper_reset_signals();
        // Every caller of the mount waits until the successor serves: it starts at a higher
        // priority (CKEEPER_SUCCESSOR_BOOST nice levels, where we may raise it: CAP_SYS_NICE) and
        // puts itself and its tasks back once it serves (ckeeper_restore_priority). On a loaded
        // machine its wall time was several times its CPU time, waiting for a CPU
        // (docs/takeover.md). With autogroup scheduling (kernel.sched_autogroup_enabled, on
        // here) a task's nice counts only against its own session's tasks, and sessions share
        // the CPUs as groups: so a session of its own, whose group is boosted the same way.
        errno = 0;
        int nice_now = getpriority(PRIO_PROCESS, 0);
        if (errno == 0) (void)setpriority(PRIO_PROCESS, 0, nice_now - CKEEPER_SUCCESSOR_BOOST);
        if (setsid() >= 0) {
            int ag = open("/proc/self/autogroup", O_WRONLY | O_CLOEXEC);
            if (ag >= 0) {
                char v[16];
                int n = snprintf(v, sizeof v, "%d", -CKEEPER_SUCCESSOR_BOOST < -20 ? -20 : -CKEEPER_SUCCESSOR_BOOST);
                (void)!write(ag, v, (size_t)n);
                close(ag);
            }
        }
        if (high >= 0) {
            extern char **environ;
            syscall(SYS_execveat, exe_fd, "", argv, environ, AT_EMPTY_PATH);
        } else {
            execv(argv[0], argv);
        }
        _exit(127);
    }
    free(argv);
    close(sv[1]);
    if (pid < 0) { close(sv[0]); return -1; }
    *sock = sv[0];
    return pid;
}

/* Hands the successor every file and value, then END. 0, or -errno (it died meanwhile). */
static int hand_over(int sock, unsigned takeovers) {
    set_value(CKEEPER_TAKEOVERS, takeovers);
    set_value(CKEEPER_KEEPER_PID, (uint64_t)getpid());
    for (size_t i = 0; i < nfiles; i++) {
        struct ckeeper_msg m = { CKEEPER_KEEP, files[i].kind, files[i].id, 0 };
        int r = ckeeper_send(sock, &m, files[i].fd);
        if (r < 0) return r;
    }
    for (size_t i = 0; i < nvalues; i++) {
        struct ckeeper_msg m = { CKEEPER_SET, values[i].kind, 0, values[i].value };
        int r = ckeeper_send(sock, &m, -1);
        if (r < 0) return r;
    }
    struct ckeeper_msg end = { CKEEPER_END, 0, 0, 0 };
    return ckeeper_send(sock, &end, -1);
}

int main(int argc, char **argv) {
    if (argc < 6) return 2;
    int sock = atoi(argv[1]);
    pid_t server = (pid_t)atoi(argv[2]);
    long max = atol(argv[3]);
    if (max < 1 || max > MAX_SUCCESSORS_LIMIT) return 2;
    max_successors = (unsigned)max;
    int a = 4;
    if (a < argc && !strcmp(argv[a], "--detached")) { use_syslog = 1; a++; }
    if (a < argc && !strcmp(argv[a], "--adopted")) { adopted = 1; server_serving = 1; a++; }
    if (a >= argc || strcmp(argv[a], "--")) return 2;
    a++;
    if (a >= argc || sock < 0 || server <= 0) return 2;
    char **args = argv + a;
    int nargs = argc - a;
    (void)prctl(PR_SET_NAME, "chargefs-keeper");
    // Orphans of a dead server (its charge helper) come to us, and are reaped here.
    (void)prctl(PR_SET_CHILD_SUBREAPER, 1);
    if (use_syslog) {
        openlog("chargefs-keeper", LOG_PID, LOG_DAEMON);
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0) { dup2(null, 0); dup2(null, 1); dup2(null, 2); if (null > 2) close(null); }
    }
    fcntl(sock, F_SETFD, FD_CLOEXEC);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;  // no SA_RESTART: poll returns and the loop forwards it
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = on_upgrade;
    sigaction(CKEEPER_UPGRADE_SIGNAL, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    double starts[MAX_SUCCESSORS_LIMIT + 1];
    unsigned nstarts = 0, takeovers = 0;
    double died_ms = 0;
    int pidfd = (int)syscall(SYS_pidfd_open, server, 0);
    for (;;) {
        if (stop_signal) {
            // Asked to stop: the server unmounts and exits 0, and so do we.
            kill(server, stop_signal);
            stop_signal = 0;
        }
        if (upgrade_asked && (server_serving || upgrading)) {
            upgrade_asked = 0;
            char exe[64];
            snprintf(exe, sizeof exe, "/proc/%d/exe", (int)server);
            if (upgrading) say("an upgrade is under way already: this request is ignored");
            else if (!find(CKEEPER_DEV_FUSE, 0)) say("upgrade asked before the server mounted: ignored");
            else if ((old_exe = open(exe, O_PATH | O_CLOEXEC)) < 0)
                say("upgrade: cannot open the running server's binary (%s): %s; not upgrading", exe, strerror(errno));
            else if (kill(server, CKEEPER_HANDOVER_SIGNAL) != 0) {
                say("upgrade: cannot signal server %d: %s", (int)server, strerror(errno));
                close(old_exe);
                old_exe = -1;
            } else {
                upgrading = 1;
                say("upgrade: server %d asked to hand over", (int)server);
            }
        }
        struct pollfd p[2] = { { pidfd, POLLIN, 0 }, { sock, POLLIN, 0 } };
        int n = poll(p, 2, 1000);
        if (n < 0 && errno != EINTR) { say("poll: %s", strerror(errno)); sleep(1); }
        if (n > 0 && sock >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            // Drain what is there before looking at the pidfd: a FORGET sent before a death counts.
            while (sock >= 0) {
                struct pollfd q = { sock, POLLIN, 0 };
                if (poll(&q, 1, 0) <= 0 || !(q.revents & (POLLIN | POLLHUP | POLLERR))) break;
                handle(&sock, server, died_ms);
            }
            if (died_ms > 0 && sock >= 0) { /* serving reported: the window ends */ }
        }
        int status = 0;
        pid_t dead;
        int server_died = 0;
        while ((dead = waitpid(-1, &status, WNOHANG)) > 0) {
            if (dead == server) { server_died = 1; break; }
        }
        // Not our child: its pidfd says it is gone, and only its BYE says how.
        int unknown = 0;
        if (!server_died && adopted && (pidfd < 0 || (n > 0 && (p[0].revents & (POLLIN | POLLHUP))))) server_died = unknown = 1;
        if (!server_died) continue;
        while (sock >= 0) handle(&sock, server, died_ms);  // EOF comes: the server is gone
        if (pidfd >= 0) { close(pidfd); pidfd = -1; }
        died_ms = now_ms();
        char cause[128];
        if (unknown) snprintf(cause, sizeof cause, "died (how is not known to a restarted keeper)");
        else describe(status, cause, sizeof cause);
        if (unknown ? bye : WIFEXITED(status) && WEXITSTATUS(status) == 0) return 0;  // unmounted, or stopped on request
        if (unknown) status = (handed_over ? EXIT_HANDED_OVER : 1) << 8;  // else a non-zero exit
        handed_over = 0;
        int handed = WIFEXITED(status) && WEXITSTATUS(status) == EXIT_HANDED_OVER;
        if ((handed && upgrading == 1) || upgrading == 2) {
            // An upgrade, not a crash: out of the crash-loop bound and the takeover count.
            uint64_t ups = 0, fails = 0;
            (void)get_value(CKEEPER_UPGRADES, &ups);
            (void)get_value(CKEEPER_UPGRADE_FAILURES, &fails);
            int fallback = upgrading == 2;  // the new binary died before it served
            if (fallback) { set_value(CKEEPER_UPGRADES, ups ? ups - 1 : 0); set_value(CKEEPER_UPGRADE_FAILURES, fails + 1); }
            else set_value(CKEEPER_UPGRADES, ups + 1);
            uint64_t before;  // a restarted keeper goes on counting where the server's count was
            if (get_value(CKEEPER_TAKEOVERS, &before) && before > takeovers) takeovers = (unsigned)before;
            set_value(CKEEPER_DIED_AT, (uint64_t)(died_ms * 1e3));
            int ssock = -1;
            pid_t next = start_successor(args, nargs, &ssock, fallback ? old_exe : -1);
            if (next < 0) {
                say("server %d %s; cannot start %s (%s): giving up", (int)server, cause,
                    fallback ? "the previous binary" : args[0], strerror(errno));
                abort_connection();
                return 1;
            }
            if (fallback) say("upgrade failed: the new server %d %s before it served; the previous binary starts again as %d",
                              (int)server, cause, (int)next);
            else say("upgrade: server %d handed over; %s starts as %d", (int)server, args[0], (int)next);
            upgrading = fallback ? 3 : 2;
            server_serving = 0;
            int r = hand_over(ssock, takeovers);
            if (r < 0) say("successor %d did not take the files (%s)", (int)next, strerror(-r));
            server = next;
            sock = ssock;
            adopted = 0;
            pidfd = (int)syscall(SYS_pidfd_open, server, 0);
            continue;
        }
        if (upgrading) {
            // The previous binary could not take its state back either, or a handing-over
            // server died otherwise: a crash from here on.
            upgrading = 0;
            if (old_exe >= 0) { close(old_exe); old_exe = -1; }
        }
        if (!find(CKEEPER_DEV_FUSE, 0)) {
            // It failed before the mount was handed over: a startup failure, already reported.
            return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
        }
        if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_CANNOT_TAKE_OVER) {
            say("server %d cannot take the mount over (its log says why): giving up", (int)server);
            abort_connection();
            return 1;
        }
        // The crash-loop bound: at most MAX_SUCCESSORS starts in WINDOW_S seconds.
        unsigned recent = 0;
        for (unsigned i = 0; i < nstarts; i++) if (died_ms - starts[i] < WINDOW_S * 1e3) starts[recent++] = starts[i];
        nstarts = recent;
        if (nstarts >= max_successors) {
            say("server %d %s; %u successors in the last %d s died too: giving up", (int)server, cause, max_successors, WINDOW_S);
            abort_connection();
            return 1;
        }
        uint64_t before;  // a restarted keeper goes on counting where the server's count was
        if (get_value(CKEEPER_TAKEOVERS, &before) && before > takeovers) takeovers = (unsigned)before;
        // The successor times its phases from here (its log line of phases).
        set_value(CKEEPER_DIED_AT, (uint64_t)(died_ms * 1e3));
        int ssock = -1;
        pid_t next = start_successor(args, nargs, &ssock, pinned_exe);
        if (next < 0) {
            say("server %d %s; cannot start a successor (%s): giving up", (int)server, cause, strerror(errno));
            abort_connection();
            return 1;
        }
        starts[nstarts++] = died_ms;
        server_serving = 0;
        takeovers++;
        say("server %d %s; successor %d started (takeover %u)", (int)server, cause, (int)next, takeovers);
        int r = hand_over(ssock, takeovers);
        if (r < 0) say("successor %d did not take the files (%s)", (int)next, strerror(-r));
        server = next;
        sock = ssock;
        adopted = 0;  // our child from here on
        pidfd = (int)syscall(SYS_pidfd_open, server, 0);
    }
}
