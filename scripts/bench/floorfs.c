/*
 * floorfs: the cheapest FUSE file system that can serve fio's 4 KiB random write and read jobs,
 * as a reference for what the FUSE round trip itself costs on this machine.
 *
 * Every name in the root is the same regular file, kept in one memfd: no inodes, no locks, no
 * permissions, no xattrs (getxattr is not implemented, so the kernel never asks before a write),
 * no charging. libfuse's low-level API, the same options chargefs uses by default (1 MiB
 * requests, direct I/O on every open, no auto_inval_data), single-threaded. Not a file system
 * to use: a floor to measure against (scripts/bench.sh prints it beside chargefs).
 *
 * --passthrough: read-only opens are handed to the kernel (FUSE passthrough, Linux 6.9+), which
 * then reads the memfd itself and never asks the daemon: what reads would cost if chargefs kept
 * each file in a file of its own. libfuse 3.14 knows nothing of passthrough, so its custom I/O
 * hooks add FUSE_PASSTHROUGH to the INIT reply and a backing file to each read-only OPEN reply.
 * Needs CAP_SYS_ADMIN. The kernel then reads up to the memfd's size (4 GiB), not the file's: a
 * read past the end sees zeros, which fio never asks for.
 *
 * --splice: libfuse's zero-copy paths, to show what splice allows: requests are spliced from
 * /dev/fuse into a pipe (FUSE_CAP_SPLICE_READ), a WRITE's data goes from that pipe into the
 * memfd by splice (write_buf, FUSE_BUF_SPLICE_MOVE) without passing through the daemon's memory,
 * and a READ's reply is spliced from the memfd through a pipe into /dev/fuse (fuse_reply_data,
 * FUSE_CAP_SPLICE_WRITE and FUSE_CAP_SPLICE_MOVE). Not combined with --passthrough.
 *
 * Usage: floorfs [--passthrough | --splice] MOUNTPOINT   (foreground; unmount to stop)
 * Built by scripts/bench.sh with cc at run time.
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <errno.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define FILE_INO 2
#define MAX_SIZE (4LL << 30)

static int data_fd = -1, use_splice;
static char *data_map;
static off_t file_size;

/* FUSE passthrough (protocol 7.40), newer than the installed <linux/fuse.h> */
#define INIT_PASSTHROUGH (1ULL << 37)
#define OPEN_PASSTHROUGH (1u << 7)
struct backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
#define DEV_IOC_BACKING_OPEN _IOW(229, 1, struct backing_map)

/* single-threaded loop: the hooks see one request at a time */
static uint64_t init_unique, init_offered, open_unique = UINT64_MAX;
static int open_read_only, backing_id;

static ssize_t hook_read(int fd, void *buf, size_t len, void *userdata) {
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    if (n < (ssize_t)sizeof(struct fuse_in_header)) return n;
    const struct fuse_in_header *h = buf;
    if (h->opcode == FUSE_INIT && n >= (ssize_t)(sizeof *h + 20)) {
        const uint32_t *in = (const uint32_t *)(h + 1);  /* major, minor, max_readahead, flags, flags2 */
        init_unique = h->unique;
        init_offered = in[3] | ((in[3] & FUSE_INIT_EXT) ? (uint64_t)in[4] << 32 : 0);
    } else if (h->opcode == FUSE_OPEN && n >= (ssize_t)(sizeof *h + sizeof(struct fuse_open_in))) {
        const struct fuse_open_in *in = (const void *)(h + 1);
        open_unique = h->unique;
        open_read_only = (in->flags & O_ACCMODE) == O_RDONLY;
    }
    return n;
}

static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    const struct fuse_out_header *h = iov[0].iov_base;
    if (count >= 2 && h->error == 0 && h->unique == init_unique && iov[1].iov_len >= 40) {
        if (!(init_offered & INIT_PASSTHROUGH)) {
            fprintf(stderr, "floorfs: the kernel does not offer FUSE passthrough\n");
        } else {
            uint32_t *out = iov[1].iov_base;  /* flags at [3], flags2 at [8], max_stack_depth at [9] */
            out[3] |= FUSE_INIT_EXT;
            out[8] |= (uint32_t)(INIT_PASSTHROUGH >> 32);
            out[9] = 1;  /* the backing memfd is on tmpfs, stacking depth 0 */
            fprintf(stderr, "floorfs: passthrough negotiated\n");
        }
    } else if (count >= 2 && h->error == 0 && h->unique == open_unique && open_read_only) {
        if (backing_id == 0) {
            struct backing_map map = { .fd = data_fd };
            backing_id = ioctl(fd, DEV_IOC_BACKING_OPEN, &map);
            if (backing_id <= 0) perror("floorfs: FUSE_DEV_IOC_BACKING_OPEN");
        }
        if (backing_id > 0) {
            struct fuse_open_out *out = iov[1].iov_base;
            out->open_flags = (out->open_flags & ~FOPEN_DIRECT_IO) | OPEN_PASSTHROUGH;
            out->padding = (uint32_t)backing_id;  /* backing_id in 7.40 */
        }
    }
    return writev(fd, iov, count);
}

static void attr_of(fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0777;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0666;
        st->st_nlink = 1;
        st->st_size = file_size;
        st->st_blocks = (file_size + 511) / 512;
    }
}

static void reply_file_entry(fuse_req_t req, struct fuse_file_info *fi) {
    struct fuse_entry_param e = { .ino = FILE_INO, .attr_timeout = 3600, .entry_timeout = 3600 };
    attr_of(FILE_INO, &e.attr);
    if (fi) {
        fi->direct_io = 1;
        fuse_reply_create(req, &e, fi);
    } else {
        fuse_reply_entry(req, &e);
    }
}

static void ff_init(void *userdata, struct fuse_conn_info *conn) {
    (void)userdata;
    conn->max_write = 1 << 20;
    conn->max_readahead = 1 << 20;
    conn->want &= ~(FUSE_CAP_AUTO_INVAL_DATA | FUSE_CAP_WRITEBACK_CACHE);
    if (use_splice) {
        unsigned want = FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE;
        if ((conn->capable & want) != want)
            fprintf(stderr, "floorfs: splice not offered (capable %#x)\n", conn->capable & want);
        conn->want |= conn->capable & want;
        if (conn->want & FUSE_CAP_SPLICE_READ) fprintf(stderr, "floorfs: splice negotiated\n");
    }
}

static void ff_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    (void)name;
    if (parent != FUSE_ROOT_ID) { fuse_reply_err(req, ENOENT); return; }
    reply_file_entry(req, NULL);
}

static void ff_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    attr_of(ino, &st);
    fuse_reply_attr(req, &st, 3600);
}

static void ff_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
    (void)fi;
    if (ino == FILE_INO && (to_set & FUSE_SET_ATTR_SIZE)) {
        if (attr->st_size < 0 || attr->st_size > MAX_SIZE) { fuse_reply_err(req, EFBIG); return; }
        file_size = attr->st_size;
    }
    ff_getattr(req, ino, NULL);
}

static void ff_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    if (fi->flags & O_TRUNC) file_size = 0;
    fi->direct_io = 1;
    fuse_reply_open(req, fi);
}

static void ff_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
    (void)parent; (void)name; (void)mode;
    reply_file_entry(req, fi);
}

static void ff_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    if (off >= file_size) { fuse_reply_buf(req, NULL, 0); return; }
    if ((off_t)size > file_size - off) size = (size_t)(file_size - off);
    fuse_reply_buf(req, data_map + off, size);
}

/* --splice: the reply's data spliced from the memfd (libfuse moves it through a pipe). */
static void ff_read_splice(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    if (off >= file_size) { fuse_reply_buf(req, NULL, 0); return; }
    if ((off_t)size > file_size - off) size = (size_t)(file_size - off);
    struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);
    bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    bv.buf[0].fd = data_fd;
    bv.buf[0].pos = off;
    fuse_reply_data(req, &bv, FUSE_BUF_SPLICE_MOVE);
}

/* --splice: a WRITE's data still in libfuse's pipe goes into the memfd by splice. */
static void ff_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *in, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    size_t size = fuse_buf_size(in);
    if (off < 0 || off + (off_t)size > MAX_SIZE) { fuse_reply_err(req, EFBIG); return; }
    struct fuse_bufvec out = FUSE_BUFVEC_INIT(size);
    out.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    out.buf[0].fd = data_fd;
    out.buf[0].pos = off;
    ssize_t n = fuse_buf_copy(&out, in, FUSE_BUF_SPLICE_MOVE);
    if (n < 0) { fuse_reply_err(req, (int)-n); return; }
    if (off + n > file_size) file_size = off + n;
    fuse_reply_write(req, (size_t)n);
}

static void ff_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    if (off < 0 || off + (off_t)size > MAX_SIZE) { fuse_reply_err(req, EFBIG); return; }
    ssize_t n = pwrite(data_fd, buf, size, off);
    if (n < 0) { fuse_reply_err(req, errno); return; }
    if (off + n > file_size) file_size = off + n;
    fuse_reply_write(req, (size_t)n);
}

static void ff_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
    (void)parent; (void)name;
    file_size = 0;
    fallocate(data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MAX_SIZE);
    fuse_reply_err(req, 0);
}

static void ff_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static struct fuse_lowlevel_ops ops = {
    .init = ff_init, .lookup = ff_lookup, .getattr = ff_getattr, .setattr = ff_setattr,
    .open = ff_open, .create = ff_create, .read = ff_read, .write = ff_write,
    .unlink = ff_unlink, .release = ff_release,
};

int main(int argc, char **argv) {
    int passthrough = argc == 3 && strcmp(argv[1], "--passthrough") == 0;
    use_splice = argc == 3 && strcmp(argv[1], "--splice") == 0;
    if (argc != 2 + passthrough + use_splice) {
        fprintf(stderr, "usage: floorfs [--passthrough | --splice] MOUNTPOINT\n");
        return 2;
    }
    const char *mountpoint = argv[argc - 1];
    if (use_splice) {
        ops.read = ff_read_splice;
        ops.write_buf = ff_write_buf;  /* libfuse splices requests in only for a write_buf */
    }
    data_fd = memfd_create("floorfs", MFD_CLOEXEC);
    if (data_fd < 0 || ftruncate(data_fd, MAX_SIZE) != 0) { perror("floorfs: memfd"); return 1; }
    data_map = mmap(NULL, MAX_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, data_fd, 0);
    if (data_map == MAP_FAILED) { perror("floorfs: mmap"); return 1; }
    char *fargv[] = { argv[0], "-o", "fsname=floorfs,subtype=floorfs,default_permissions", NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (!se) return 1;
    int rc = 1;
    if (fuse_set_signal_handlers(se) == 0) {
        if (fuse_session_mount(se, mountpoint) == 0) {
            struct fuse_custom_io io = { .read = hook_read, .writev = hook_writev };
            if (!passthrough || fuse_session_custom_io(se, &io, fuse_session_fd(se)) == 0)
                rc = fuse_session_loop(se) == 0 ? 0 : 1;
            fuse_session_unmount(se);
        }
        fuse_remove_signal_handlers(se);
    }
    fuse_session_destroy(se);
    return rc;
}
