// FUSE over io_uring: a minimal io_uring client (see CFuseTransport.h). io_uring itself through
// its three system calls and <linux/io_uring.h> (6.1 has SQE128 and IORING_OP_URING_CMD):
// liburing ships its own copy of that header, which clashes with the one swift-system imports.
#include "CFuseTransport.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>

enum { CFUSE_IO_URING_CMD_REGISTER = 1, CFUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2 };
struct cfuse_uring_cmd_req {  /* struct fuse_uring_cmd_req, in the SQE's 80-byte command area */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};
_Static_assert(sizeof(struct cfuse_uring_cmd_req) == 24, "fuse_uring_cmd_req");
_Static_assert(sizeof(struct cfuse_uring_req_header) == 288, "fuse_uring_req_header");

/* The layout the kernel and UringQueue.swift share, asserted rather than assumed. */
_Static_assert(offsetof(struct cfuse_uring_req_header, op_in) == CFUSE_URING_IN_OUT_HEADER_SZ, "op_in follows in_out");
_Static_assert(offsetof(struct cfuse_uring_req_header, ring_ent_in_out) ==
               CFUSE_URING_IN_OUT_HEADER_SZ + CFUSE_URING_OP_IN_OUT_SZ, "ring_ent_in_out follows op_in");
_Static_assert(offsetof(struct cfuse_uring_ent_in_out, commit_id) == 8, "fuse_uring_ent_in_out.commit_id");
_Static_assert(offsetof(struct cfuse_uring_ent_in_out, payload_sz) == 16, "fuse_uring_ent_in_out.payload_sz");
_Static_assert(sizeof(struct cfuse_uring_ent_in_out) == 32, "fuse_uring_ent_in_out");
_Static_assert(sizeof(struct fuse_in_header) <= CFUSE_URING_IN_OUT_HEADER_SZ, "in_header fits in_out");
_Static_assert(sizeof(struct fuse_out_header) <= CFUSE_URING_IN_OUT_HEADER_SZ, "out_header fits in_out");
/* The request rebuilt before the payload (in_header, then at most op_in's bytes) must fit in the
   header page after the header: it must never overwrite the header the kernel wrote. */
_Static_assert(sizeof(struct cfuse_uring_req_header) + sizeof(struct fuse_in_header) + CFUSE_URING_OP_IN_OUT_SZ
               <= CFUSE_RING_HEADER_PAGE, "the rebuilt request fits the header page");
_Static_assert(CFUSE_RING_HEADER_PAGE % 4096 == 0, "payloads start page-aligned");


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

static void cfuse_uring_exit(struct cfuse_uring *r) {
    if (r->sqes) munmap(r->sqes, r->sqes_size);
    if (r->cq_map && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_size);
    if (r->sq_map) munmap(r->sq_map, r->sq_map_size);
    if (r->fd >= 0) close(r->fd);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

static int cfuse_uring_init(struct cfuse_uring *r, unsigned entries, unsigned cq_entries) {
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

static struct io_uring_sqe *cfuse_uring_get_sqe(struct cfuse_uring *r) {
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sqe_tail - head >= r->sq_entries) return NULL;
    unsigned index = r->sqe_tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(void *)(r->sqes + (size_t)index * 128);
    memset(sqe, 0, 128);
    r->sq_array[index] = index;
    r->sqe_tail++;
    return sqe;
}

int cfuse_uring_probe(void) {
    struct cfuse_uring r;
    int rc = cfuse_uring_init(&r, 2, 4);
    if (rc == 0) cfuse_uring_exit(&r);
    return rc;
}

/* Publishes queued SQEs and enters the kernel: submits them and waits for `wait` completions. */
static int cfuse_uring_submit_and_wait(struct cfuse_uring *r, unsigned wait) {
    __atomic_store_n(r->sq_tail, r->sqe_tail, __ATOMIC_RELEASE);
    unsigned to_submit = r->sqe_tail - r->sqe_submitted;
    int rc = (int)syscall(__NR_io_uring_enter, r->fd, to_submit, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    if (rc < 0) return -errno;
    r->sqe_submitted += (unsigned)rc;
    return rc;
}

static void cfuse_ring_prep(struct cfuse_ring_queue *q, struct io_uring_sqe *sqe, struct cfuse_ring_entry *e,
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

static void cfuse_ring_queue_destroy(struct cfuse_ring_queue *q) {
    cfuse_uring_exit(&q->ring);
    if (q->stop_fd >= 0) close(q->stop_fd);
    q->stop_fd = -1;
    if (q->buffers) munmap(q->buffers, q->buffers_size);
    q->buffers = NULL;
    free(q->entries);
    q->entries = NULL;
}

static int cfuse_ring_queue_init(struct cfuse_ring_queue *q, int fuse_fd, unsigned qid, unsigned count, size_t payload_size) {
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
    size_t page = CFUSE_RING_HEADER_PAGE, per = page + payload_size;
    q->buffers_size = per * count;
    void *buffers = mmap(NULL, q->buffers_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q->entries == NULL || buffers == MAP_FAILED) { cfuse_ring_queue_destroy(q); return -ENOMEM; }
    q->buffers = buffers;
    /* Requests' payloads (a WRITE's data) and replies (a READ's) pass through these buffers: out of
       a crashed server's core dump, as libfuse's request buffers are (pool.c). */
    if (madvise(buffers, q->buffers_size, MADV_DONTDUMP) != 0) { rc = -errno; cfuse_ring_queue_destroy(q); return rc; }
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

/* A register the kernel refuses completes during the submit. */
int cfuse_ring_queue_register(struct cfuse_ring_queue *q) {
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

/* A free SQE; when the submission ring is full, what is queued goes to the kernel first (without
   waiting), which frees its slots. NULL only if the kernel takes none of them. */
static struct io_uring_sqe *cfuse_ring_sqe(struct cfuse_uring *r) {
    struct io_uring_sqe *sqe = cfuse_uring_get_sqe(r);
    if (sqe != NULL) return sqe;
    for (int tries = 0; tries < 3 && sqe == NULL; tries++) {
        int rc = cfuse_uring_submit_and_wait(r, 0);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) return NULL;
        sqe = cfuse_uring_get_sqe(r);
    }
    return sqe;
}

int cfuse_ring_queue_commit(struct cfuse_ring_queue *q, struct cfuse_ring_entry *e, uint64_t commit_id) {
    struct io_uring_sqe *sqe = cfuse_ring_sqe(&q->ring);
    if (sqe == NULL) return -EBUSY;
    cfuse_ring_prep(q, sqe, e, CFUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id);
    return 0;
}

int cfuse_ring_queue_wait(struct cfuse_ring_queue *q, struct cfuse_ring_entry **entries, int *results, unsigned max) {
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

int cfuse_ring_queue_retry(struct cfuse_ring_queue *q, struct cfuse_ring_entry *e) {
    struct io_uring_sqe *sqe = cfuse_ring_sqe(&q->ring);
    if (sqe == NULL) return -EBUSY;
    uint64_t commit_id = e->header->ring_ent_in_out.commit_id;
    cfuse_ring_prep(q, sqe, e, e->last_cmd, e->last_cmd == CFUSE_IO_URING_CMD_REGISTER ? 0 : commit_id);
    return 0;
}

void cfuse_ring_queue_stop(struct cfuse_ring_queue *q) {
    uint64_t one = 1;
    if (q->stop_fd >= 0) (void)!write(q->stop_fd, &one, sizeof one);
}

int cfuse_ring_queue_new(struct cfuse_ring_queue **out, int fuse_fd, unsigned qid, unsigned count, size_t payload_size) {
    *out = NULL;
    struct cfuse_ring_queue *q = malloc(sizeof *q);
    if (q == NULL) return -ENOMEM;
    int rc = cfuse_ring_queue_init(q, fuse_fd, qid, count, payload_size);
    if (rc != 0) { free(q); return rc; }
    *out = q;
    return 0;
}

void cfuse_ring_queue_free(struct cfuse_ring_queue *q) {
    if (q == NULL) return;
    cfuse_ring_queue_destroy(q);
    free(q);
}

unsigned cfuse_ring_queue_count(const struct cfuse_ring_queue *q) { return q->count; }
