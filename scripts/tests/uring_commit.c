// uring_commit: answers a request a dead FUSE-over-io_uring server left in one of its ring
// entries, from another process (scripts/tests/uring.sh, takeover_uring_kernel; docs/takeover.md
// "io_uring"). The kernel finds the request by its unique on the queue's processing list
// (FUSE_IO_URING_CMD_COMMIT_AND_FETCH, fs/fuse/dev_uring.c) and reads the reply from the entry's
// header address as the dead server registered it, in the committing process's memory: so this
// maps a page at that address, writes an error reply there, and commits it on a /dev/fuse file
// taken from the keeper (pidfd_getfd: the same open file). The entry then belongs to this
// process's io_uring; it is cancelled when this exits.
//   gcc -O2 -Wall -o uring_commit scripts/tests/uring_commit.c
//   uring_commit KEEPER_PID QID UNIQUE HEADER_ADDR_HEX ERRNO
// Prints "committed" (exit 0) or what the kernel said (exit 1).
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

struct out_header { uint32_t len; int32_t error; uint64_t unique; };
struct ent_in_out { uint64_t flags, commit_id; uint32_t payload_sz, padding; uint64_t reserved; };
struct cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };
enum { IN_OUT_SZ = 128, OP_IN_OUT_SZ = 128, CMD_COMMIT_AND_FETCH = 2 };

static int fuse_fd_of(int pid) {
    char dir[64], path[PATH_MAX + 64], target[PATH_MAX];
    snprintf(dir, sizeof dir, "/proc/%d/fd", pid);
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d)) && found < 0) {
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n > 0) { target[n] = 0; if (strcmp(target, "/dev/fuse") == 0) found = atoi(e->d_name); }
    }
    closedir(d);
    return found;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: %s KEEPER_PID QID UNIQUE HEADER_ADDR_HEX ERRNO\n", argv[0]); return 2; }
    int keeper = atoi(argv[1]);
    unsigned qid = (unsigned)atoi(argv[2]);
    uint64_t unique = strtoull(argv[3], NULL, 10);
    uintptr_t header = (uintptr_t)strtoull(argv[4], NULL, 16);
    int error = atoi(argv[5]);
    int theirs = fuse_fd_of(keeper);
    if (theirs < 0) { fprintf(stderr, "no /dev/fuse descriptor in process %d\n", keeper); return 1; }
    int pidfd = (int)syscall(SYS_pidfd_open, keeper, 0);
    int fuse = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, theirs, 0);
    if (fuse < 0) { fprintf(stderr, "pidfd_getfd: %s\n", strerror(errno)); return 1; }

    // The reply where the dead server's entry had its header: out header, then payload size 0.
    void *page = mmap((void *)header, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (page == MAP_FAILED || (uintptr_t)page != header) { fprintf(stderr, "cannot map 0x%lx: %s\n", (unsigned long)header, strerror(errno)); return 1; }
    struct out_header out = { sizeof out, -error, unique };
    memcpy(page, &out, sizeof out);
    struct ent_in_out io = { 0, unique, 0, 0, 0 };
    memcpy((char *)page + IN_OUT_SZ + OP_IN_OUT_SZ, &io, sizeof io);

    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SQE128;
    int ring = (int)syscall(SYS_io_uring_setup, 4, &p);
    if (ring < 0) { fprintf(stderr, "io_uring_setup: %s\n", strerror(errno)); return 1; }
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (cq_size > sq_size) sq_size = cq_size;
    char *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *sqes = mmap(NULL, p.sq_entries * 128, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || sqes == MAP_FAILED || !(p.features & IORING_FEAT_SINGLE_MMAP)) { fprintf(stderr, "cannot map the ring\n"); return 1; }
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)(void *)sqes;
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse;
    sqe->cmd_op = CMD_COMMIT_AND_FETCH;
    sqe->user_data = 1;
    struct cmd_req req = { 0, unique, (uint16_t)qid, {0} };
    memcpy(sqe->cmd, &req, sizeof req);
    unsigned *tail = (unsigned *)(void *)(sq + p.sq_off.tail), *array = (unsigned *)(void *)(sq + p.sq_off.array);
    array[0] = 0;
    __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
    int rc = (int)syscall(SYS_io_uring_enter, ring, 1, 0, 0, NULL, 0);
    if (rc != 1) { fprintf(stderr, "io_uring_enter: %d %s\n", rc, strerror(errno)); return 1; }
    // A refused commit completes at once; an accepted one stays queued (the entry waits for the
    // next request): a short wait tells the two apart.
    usleep(200 * 1000);
    unsigned *cq_head = (unsigned *)(void *)(sq + p.cq_off.head), *cq_tail = (unsigned *)(void *)(sq + p.cq_off.tail);
    if (*cq_head != __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE)) {
        struct io_uring_cqe *cqe = (struct io_uring_cqe *)(void *)(sq + p.cq_off.cqes);
        int res = cqe[*cq_head & *(unsigned *)(void *)(sq + p.cq_off.ring_mask)].res;
        if (res < 0) { printf("refused: %s\n", strerror(-res)); return 1; }
        printf("committed, and a request came to the entry (res %d): failed with EFAULT here\n", res);
        return 0;
    }
    printf("committed\n");
    return 0;
}
