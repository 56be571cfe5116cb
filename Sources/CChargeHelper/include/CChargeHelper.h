#ifndef CHARGEFS_CCHARGEHELPER_H
#define CHARGEFS_CCHARGEHELPER_H

// The daemon's side of the charge helper, and the protocol both sides speak.
//
// The helper (Sources/chargefs-charge-helper, an exec'd program of its own) sits in a leaf cgroup
// of the memcg= target and instantiates arena ranges with fallocate, so the kernel charges those
// pages to that cgroup. It inherits two fds: the arena at CHARGEHELPER_ARENA_FD and its end of a
// SOCK_SEQPACKET pair at CHARGEHELPER_SOCK_FD. argv[1] is the daemon's pid (as the helper sees it).
//
// Protocol: the helper sends one byte CHARGEHELPER_READY once it is set up; then for each
// chargehelper_request it answers one chargehelper_reply (0 or an errno). EOF on the socket (the
// daemon closed its end, or died) ends it. Requests:
// - CHARGEHELPER_CHARGE_ARENA: fallocate(arena, 0, offset, length).
// - CHARGEHELPER_CHARGE_FILE: the request carries a file (SCM_RIGHTS): fallocate(file,
//   FALLOC_FL_KEEP_SIZE, offset, length); the helper closes its copy at once.
// - CHARGEHELPER_CREATE_FILE: the request carries a directory of the arena's tmpfs: the helper
//   opens a new unnamed file there (O_TMPFILE), so its inode, dentry and file are charged to this
//   cgroup too, and sends it back with the reply; it keeps no copy.

#include <stdint.h>
#include <sys/types.h>

enum { CHARGEHELPER_ARENA_FD = 3, CHARGEHELPER_SOCK_FD = 4 };
enum { CHARGEHELPER_READY = 'r' };
enum { CHARGEHELPER_CHARGE_ARENA = 0, CHARGEHELPER_CHARGE_FILE = 1, CHARGEHELPER_CREATE_FILE = 2 };

struct chargehelper_request { int64_t offset; int64_t length; int32_t op; int32_t reserved; };
struct chargehelper_reply { int32_t err; };

/// Sends `len` bytes with `fd` attached (SCM_RIGHTS) when fd >= 0. Returns sendmsg's result.
ssize_t chargehelper_send_with_fd(int sock, const void *buf, size_t len, int fd);
/// Receives up to `len` bytes; a file that came with them is stored in *fd_out (close-on-exec),
/// else -1. Returns recvmsg's result.
ssize_t chargehelper_recv_with_fd(int sock, void *buf, size_t len, int *fd_out);

/// Starts the helper program `path` (executed through `exe_fd`, an O_RDONLY fd of it the daemon
/// keeps open, when >= 0: the same file however the path changes, and its pages stay cached) in
/// a cgroup, holding a copy of `arena_fd`.
/// - cgroup_dir_fd >= 0 (cgroup v2): the child starts in that cgroup (clone3 CLONE_INTO_CGROUP),
///   so not one of its pages is charged anywhere else. Where clone3 is missing (ENOSYS, before
///   5.7), falls back to the procs way below.
/// - procs_fd >= 0 (cgroup v1, and the fallback): the forked child writes "0" into that
///   cgroup.procs (moving itself) before it execs; the pages it touches before then are copies of
///   the daemon's and go with the old image at exec.
/// The child runs only async-signal-safe calls (the daemon is multithreaded) and execs with an
/// empty environment. Returns the pid and stores the daemon's end of the socket pair
/// (close-on-exec) in *sock_out; -1 with errno on failure (the child's errno when the move into
/// the cgroup or the exec failed; then *stage_out says which: 1 move, 2 exec, 0 before).
pid_t chargehelper_spawn(const char *path, int exe_fd, int arena_fd, int cgroup_dir_fd, int procs_fd,
                         int *sock_out, int *stage_out);

/// access(path, mode) as seen by uid/gid and the `ngroups` supplementary groups `groups` (none:
/// 0, NULL), checked by the kernel in a forked child that drops to those ids. Returns 0 or -errno.
int chargehelper_access_as(const char *path, int mode, uid_t uid, gid_t gid, size_t ngroups, const gid_t *groups);

/// waitpid status decoding (macros Swift cannot call).
int chargehelper_wifsignaled(int status);
int chargehelper_wtermsig(int status);
int chargehelper_wexitstatus(int status);

#endif
