#ifndef CHARGEFS_CKEEPER_H
#define CHARGEFS_CKEEPER_H

// The keeper's protocol (docs/takeover.md), both sides: chargefsd (Sources/ChargeFS/Daemon,
// ProcessKeeper) and chargefs-keeper (Sources/chargefs-keeper). One SOCK_SEQPACKET pair per
// server; each message is one struct ckeeper_msg, with at most one file attached (SCM_RIGHTS).
//
// Server -> keeper:
//   KEEP (a file attached): hold it as (kind, id), replacing one held under that name.
//   FORGET: close the one held as (kind, id).
//   SET: remember `value` under `kind` (the connection's device number, the arena's backing).
//   SERVING: this server serves requests now (`value`: its start-to-serving time in µs).
//   BYE: this server is about to exit 0 (unmounted, or stopped): a keeper that is not its
//   parent (one the server restarted) cannot read its exit status.
//   BYE with value CKEEPER_EXIT_HANDED_OVER: it exits that instead (an upgrade's handover).
// Keeper -> successor, right after it starts: KEEP for every file held, then SET for every value,
// then END. Nothing in the keeper parses user input: only these fixed-size messages.

#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

enum {
    CKEEPER_KEEP = 1, CKEEPER_FORGET = 2, CKEEPER_SET = 3, CKEEPER_SERVING = 4, CKEEPER_END = 5,
    CKEEPER_BYE = 6,
};
// What a file or value is (KeptDescriptor in Swift, plus the connection's own).
enum {
    CKEEPER_DEV_FUSE = 1, CKEEPER_ARENA = 2, CKEEPER_ARENA_ROOT = 3, CKEEPER_JOURNAL = 4,
    CKEEPER_CHECKPOINT = 5, CKEEPER_BACKING = 6,
    // values (SET)
    CKEEPER_CONN_DEV = 100,      // the connection's number N (/sys/fs/fuse/connections/N/abort)
    CKEEPER_ARENA_BACKING = 101, // 0 memfd, 1 private tmpfs, 2 private tmpfs with noswap
    CKEEPER_TAKEOVERS = 102,     // set by the keeper: successors started so far
    CKEEPER_KEEPER_PID = 103,    // set by the keeper: its own pid
    CKEEPER_UPGRADES = 104,      // set by the keeper: upgrades done (chargefsd --upgrade)
    CKEEPER_UPGRADE_FAILURES = 105, // set by the keeper: upgrades whose new binary could not take over
    CKEEPER_DIED_AT = 106,       // set by the keeper: CLOCK_MONOTONIC µs when it saw its server dead
};

struct ckeeper_msg { uint32_t op; uint32_t kind; uint64_t id; uint64_t value; };

// Where a successor finds its end of the socket (inherited, not close-on-exec).
enum { CKEEPER_SUCCESSOR_FD = 3 };
// Nice levels a successor runs above its keeper from its exec until it serves.
enum { CKEEPER_SUCCESSOR_BOOST = 20 };

// Upgrade in place (chargefsd --upgrade; docs/takeover.md): the caller sends the keeper
// CKEEPER_UPGRADE_SIGNAL; the keeper sends its server CKEEPER_HANDOVER_SIGNAL; the server stops
// reading requests, finishes those it has, takes a checkpoint and exits CKEEPER_EXIT_HANDED_OVER.
enum { CKEEPER_UPGRADE_SIGNAL = SIGUSR1, CKEEPER_HANDOVER_SIGNAL = SIGUSR2,
       CKEEPER_EXIT_HANDED_OVER = 76 };

/// Installs the server's handler of CKEEPER_HANDOVER_SIGNAL: it records the request and raises
/// SIGTERM, whose libfuse handler (installed before) ends the session loop.
int ckeeper_install_handover_handler(void);
/// Names this process "chargefsd" (comm): a successor the keeper ran from a kept file
/// (execveat AT_EMPTY_PATH) is otherwise named after the descriptor's number.
void ckeeper_name_server(void);
/// A successor once it serves: every task of this process, and each child one of them started
/// (the charge helper), back at `keeper`'s nice (the keeper started it CKEEPER_SUCCESSOR_BOOST
/// levels higher). Returns the nice set, or -100 when the keeper's could not be read (then each
/// task goes back CKEEPER_SUCCESSOR_BOOST levels).
int ckeeper_restore_priority(pid_t keeper);
/// 1 once CKEEPER_HANDOVER_SIGNAL came.
int ckeeper_handover_requested(void);
/// The mount root's user.chargefs.status (getxattr: <sys/xattr.h> is not in Swift's Glibc):
/// its length, or -errno.
long ckeeper_read_status(const char *mountpoint, char *buf, unsigned long len);

/// Sends one message, with `fd` attached when >= 0. 0, or -errno.
int ckeeper_send(int sock, const struct ckeeper_msg *msg, int fd);
/* In a child between fork and exec (async-signal-safe): every signal to its default, none blocked. */
void ckeeper_reset_signals(void);
/// Receives one message; a file that came with it goes to *fd_out (close-on-exec), else -1.
/// 1 on a message, 0 at EOF, -errno on error (EINTR retried).
int ckeeper_recv(int sock, struct ckeeper_msg *msg, int *fd_out);

/// Splits this process in two, before it has any thread: the parent becomes the keeper (execs
/// `keeper_path` with argv `keeper_argv`, in which the string "%SOCK%" is replaced by the number
/// of its end of a new socket pair and "%PID%" by the child's pid), the child goes on as the
/// server. Returns, in the child, its end of the pair (close-on-exec); -errno if the pair or
/// the fork failed or the keeper could not be exec'd (the parent has then exited). The parent
/// never returns.
int ckeeper_become_keeper(const char *keeper_path, char *const keeper_argv[]);

/// Starts a new keeper from a server whose keeper died (a multithreaded process: the child runs
/// only async-signal-safe calls): `argv[0]` is executed with its end of a new socket pair at
/// fd 3 and nothing else of ours. Returns its pid and our end (close-on-exec) in *sock_out, or
/// -1 with errno.
pid_t ckeeper_spawn(const char *path, char *const argv[], int *sock_out);

/// Waits until process `pid` has exited (its pidfd becomes readable). 0, or -errno when it
/// cannot be watched (ESRCH: it is gone already).
int ckeeper_wait_for_exit(pid_t pid);

/// Writes FUSE_NOTIFY_RESEND on a /dev/fuse fd (Linux 6.9+). 0, or -errno.
int ckeeper_notify_resend(int dev_fd);

#endif
