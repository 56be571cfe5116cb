#ifndef CHARGEFS_CFUSE_SHIM_H
#define CHARGEFS_CFUSE_SHIM_H

// libfuse 3.12+ API (Debian's 3.14). Everything Swift cannot reach directly (macros, bitfields,
// versioned symbols, variadic calls) gets a one-line inline function or a constant here, prefixed
// cfuse_; nothing else. The transport's logic (worker pool, io_uring) is the CFuseTransport target.
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
#include <sys/ioctl.h>
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
#include <linux/memfd.h>
#include <syslog.h>


static void cfuse_discard_log(enum fuse_log_level level, const char *fmt, va_list ap) { (void)level; (void)fmt; (void)ap; }
/* libfuse prints its own lines on stderr; chargefsd reports every failure in one line itself. */
static inline void cfuse_silence_libfuse(void) { fuse_set_log_func(cfuse_discard_log); }

static inline void cfuse_fi_set_direct_io(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }
static inline void cfuse_fi_set_keep_cache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }
static inline int cfuse_fi_writepage(const struct fuse_file_info *fi) { return fi->writepage; }

/* The kernel's side of the protocol (newer than libfuse 3.14's): the transport reads requests and
   patches the INIT reply with its structs. */
#include <linux/fuse.h>
#include <sys/uio.h>

/* FUSE passthrough (protocol 7.40, Linux 6.9+), newer than libfuse 3.14's headers. */
#define CFUSE_INIT_PASSTHROUGH (1ULL << 37)
#define CFUSE_FOPEN_PASSTHROUGH (1u << 7)
struct cfuse_backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
/* Registers `fd` as a backing file on the /dev/fuse fd: a backing id > 0, or -errno. */
static inline int cfuse_backing_open(int dev_fd, int fd) {
    struct cfuse_backing_map map = { .fd = fd };
    int id = ioctl(dev_fd, _IOW(229, 1, struct cfuse_backing_map), &map);
    return id < 0 ? -errno : id;
}
static inline int cfuse_backing_close(int dev_fd, int id) {
    uint32_t backing_id = (uint32_t)id;
    return ioctl(dev_fd, _IOW(229, 2, uint32_t), &backing_id) < 0 ? -errno : 0;
}
/* fuse_open_out as of 7.40: the backing id sits where libfuse 3.14 has padding. */
struct cfuse_open_out_7_40 { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
_Static_assert(sizeof(struct cfuse_open_out_7_40) == sizeof(struct fuse_open_out), "fuse_open_out");
/* fuse_init_out as of 7.40: max_stack_depth takes the first of the 6.1 headers' unused words. */
struct cfuse_init_out_7_40 {
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2, max_stack_depth;
    uint32_t unused[6];
};
_Static_assert(sizeof(struct cfuse_init_out_7_40) == sizeof(struct fuse_init_out), "fuse_init_out");
_Static_assert(__builtin_offsetof(struct cfuse_init_out_7_40, max_write) == __builtin_offsetof(struct fuse_init_out, max_write), "max_write");
_Static_assert(__builtin_offsetof(struct cfuse_init_out_7_40, max_pages) == __builtin_offsetof(struct fuse_init_out, max_pages), "max_pages");
_Static_assert(__builtin_offsetof(struct cfuse_init_out_7_40, flags2) == __builtin_offsetof(struct fuse_init_out, flags2), "flags2");
_Static_assert(__builtin_offsetof(struct cfuse_init_out_7_40, max_stack_depth) == __builtin_offsetof(struct fuse_init_out, unused), "max_stack_depth");

/* syslog is variadic, which Swift cannot call. */
static inline void cfuse_syslog(int priority, const char *line) { syslog(priority, "%s", line); }
static inline void cfuse_openlog(void) { openlog("chargefsd", LOG_PID, LOG_DAEMON); }
enum { CFUSE_LOG_WARNING = LOG_WARNING };

static inline int64_t cfuse_physical_memory(void) { return (int64_t)sysconf(_SC_PHYS_PAGES) * (int64_t)sysconf(_SC_PAGESIZE); }
static inline int cfuse_memfd_create(const char *name, unsigned flags) { return (int)syscall(SYS_memfd_create, name, flags); }
static inline int cfuse_fallocate(int fd, int mode, int64_t offset, int64_t len) { return (int)syscall(SYS_fallocate, fd, mode, offset, len); }

enum {
    CFUSE_RENAME_NOREPLACE = RENAME_NOREPLACE,
    CFUSE_RENAME_EXCHANGE = RENAME_EXCHANGE,
    CFUSE_XATTR_CREATE = XATTR_CREATE,
    CFUSE_XATTR_REPLACE = XATTR_REPLACE,
    CFUSE_FALLOC_KEEP_SIZE = FALLOC_FL_KEEP_SIZE,
    CFUSE_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE,
    CFUSE_O_NOATIME = 01000000,  /* O_NOATIME, GNU-only in fcntl.h */
    CFUSE_SEEK_DATA = 3,  /* SEEK_DATA */
    CFUSE_SEEK_HOLE = 4,  /* SEEK_HOLE */
    CFUSE_MFD_CLOEXEC = MFD_CLOEXEC,
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
    CFUSE_MADV_POPULATE_READ = 22,   /* MADV_POPULATE_READ (Linux 5.14) */
    CFUSE_MADV_POPULATE_WRITE = 23,  /* MADV_POPULATE_WRITE (Linux 5.14) */
};

// ---- State (Sources/ChargeFS/State) -----------------------------------------------------------
// The journal's tail and the active checkpoint word live in a shared memfd mapping that a
// successor reads: a release store publishes what was written before it, an acquire load sees it
// (Swift's Atomic cannot be placed over mapped memory).
static inline void cfuse_store_release_u64(uint64_t *word, uint64_t value) { __atomic_store_n(word, value, __ATOMIC_RELEASE); }
static inline uint64_t cfuse_load_acquire_u64(const uint64_t *word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }
// Bits of a word that threads holding a shared lock set together (PageStore's mapped pages).
static inline void cfuse_or_release_u64(uint64_t *word, uint64_t bits) { (void)__atomic_fetch_or(word, bits, __ATOMIC_RELEASE); }
static inline void cfuse_and_release_u64(uint64_t *word, uint64_t bits) { (void)__atomic_fetch_and(word, bits, __ATOMIC_RELEASE); }

#endif
