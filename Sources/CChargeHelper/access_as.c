// The permission check of memcg= (may the mounter move processes into the target?) made by the
// kernel itself for another user: in a forked child that drops to that user's ids.
#define _GNU_SOURCE
#include "CChargeHelper.h"
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/wait.h>

int chargehelper_access_as(const char *path, int mode, uid_t uid, gid_t gid, size_t ngroups, const gid_t *groups) {
    pid_t pid = _Fork();
    if (pid < 0) return -errno;
    if (pid == 0) {
        // Raw syscalls: glibc's wrappers would apply each change to every thread they think
        // the process has (their setxid broadcast); this copy has one thread.
        if (syscall(SYS_setgroups, ngroups, ngroups ? groups : NULL) != 0 || syscall(SYS_setresgid, gid, gid, gid) != 0 ||
            syscall(SYS_setresuid, uid, uid, uid) != 0) _exit(255);
        _exit(access(path, mode) == 0 ? 0 : (errno & 0x7f));
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0) if (errno != EINTR) return -errno;
    if (!WIFEXITED(st)) return -ECHILD;
    int code = WEXITSTATUS(st);
    return code == 255 ? -EPERM : -code;
}
