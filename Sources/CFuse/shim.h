#ifndef CHARGEFS_CFUSE_SHIM_H
#define CHARGEFS_CFUSE_SHIM_H

// libfuse 3.12+ API (Debian's 3.14). Everything Swift cannot reach directly (macros, bitfields,
// versioned symbols) gets a small inline function here, prefixed cfuse_.
#define FUSE_USE_VERSION 312
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
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

static inline int cfuse_session_loop_mt(struct fuse_session *se, int clone_fd, unsigned max_threads) {
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (cfg == NULL) return -ENOMEM;
    fuse_loop_cfg_set_clone_fd(cfg, (unsigned)clone_fd);
    fuse_loop_cfg_set_max_threads(cfg, max_threads);
    fuse_loop_cfg_set_idle_threads(cfg, max_threads);
    int rc = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return rc;
}

static inline void cfuse_fi_set_direct_io(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }
static inline void cfuse_fi_set_keep_cache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }
static inline void cfuse_fi_set_nonseekable(struct fuse_file_info *fi, int on) { fi->nonseekable = on ? 1 : 0; }
static inline int cfuse_fi_writepage(const struct fuse_file_info *fi) { return fi->writepage; }

static inline int cfuse_memfd_create(const char *name, unsigned flags) { return memfd_create(name, flags); }
static inline int cfuse_fallocate(int fd, int mode, int64_t offset, int64_t len) { return fallocate(fd, mode, offset, len); }

enum {
    CFUSE_RENAME_NOREPLACE = RENAME_NOREPLACE,
    CFUSE_RENAME_EXCHANGE = RENAME_EXCHANGE,
    CFUSE_RENAME_WHITEOUT = RENAME_WHITEOUT,
    CFUSE_XATTR_CREATE = XATTR_CREATE,
    CFUSE_XATTR_REPLACE = XATTR_REPLACE,
    CFUSE_FALLOC_KEEP_SIZE = FALLOC_FL_KEEP_SIZE,
    CFUSE_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE,
    CFUSE_SEEK_DATA = SEEK_DATA,
    CFUSE_SEEK_HOLE = SEEK_HOLE,
    CFUSE_MFD_CLOEXEC = MFD_CLOEXEC,
    CFUSE_TMPFS_MAGIC = TMPFS_MAGIC,
    CFUSE_CGROUP_SUPER_MAGIC = CGROUP_SUPER_MAGIC,
    CFUSE_CGROUP2_SUPER_MAGIC = CGROUP2_SUPER_MAGIC,
};

#endif
