#ifndef CHARGEFS_CFUSE_SHIM_H
#define CHARGEFS_CFUSE_SHIM_H

// libfuse 3.12+ API (Debian's 3.14). Everything Swift cannot reach directly (macros, bitfields,
// versioned symbols) gets a small inline function here, prefixed cfuse_.
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
#include <linux/magic.h>
#include <linux/memfd.h>
#include <syslog.h>

/* CPUs this process may run on (its affinity mask), at least 1. */
static inline unsigned cfuse_affinity_cpu_count(void) {
    unsigned long mask[16] = {0};  /* 1024 CPUs */
    long n = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    unsigned count = 0;
    for (long i = 0; n > 0 && i < n / (long)sizeof mask[0]; i++) count += (unsigned)__builtin_popcountl(mask[i]);
    return count ? count : 1;
}

/* ---- The session's workers ----------------------------------------------------------------
   libfuse's own multi-threaded loop starts a worker whenever a request finds none idle and ends
   one as soon as more than max_idle are idle: an asynchronous RELEASE beside the next request
   then either creates and ends a thread per file, or grows a pool whose extra workers rotate
   cold stacks (the kernel wakes the longest-waiting reader). This pool keeps `base` workers and
   starts a rescue worker only when every worker has been busy without finishing anything for
   `stuck_ms` (a write waiting for a frozen cgroup's charge), up to `max`; a rescue worker ends
   once it finishes a request while another worker is idle. Workers may be cancelled only while
   they wait to receive, as in libfuse's loop (a handler may hold the file system's locks). */
#include <pthread.h>
#include <semaphore.h>
#include <time.h>

struct cfuse_pool {
    struct fuse_session *se;
    unsigned base, max, stuck_ms;
    pthread_mutex_t lock;
    sem_t finished;            /* posted when a worker sees the session end */
    unsigned workers, idle;
    uint64_t progress_ns;      /* when a worker last finished a request or went idle */
    pthread_t threads[256];
    int done;
};

static inline uint64_t cfuse_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *cfuse_pool_worker(void *arg);

/* With pool->lock held. */
static inline int cfuse_pool_start(struct cfuse_pool *pool, int rescue) {
    if (pool->workers >= pool->max) return -1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1u << 20);
    pthread_t t;
    int rc = pthread_create(&t, &attr, cfuse_pool_worker, (void *)((uintptr_t)pool | (uintptr_t)rescue));
    pthread_attr_destroy(&attr);
    if (rc != 0) return -1;
    if (rescue) pthread_detach(t); else pool->threads[pool->workers] = t;
    pool->workers++;
    pool->idle++;
    return 0;
}

static void *cfuse_pool_worker(void *arg) {
    int rescue = (int)((uintptr_t)arg & 1u);
    struct cfuse_pool *pool = (struct cfuse_pool *)((uintptr_t)arg & ~(uintptr_t)1u);
    struct fuse_buf buf;
    memset(&buf, 0, sizeof buf);
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
    for (;;) {
        if (fuse_session_exited(pool->se)) break;
        pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
        int res = fuse_session_receive_buf(pool->se, &buf);
        pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
        if (res == -EINTR) continue;
        if (res <= 0) break;  /* unmounted (ENODEV) or an error: the session ends */
        pthread_mutex_lock(&pool->lock);
        pool->idle--;
        pthread_mutex_unlock(&pool->lock);
        fuse_session_process_buf(pool->se, &buf);
        pthread_mutex_lock(&pool->lock);
        pool->progress_ns = cfuse_now_ns();
        int leave = rescue && pool->idle > 0;
        if (leave) pool->workers--; else pool->idle++;
        pthread_mutex_unlock(&pool->lock);
        if (leave) { free(buf.mem); return NULL; }
    }
    free(buf.mem);
    if (!fuse_session_exited(pool->se)) fuse_session_exit(pool->se);
    sem_post(&pool->finished);
    return NULL;
}

static void *cfuse_pool_watchdog(void *arg) {
    struct cfuse_pool *pool = arg;
    struct timespec tick = { 0, 20 * 1000000L };
    for (;;) {
        nanosleep(&tick, NULL);
        pthread_mutex_lock(&pool->lock);
        if (pool->done) { pthread_mutex_unlock(&pool->lock); return NULL; }
        /* A signal that landed here ended the session, and nobody else may have seen it. */
        if (fuse_session_exited(pool->se)) { pthread_mutex_unlock(&pool->lock); sem_post(&pool->finished); return NULL; }
        uint64_t now = cfuse_now_ns();
        if (pool->idle == 0 && now - pool->progress_ns > (uint64_t)pool->stuck_ms * 1000000u &&
            cfuse_pool_start(pool, 1) == 0) {
            pool->progress_ns = now;  /* give the new worker its chance before another */
        }
        pthread_mutex_unlock(&pool->lock);
    }
}

/* Serves the session until it ends; returns what libfuse's loops return (0, or the number of the
   signal that ended it, or -errno). */
static inline int cfuse_session_loop_pool(struct fuse_session *se, unsigned base, unsigned max, unsigned stuck_ms) {
    struct cfuse_pool *pool = calloc(1, sizeof *pool);
    if (pool == NULL) return -ENOMEM;
    pool->se = se;
    pool->base = base < 1 ? 1 : (base > 64 ? 64 : base);
    pool->max = max < pool->base ? pool->base : (max > 256 ? 256 : max);
    pool->stuck_ms = stuck_ms;
    pthread_mutex_init(&pool->lock, NULL);
    sem_init(&pool->finished, 0, 0);
    pool->progress_ns = cfuse_now_ns();
    int rc = 0;
    pthread_mutex_lock(&pool->lock);
    for (unsigned i = 0; i < pool->base; i++) if (cfuse_pool_start(pool, 0) != 0) { rc = -EAGAIN; break; }
    unsigned started = pool->workers;
    pthread_mutex_unlock(&pool->lock);
    pthread_t watchdog;
    int have_watchdog = rc == 0 && pool->max > pool->base && pthread_create(&watchdog, NULL, cfuse_pool_watchdog, pool) == 0;
    if (rc == 0) {
        /* A signal interrupts the wait: its handler has ended the session. */
        while (sem_wait(&pool->finished) != 0 && errno == EINTR && !fuse_session_exited(se)) {}
    } else {
        fuse_session_exit(se);
    }
    pthread_mutex_lock(&pool->lock);
    pool->done = 1;
    pthread_mutex_unlock(&pool->lock);
    if (have_watchdog) pthread_join(watchdog, NULL);
    /* Base workers still waiting to receive are cancelled there; rescue workers are detached and
       end on their own (the session is over). */
    for (unsigned i = 0; i < started; i++) pthread_cancel(pool->threads[i]);
    for (unsigned i = 0; i < started; i++) pthread_join(pool->threads[i], NULL);
    /* The pool is not freed: a rescue worker may still be finishing a request (or waiting to
       receive) and will touch it; the daemon exits right after this returns. */
    fuse_session_reset(se);
    return rc;
}

/* The kernel's side of the protocol (newer than libfuse 3.14's): FuseKernelFeatures.swift reads it. */
#include <linux/fuse.h>
#include <sys/uio.h>

static void cfuse_discard_log(enum fuse_log_level level, const char *fmt, va_list ap) { (void)level; (void)fmt; (void)ap; }
/* libfuse prints its own lines on stderr; chargefsd reports every failure in one line itself. */
static inline void cfuse_silence_libfuse(void) { fuse_set_log_func(cfuse_discard_log); }

static inline void cfuse_fi_set_direct_io(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }
static inline void cfuse_fi_set_keep_cache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }
static inline void cfuse_fi_set_nonseekable(struct fuse_file_info *fi, int on) { fi->nonseekable = on ? 1 : 0; }
static inline int cfuse_fi_writepage(const struct fuse_file_info *fi) { return fi->writepage; }

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

/* syslog is variadic, which Swift cannot call. */
static inline void cfuse_syslog(int priority, const char *line) { syslog(priority, "%s", line); }
static inline void cfuse_openlog(void) { openlog("chargefsd", LOG_PID, LOG_DAEMON); }
enum { CFUSE_LOG_ERR = LOG_ERR, CFUSE_LOG_WARNING = LOG_WARNING };

static inline int64_t cfuse_physical_memory(void) { return (int64_t)sysconf(_SC_PHYS_PAGES) * (int64_t)sysconf(_SC_PAGESIZE); }
static inline int cfuse_memfd_create(const char *name, unsigned flags) { return (int)syscall(SYS_memfd_create, name, flags); }
static inline int cfuse_fallocate(int fd, int mode, int64_t offset, int64_t len) { return (int)syscall(SYS_fallocate, fd, mode, offset, len); }

enum {
    CFUSE_RENAME_NOREPLACE = RENAME_NOREPLACE,
    CFUSE_RENAME_EXCHANGE = RENAME_EXCHANGE,
    CFUSE_RENAME_WHITEOUT = RENAME_WHITEOUT,
    CFUSE_XATTR_CREATE = XATTR_CREATE,
    CFUSE_XATTR_REPLACE = XATTR_REPLACE,
    CFUSE_FALLOC_KEEP_SIZE = FALLOC_FL_KEEP_SIZE,
    CFUSE_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE,
    CFUSE_O_NOATIME = 01000000,  /* O_NOATIME, GNU-only in fcntl.h */
    CFUSE_SEEK_DATA = 3,  /* SEEK_DATA */
    CFUSE_SEEK_HOLE = 4,  /* SEEK_HOLE */
    CFUSE_MFD_CLOEXEC = MFD_CLOEXEC,
    CFUSE_TMPFS_MAGIC = TMPFS_MAGIC,
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
};

// ---- FUSE over io_uring (Sources/ChargeFS/Bridge/UringQueue.swift) ----------------------------
// The kernel's protocol (Linux 6.14+, include/uapi/linux/fuse.h, Documentation/filesystems/
// fuse-io-uring.rst), which Debian's 6.1 headers lack: one queue per possible CPU, each entry a
// header buffer and a payload buffer the kernel fills with a request; the daemon writes the reply
// into the same buffers and commits it with the fetch of the next request in one SQE.
// io_uring itself through its three system calls and <linux/io_uring.h> (6.1 has SQE128 and
// IORING_OP_URING_CMD): liburing ships its own copy of that header, which clashes with the one
// swift-system's module already imported.
#include <poll.h>
#include <linux/io_uring.h>

#define CFUSE_OVER_IO_URING (1ULL << 41)  /* FUSE_OVER_IO_URING, in flags2 */
enum { CFUSE_URING_IN_OUT_HEADER_SZ = 128, CFUSE_URING_OP_IN_OUT_SZ = 128 };
struct cfuse_uring_ent_in_out {  /* struct fuse_uring_ent_in_out */
    uint64_t flags;
    uint64_t commit_id;  /* the request's unique: names it in the commit */
    uint32_t payload_sz; /* bytes of payload, both ways */
    uint32_t padding;
    uint64_t reserved;
};
struct cfuse_uring_req_header {  /* struct fuse_uring_req_header */
    char in_out[CFUSE_URING_IN_OUT_HEADER_SZ];  /* fuse_in_header, then fuse_out_header */
    char op_in[CFUSE_URING_OP_IN_OUT_SZ];       /* the request's first argument (per-op header) */
    struct cfuse_uring_ent_in_out ring_ent_in_out;
};
enum { CFUSE_IO_URING_CMD_REGISTER = 1, CFUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2 };
struct cfuse_uring_cmd_req {  /* struct fuse_uring_cmd_req, in the SQE's 80-byte command area */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};
_Static_assert(sizeof(struct cfuse_uring_cmd_req) == 24, "fuse_uring_cmd_req");
_Static_assert(sizeof(struct cfuse_uring_req_header) == 288, "fuse_uring_req_header");

struct cfuse_ring_entry {
    struct cfuse_uring_req_header *header;
    void *payload;
    size_t payload_size;
    struct iovec iov[2];
    unsigned last_cmd;
};

/* A minimal io_uring: the submission and completion rings mapped from the kernel. */
struct cfuse_uring {
    int fd;
    unsigned sq_entries, *sq_head, *sq_tail, *sq_mask, *sq_array, sqe_tail, sqe_submitted;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned char *sqes;  /* 128 bytes each (IORING_SETUP_SQE128) */
    void *sq_map, *cq_map;
    size_t sq_map_size, cq_map_size, sqes_size;
};

/* One queue's io_uring: its entries, and an eventfd whose poll ends the thread's wait. */
struct cfuse_ring_queue {
    struct cfuse_uring ring;
    int fuse_fd;
    unsigned qid, count;
    int stop_fd;
    struct cfuse_ring_entry *entries;
    void *buffers;
    size_t buffers_size;
};
#define CFUSE_RING_STOP_DATA ((uint64_t)-1)

static inline void cfuse_uring_exit(struct cfuse_uring *r) {
    if (r->sqes) munmap(r->sqes, r->sqes_size);
    if (r->cq_map && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_size);
    if (r->sq_map) munmap(r->sq_map, r->sq_map_size);
    if (r->fd >= 0) close(r->fd);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

static inline int cfuse_uring_init(struct cfuse_uring *r, unsigned entries, unsigned cq_entries) {
    memset(r, 0, sizeof *r);
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    p.cq_entries = cq_entries;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) { int e = errno; r->fd = -1; return -e; }
    (void)fcntl(r->fd, F_SETFD, FD_CLOEXEC);
    r->sq_map_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && r->cq_map_size > r->sq_map_size) r->sq_map_size = r->cq_map_size;
    r->sq_map = mmap(NULL, r->sq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) { r->sq_map = NULL; cfuse_uring_exit(r); return -ENOMEM; }
    r->cq_map = single ? r->sq_map : mmap(NULL, r->cq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    if (r->cq_map == MAP_FAILED) { r->cq_map = NULL; cfuse_uring_exit(r); return -ENOMEM; }
    r->sqes_size = p.sq_entries * 128;
    void *sqes = mmap(NULL, r->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (sqes == MAP_FAILED) { cfuse_uring_exit(r); return -ENOMEM; }
    r->sqes = sqes;
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_entries = p.sq_entries;
    r->sq_head = (unsigned *)(void *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(void *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(void *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(void *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(void *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(void *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(void *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(void *)(cq + p.cq_off.cqes);
    r->sqe_tail = r->sqe_submitted = *r->sq_tail;
    return 0;
}

static inline struct io_uring_sqe *cfuse_uring_get_sqe(struct cfuse_uring *r) {
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sqe_tail - head >= r->sq_entries) return NULL;
    unsigned index = r->sqe_tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(void *)(r->sqes + (size_t)index * 128);
    memset(sqe, 0, 128);
    r->sq_array[index] = index;
    r->sqe_tail++;
    return sqe;
}

/* Whether this process may use io_uring at all (kernel.io_uring_disabled, seccomp): 0 or -errno. */
static inline int cfuse_uring_probe(void) {
    struct cfuse_uring r;
    int rc = cfuse_uring_init(&r, 2, 4);
    if (rc == 0) cfuse_uring_exit(&r);
    return rc;
}

/* Publishes queued SQEs and enters the kernel: submits them and waits for `wait` completions. */
static inline int cfuse_uring_submit_and_wait(struct cfuse_uring *r, unsigned wait) {
    __atomic_store_n(r->sq_tail, r->sqe_tail, __ATOMIC_RELEASE);
    unsigned to_submit = r->sqe_tail - r->sqe_submitted;
    int rc = (int)syscall(__NR_io_uring_enter, r->fd, to_submit, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    if (rc < 0) return -errno;
    r->sqe_submitted += (unsigned)rc;
    return rc;
}

static inline void cfuse_ring_prep(struct cfuse_ring_queue *q, struct io_uring_sqe *sqe, struct cfuse_ring_entry *e,
                                   unsigned cmd, uint64_t commit_id) {
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = q->fuse_fd;
    sqe->cmd_op = cmd;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd == CFUSE_IO_URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct cfuse_uring_cmd_req *req = (struct cfuse_uring_cmd_req *)(void *)&sqe->cmd[0];
    req->qid = (uint16_t)q->qid;
    req->commit_id = commit_id;
    e->last_cmd = cmd;
}

static inline void cfuse_ring_queue_destroy(struct cfuse_ring_queue *q) {
    cfuse_uring_exit(&q->ring);
    if (q->stop_fd >= 0) close(q->stop_fd);
    q->stop_fd = -1;
    if (q->buffers) munmap(q->buffers, q->buffers_size);
    q->buffers = NULL;
    free(q->entries);
    q->entries = NULL;
}

/* Sets up the ring and `count` entries with payload buffers of `payload_size` bytes (page
   multiple). Returns 0 or -errno; on failure nothing is left open. */
static inline int cfuse_ring_queue_init(struct cfuse_ring_queue *q, int fuse_fd, unsigned qid, unsigned count, size_t payload_size) {
    memset(q, 0, sizeof *q);
    q->stop_fd = -1;
    q->fuse_fd = fuse_fd;
    q->qid = qid;
    q->count = count;
    int rc = cfuse_uring_init(&q->ring, count + 1, 2 * (count + 1));
    if (rc < 0) { q->ring.fd = -1; return rc; }
    q->stop_fd = (int)syscall(SYS_eventfd2, 0, 02000000 /* EFD_CLOEXEC */);
    if (q->stop_fd < 0) { rc = -errno; cfuse_ring_queue_destroy(q); return rc; }
    q->entries = calloc(count, sizeof *q->entries);
    /* Per entry a page holding the header, then the payload: mapped, touched only when used. The
       header page's end (past the 288-byte header) takes the request's in_header and first
       argument, so the request reads as /dev/fuse's layout without copying the payload. */
    size_t page = 4096, per = page + payload_size;
    q->buffers_size = per * count;
    void *buffers = mmap(NULL, q->buffers_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q->entries == NULL || buffers == MAP_FAILED) { cfuse_ring_queue_destroy(q); return -ENOMEM; }
    q->buffers = buffers;
    for (unsigned i = 0; i < count; i++) {
        struct cfuse_ring_entry *e = &q->entries[i];
        e->header = (struct cfuse_uring_req_header *)(void *)((char *)buffers + per * i);
        e->payload = (char *)buffers + per * i + page;
        e->payload_size = payload_size;
        e->iov[0].iov_base = e->header;
        e->iov[0].iov_len = sizeof *e->header;
        e->iov[1].iov_base = e->payload;
        e->iov[1].iov_len = payload_size;
    }
    return 0;
}

/* Registers every entry and arms the stop poll. Returns 0, or the first error the kernel
   answered at once (a register it refuses completes during the submit). */
static inline int cfuse_ring_queue_register(struct cfuse_ring_queue *q) {
    for (unsigned i = 0; i < q->count; i++) {
        struct io_uring_sqe *sqe = cfuse_uring_get_sqe(&q->ring);
        if (sqe == NULL) return -EBUSY;
        cfuse_ring_prep(q, sqe, &q->entries[i], CFUSE_IO_URING_CMD_REGISTER, 0);
    }
    struct io_uring_sqe *sqe = cfuse_uring_get_sqe(&q->ring);
    if (sqe == NULL) return -EBUSY;
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = q->stop_fd;
    sqe->poll32_events = POLLIN;
    sqe->user_data = CFUSE_RING_STOP_DATA;
    int rc = cfuse_uring_submit_and_wait(&q->ring, 0);
    if (rc < 0) return rc;
    if (rc != (int)q->count + 1) return -EIO;
    unsigned head = *q->ring.cq_head, tail = __atomic_load_n(q->ring.cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        int res = q->ring.cqes[head & *q->ring.cq_mask].res;
        if (res < 0 && res != -EAGAIN && res != -EINTR) return res;
    }
    return 0;
}

/* Queues the commit of the reply in `e` and the fetch of its next request; sent by the next wait. */
static inline int cfuse_ring_queue_commit(struct cfuse_ring_queue *q, struct cfuse_ring_entry *e, uint64_t commit_id) {
    struct io_uring_sqe *sqe = cfuse_uring_get_sqe(&q->ring);
    if (sqe == NULL) return -EBUSY;
    cfuse_ring_prep(q, sqe, e, CFUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id);
    return 0;
}

/* Sends what was queued and waits for at least one completion; fills up to `max` (entry, result)
   pairs (entry NULL: the stop poll fired) and returns how many, or -errno. */
static inline int cfuse_ring_queue_wait(struct cfuse_ring_queue *q, struct cfuse_ring_entry **entries, int *results, unsigned max) {
    struct cfuse_uring *r = &q->ring;
    unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    if (head == tail || r->sqe_tail != r->sqe_submitted) {
        int rc = cfuse_uring_submit_and_wait(r, head == tail ? 1 : 0);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) return rc;
        tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    }
    unsigned n = 0;
    for (; head != tail && n < max; head++, n++) {
        struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        entries[n] = cqe->user_data == CFUSE_RING_STOP_DATA ? NULL : (struct cfuse_ring_entry *)(uintptr_t)cqe->user_data;
        results[n] = cqe->res;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return (int)n;
}

/* Sends an entry's last command again (the kernel answered EAGAIN or EINTR). */
static inline int cfuse_ring_queue_retry(struct cfuse_ring_queue *q, struct cfuse_ring_entry *e) {
    struct io_uring_sqe *sqe = cfuse_uring_get_sqe(&q->ring);
    if (sqe == NULL) return -EBUSY;
    uint64_t commit_id = e->header->ring_ent_in_out.commit_id;
    cfuse_ring_prep(q, sqe, e, e->last_cmd, e->last_cmd == CFUSE_IO_URING_CMD_REGISTER ? 0 : commit_id);
    return 0;
}

/* Ends the queue thread's wait (from any thread). */
static inline void cfuse_ring_queue_stop(struct cfuse_ring_queue *q) {
    uint64_t one = 1;
    if (q->stop_fd >= 0) (void)!write(q->stop_fd, &one, sizeof one);
}

/* Names the calling thread (ps -L, /proc/PID/task/TID/comm); at most 15 characters. */
static inline void cfuse_set_thread_name(const char *name) { (void)prctl(PR_SET_NAME, name, 0, 0, 0); }

/* Binds the calling thread to one CPU; 0 or -errno. */
static inline int cfuse_bind_thread_to_cpu(unsigned cpu) {
    unsigned long mask[16] = {0};
    if (cpu >= sizeof mask * 8) return -EINVAL;
    mask[cpu / (8 * sizeof mask[0])] |= 1UL << (cpu % (8 * sizeof mask[0]));
    return syscall(SYS_sched_setaffinity, 0, sizeof mask, mask) == 0 ? 0 : -errno;
}

/* Whether this process may run on `cpu` (its affinity mask). */
static inline int cfuse_affinity_has_cpu(unsigned cpu) {
    unsigned long mask[16] = {0};
    long n = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    if (n <= 0 || cpu >= (unsigned long)n * 8) return 0;
    return (mask[cpu / (8 * sizeof mask[0])] >> (cpu % (8 * sizeof mask[0]))) & 1;
}

#endif
