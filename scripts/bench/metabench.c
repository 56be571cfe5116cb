/*
 * metabench: metadata operations on one directory, timed.
 * Usage: metabench OP DIR N
 *   create  : N x (open(O_CREAT|O_EXCL) + write 4 KiB + close), files f0..f(N-1)
 *   mkempty : N x (open(O_CREAT|O_EXCL) + close), empty files
 *   stat    : N x stat of f0..f(N-1)
 *   unlink  : N x unlink of f0..f(N-1)
 *   readdir : readdir of DIR plus an lstat (lookup) of every entry; N is the expected count
 * Prints one line: "OP N SECONDS OPS_PER_SEC US_PER_OP". Exits 1 on any error.
 * Built by scripts/bench.sh with cc at run time.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fail(const char *what, const char *path) {
    fprintf(stderr, "metabench: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: metabench create|mkempty|stat|unlink|readdir DIR N\n");
        return 2;
    }
    const char *op = argv[1], *dir = argv[2];
    long n = strtol(argv[3], NULL, 10);
    if (n <= 0) {
        fprintf(stderr, "metabench: N must be positive\n");
        return 2;
    }
    if (chdir(dir) != 0) fail("chdir", dir);
    static char buf[4096];
    memset(buf, 'x', sizeof buf);
    char name[64];
    long done = 0;
    double t0 = now();
    if (strcmp(op, "create") == 0 || strcmp(op, "mkempty") == 0) {
        int data = op[0] == 'c';
        for (long i = 0; i < n; i++, done++) {
            snprintf(name, sizeof name, "f%ld", i);
            int fd = open(name, O_WRONLY | O_CREAT | O_EXCL, 0644);
            if (fd < 0) fail("open", name);
            if (data && write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) fail("write", name);
            if (close(fd) != 0) fail("close", name);
        }
    } else if (strcmp(op, "stat") == 0) {
        struct stat st;
        for (long i = 0; i < n; i++, done++) {
            snprintf(name, sizeof name, "f%ld", i);
            if (stat(name, &st) != 0) fail("stat", name);
        }
    } else if (strcmp(op, "unlink") == 0) {
        for (long i = 0; i < n; i++, done++) {
            snprintf(name, sizeof name, "f%ld", i);
            if (unlink(name) != 0) fail("unlink", name);
        }
    } else if (strcmp(op, "readdir") == 0) {
        DIR *d = opendir(".");
        if (!d) fail("opendir", dir);
        struct dirent *e;
        struct stat st;
        errno = 0;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.' && (e->d_name[1] == 0 || (e->d_name[1] == '.' && e->d_name[2] == 0)))
                continue;
            if (lstat(e->d_name, &st) != 0) fail("lstat", e->d_name);
            done++;
            errno = 0;
        }
        if (errno != 0) fail("readdir", dir);
        closedir(d);
        if (done != n) {
            fprintf(stderr, "metabench: readdir found %ld entries, expected %ld\n", done, n);
            return 1;
        }
    } else {
        fprintf(stderr, "metabench: unknown op %s\n", op);
        return 2;
    }
    double secs = now() - t0;
    printf("%s %ld %.6f %.1f %.3f\n", op, done, secs, done / secs, secs * 1e6 / done);
    return 0;
}
