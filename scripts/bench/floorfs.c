/*
 * floorfs: the cheapest FUSE file system that can serve fio's 4 KiB random write and read jobs,
 * as a reference for what the FUSE round trip itself costs on this machine.
 *
 * Every name in the root is the same regular file, kept in one memfd: no inodes, no locks, no
 * permissions, no xattrs (getxattr is not implemented, so the kernel never asks before a write),
 * no charging. libfuse's low-level API, the same options chargefs uses (1 MiB requests,
 * keep_cache, no auto_inval_data), single-threaded. Not a file system to use: a floor to
 * measure against (scripts/bench.sh prints it beside chargefs).
 *
 * Usage: floorfs MOUNTPOINT   (foreground; unmount to stop)
 * Built by scripts/bench.sh with cc at run time.
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_INO 2
#define MAX_SIZE (4LL << 30)

static int data_fd = -1;
static char *data_map;
static off_t file_size;

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
        fi->keep_cache = 1;
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
    fi->keep_cache = 1;
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

static const struct fuse_lowlevel_ops ops = {
    .init = ff_init, .lookup = ff_lookup, .getattr = ff_getattr, .setattr = ff_setattr,
    .open = ff_open, .create = ff_create, .read = ff_read, .write = ff_write,
    .unlink = ff_unlink, .release = ff_release,
};

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: floorfs MOUNTPOINT\n");
        return 2;
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
        if (fuse_session_mount(se, argv[1]) == 0) {
            rc = fuse_session_loop(se) == 0 ? 0 : 1;
            fuse_session_unmount(se);
        }
        fuse_remove_signal_handlers(se);
    }
    fuse_session_destroy(se);
    return rc;
}
