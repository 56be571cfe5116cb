#ifndef CHARGEFS_CFUSETRANSPORT_H
#define CHARGEFS_CFUSETRANSPORT_H

// The transport under chargefsd's Bridge, in C: the worker pool that serves /dev/fuse, and a
// minimal io_uring client for FUSE over io_uring (Linux 6.14+). In C because each is a loop
// around system calls and libfuse's session (cancellation points, mapped rings, memory
// barriers) that Swift would only wrap. Swift sees this header; the .c files hold the logic.
// No _GNU_SOURCE here (it changes glibc's struct layouts from what Swift's Glibc module sees).
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct fuse_session;

/* ---- /dev/fuse: the session's workers (pool.c) ---------------------------------------------- */

/* Serves the session until it ends with `base` workers, starting a rescue worker (up to `max`)
   only when every worker has been busy without finishing a request for `stuck_ms`. Returns what
   libfuse's loops return (0, the number of the signal that ended it, or -errno). */
int cfuse_session_loop_pool(struct fuse_session *se, unsigned base, unsigned max, unsigned stuck_ms);
/* Workers map their request buffers up front (-o takeover: see pool.c). Before the loop starts. */
void cfuse_pool_prefault_buffers(int on);

/* ---- threads and CPUs (thread.c) ------------------------------------------------------------- */

/* CPUs this process may run on (its affinity mask), at least 1. */
unsigned cfuse_affinity_cpu_count(void);
/* Whether this process may run on `cpu`. */
int cfuse_affinity_has_cpu(unsigned cpu);
/* Binds the calling thread to one CPU; 0 or -errno. */
int cfuse_bind_thread_to_cpu(unsigned cpu);
/* Names the calling thread (ps -L, /proc/PID/task/TID/comm); at most 15 characters. */
void cfuse_set_thread_name(const char *name);

/* ---- FUSE over io_uring (ring.c) --------------------------------------------------------------
   The kernel's protocol (include/uapi/linux/fuse.h, Documentation/filesystems/fuse-io-uring.rst),
   which Debian's 6.1 headers lack: one queue per possible CPU, each entry a header buffer and a
   payload buffer the kernel fills with a request; the daemon writes the reply into the same
   buffers and commits it with the fetch of the next request in one SQE. */

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

/* Each entry's buffers: a page holding the header, then the payload. The header page's end (past
   the header) takes the request rebuilt in /dev/fuse's layout (in_header, then the first
   argument) right before the payload, so the payload is never copied. ring.c asserts it fits. */
enum { CFUSE_RING_HEADER_PAGE = 4096 };

struct cfuse_ring_entry {
    struct cfuse_uring_req_header *header;
    void *payload;
    size_t payload_size;
    struct iovec iov[2];
    unsigned last_cmd;
};

/* One worker's io_uring, its entries and the eventfd whose poll ends its wait. Opaque. */
struct cfuse_ring_queue;

/* Whether this process may use io_uring at all (kernel.io_uring_disabled, seccomp): 0 or -errno. */
int cfuse_uring_probe(void);
/* Sets up a ring and `count` entries with payload buffers of `payload_size` bytes (page multiple)
   for queue `qid` of the FUSE connection on `fuse_fd`. 0 or -errno; on failure nothing is left. */
int cfuse_ring_queue_new(struct cfuse_ring_queue **out, int fuse_fd, unsigned qid, unsigned count, size_t payload_size);
void cfuse_ring_queue_free(struct cfuse_ring_queue *q);
unsigned cfuse_ring_queue_count(const struct cfuse_ring_queue *q);
/* Registers every entry and arms the stop poll, from the thread that will serve them. 0, or the
   first error the kernel answered at once. */
int cfuse_ring_queue_register(struct cfuse_ring_queue *q);
/* Queues the commit of the reply in `e` with the fetch of its next request, sent by the next
   wait. When the submission ring is full it is flushed to the kernel first; 0 or -errno (the
   entry is then lost to the queue: the caller must count it gone). */
int cfuse_ring_queue_commit(struct cfuse_ring_queue *q, struct cfuse_ring_entry *e, uint64_t commit_id);
/* Sends an entry's last command again (the kernel answered EAGAIN or EINTR); as commit. */
int cfuse_ring_queue_retry(struct cfuse_ring_queue *q, struct cfuse_ring_entry *e);
/* Sends what was queued and waits for at least one completion; fills up to `max` (entry, result)
   pairs (entry NULL: the stop poll fired) and returns how many, or -errno. */
int cfuse_ring_queue_wait(struct cfuse_ring_queue *q, struct cfuse_ring_entry **entries, int *results, unsigned max);
/* Ends the queue thread's wait (from any thread). */
void cfuse_ring_queue_stop(struct cfuse_ring_queue *q);

#endif
