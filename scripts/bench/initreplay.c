/*
 * initreplay: can a fresh libfuse 3.14 session take over a FUSE connection whose INIT another
 * process answered, and what does libfuse itself cost per request? The evidence behind
 * docs/protocol.md.
 *
 * No mount and no /dev/fuse: the session's custom I/O hooks stand in for the kernel. A saved
 * INIT request (as the kernel sent it, protocol 7.38 with FUSE_INIT_EXT) is fed to
 * fuse_session_process_buf, its reply is taken by the writev hook and dropped (the kernel had
 * its answer from the first daemon); then GETATTR requests for a node id the session never
 * looked up are fed the same way. The takeover works if each GETATTR is answered with error 0
 * (libfuse answers EIO to anything before INIT) and with the node id asked for (libfuse keeps
 * no node table in its low-level API). Then N GETATTRs are timed: decode, handler, encode,
 * hook, the whole of libfuse's part of a round trip, in process.
 *
 * Usage: initreplay [N]     (default 1,000,000)
 * Build: cc -O2 -o initreplay scripts/bench/initreplay.c $(pkg-config --cflags --libs fuse3)
 */
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>

static unsigned long replies, errors, wrong_ino, inits;
static uint64_t asked_ino;

static void op_init(void *userdata, struct fuse_conn_info *conn) { (void)userdata; (void)conn; inits++; }

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    memset(&st, 0, sizeof st);
    st.st_ino = ino;
    st.st_mode = S_IFREG | 0644;
    st.st_nlink = 1;
    fuse_reply_attr(req, &st, 3600.0);
}

static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)fd; (void)userdata;
    size_t total = 0;
    for (int i = 0; i < count; i++) total += iov[i].iov_len;
    const struct fuse_out_header *out = iov[0].iov_base;
    replies++;
    if (out->error != 0) errors++;
    if (count > 1 && out->error == 0 && iov[1].iov_len >= sizeof(struct fuse_attr_out)) {
        const struct fuse_attr_out *attr = iov[1].iov_base;
        if (attr->attr.ino != asked_ino && asked_ino != 0) wrong_ino++;
    }
    return (ssize_t)total;
}

static ssize_t hook_read(int fd, void *buf, size_t len, void *userdata) { (void)fd; (void)buf; (void)len; (void)userdata; return -1; }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    struct fuse_lowlevel_ops ops;
    memset(&ops, 0, sizeof ops);
    ops.init = op_init;
    ops.getattr = op_getattr;
    char *args_v[] = { "initreplay", NULL };
    struct fuse_args args = FUSE_ARGS_INIT(1, args_v);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (se == NULL) { fprintf(stderr, "initreplay: fuse_session_new failed\n"); return 1; }
    struct fuse_custom_io io;
    memset(&io, 0, sizeof io);
    io.writev = hook_writev;
    io.read = hook_read;
    if (fuse_session_custom_io(se, &io, eventfd(0, EFD_CLOEXEC)) != 0) { fprintf(stderr, "initreplay: custom io refused\n"); return 1; }

    /* Before INIT: libfuse refuses requests (EIO), as it must. */
    struct { struct fuse_in_header h; struct fuse_getattr_in a; } get;
    memset(&get, 0, sizeof get);
    get.h.len = sizeof get;
    get.h.opcode = FUSE_GETATTR;
    get.h.unique = 100;
    get.h.nodeid = asked_ino = 123456;
    struct fuse_buf buf = { .size = sizeof get, .mem = &get, .fd = -1 };
    fuse_session_process_buf(se, &buf);
    unsigned long refused_before_init = errors;

    /* The saved INIT, as a 6.x kernel sends it. */
    struct { struct fuse_in_header h; struct fuse_init_in i; } init;
    memset(&init, 0, sizeof init);
    init.h.len = sizeof init;
    init.h.opcode = FUSE_INIT;
    init.h.unique = 2;
    init.i.major = FUSE_KERNEL_VERSION;
    init.i.minor = 38;
    init.i.max_readahead = 1 << 20;
    init.i.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DONT_MASK | FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO |
                   FUSE_PARALLEL_DIROPS | FUSE_HANDLE_KILLPRIV_V2 | FUSE_INIT_EXT | FUSE_MAX_PAGES;
    buf.mem = &init;
    buf.size = sizeof init;
    errors = 0;
    fuse_session_process_buf(se, &buf);
    unsigned long init_errors = errors;

    /* After it: a node id this session never handed out is served. */
    errors = 0;
    buf.mem = &get;
    buf.size = sizeof get;
    replies = 0;
    double start = now();
    for (long k = 0; k < n; k++) {
        get.h.unique = 1000 + (uint64_t)k;
        fuse_session_process_buf(se, &buf);
    }
    double took = now() - start;
    printf("before INIT: %lu of 1 GETATTR refused\n", refused_before_init);
    printf("INIT replayed: init callback %lu, reply errors %lu (reply dropped by the hook)\n", inits, init_errors);
    printf("after INIT: %lu GETATTR replies, %lu errors, %lu with a wrong node id\n", replies, errors, wrong_ino);
    printf("libfuse per request (decode, handler, encode, hook): %.0f ns\n", took / (double)n * 1e9);
    fuse_session_destroy(se);
    return refused_before_init == 1 && inits == 1 && init_errors == 0 && errors == 0 && wrong_ino == 0 && replies == (unsigned long)n ? 0 : 1;
}
