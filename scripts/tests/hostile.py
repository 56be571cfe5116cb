#!/usr/bin/env python3
"""Hostile-input checks for hostile.sh.

  hostile.py compare CASE CHARGEFS_DIR TMPFS_DIR
      Runs one case against both directories (a chargefs mount and a kernel tmpfs) and compares
      every outcome (result or errno name). Prints the differences; exit 1 if any, or if a
      chargefs-only expectation fails.  CASE: names deep sizes zero holes xattrs links renames
  hostile.py fuzzbin BIN MNT COUNT SEED [MEMCG]
      Runs the real daemon COUNT times with generated hostile arguments (background mode).
      Checks: no crash (signal), exit 0 => mounted (then unmounted), else one 'chargefsd: ' line
      on stderr and nothing mounted, no process left behind. Prints a summary; exit 1 on failure.
"""
import ctypes
import errno
import os
import random
import subprocess
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100


def ename(e):
    return errno.errorcode.get(e, str(e))


def outcome(fn, *args):
    """'ok' / 'ok:VALUE' / errno name."""
    try:
        r = fn(*args)
    except OSError as e:
        return ename(e.errno)
    except (OverflowError, ValueError) as e:
        return "py:" + type(e).__name__
    return "ok" if r is None else "ok:%s" % (r,)


def c_fallocate(fd, mode, off, length):
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def c_renameat2(a, b, flags):
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# Every case runs with the current directory at the mount root and returns [(label, outcome)].
# extra(): expectations that hold for chargefs alone (returned as a list of failure strings).

def case_names():
    out = []
    os.mkdir(b"n")
    names = [bytes([b]) for b in range(1, 256) if b != ord("/")]
    names += [b"\xff\xfe", b"\xc0\x80", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\xffb", b"\x1b[31m",
              b"-rf", b" ", b"  ", b"\n", b"\\", b"*?[", b"x" * 255, b"\xff" * 255, "é".encode() * 127 + b"x",
              b"y" * 256, b"\xff" * 256, b"z" * 1000]
    for n in names:
        p = b"n/" + n
        out.append((repr(n[:20]) + "/%d create" % len(n), outcome(lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)))))
    for n in [b".", b".."]:
        out.append((repr(n) + " create", outcome(lambda: os.close(os.open(b"n/" + n, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)))))
        out.append((repr(n) + " mkdir", outcome(os.mkdir, b"n/" + n)))
    listed = sorted(os.listdir(b"n"))
    out.append(("readdir count", str(len(listed))))
    out.append(("readdir names", str(hash(tuple(listed)))))
    for n in names[:40] + names[-19:]:
        out.append((repr(n[:20]) + "/%d stat" % len(n), outcome(lambda: os.lstat(b"n/" + n).st_size)))
        out.append((repr(n[:20]) + "/%d rename" % len(n), outcome(os.rename, b"n/" + n, b"n/" + n + b".r")))
        out.append((repr(n[:20]) + "/%d unlink" % len(n), outcome(os.unlink, b"n/" + n + b".r")))
    return out


def case_deep():
    out = []
    comp = b"d" * 200
    path = b"deep"
    os.mkdir(path)
    while len(path) < 4200:
        r = outcome(os.mkdir, path + b"/" + comp)
        if r == "ok":
            path = path + b"/" + comp
        out.append(("mkdir len %d" % (len(path) + 201), r))
        if r != "ok":
            break
    # files whose full relative path is 4094..4097 bytes long
    base = path
    while len(base) > 3700:
        base = os.path.dirname(base)
    for total in (4094, 4095, 4096, 4097):
        name = b"f" * (total - len(base) - 1)
        chunks = [name[i:i + 255] for i in range(0, len(name), 255)]
        p = base
        for c in chunks[:-1]:
            p += b"/" + c
            os.makedirs(p, exist_ok=True)
        p += b"/" + chunks[-1]
        out.append(("open path len %d" % len(p), outcome(lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)))))
        out.append(("stat path len %d" % len(p), outcome(lambda: os.stat(p).st_size)))
    # walking down by chdir works at any depth
    fd = os.open(".", os.O_RDONLY)
    try:
        depth = 0
        for c in path.split(b"/"):
            os.chdir(c)
            depth += 1
        out.append(("chdir depth", str(depth)))
        out.append(("getcwd ends with comp", str(os.getcwd().endswith(comp.decode()))))
    finally:
        os.fchdir(fd)
        os.close(fd)
    return out


def case_sizes():
    out = []
    big = 2 ** 63
    fd = os.open("s", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for label, fn in [
            ("pwrite 1 at 2^63-2", lambda: os.pwrite(fd, b"x", big - 2)),
            ("size", lambda: os.fstat(fd).st_size),
            ("pread 4 at 2^63-2", lambda: os.pread(fd, 4, big - 2)),
            ("pwrite 2 at 2^63-2", lambda: os.pwrite(fd, b"xy", big - 2)),
            ("pwrite 1 at 2^63-1", lambda: os.pwrite(fd, b"x", big - 1)),
            ("blocks", lambda: os.fstat(fd).st_blocks),
            ("seek end", lambda: os.lseek(fd, 0, os.SEEK_END)),
            ("seek data 0", lambda: os.lseek(fd, 0, os.SEEK_DATA)),
            ("ftruncate 2^63-1", lambda: os.ftruncate(fd, big - 1)),
            ("ftruncate 2^62", lambda: os.ftruncate(fd, 2 ** 62)),
            ("size2", lambda: os.fstat(fd).st_size),
            ("ftruncate 0", lambda: os.ftruncate(fd, 0)),
            ("fallocate 2^63-4096 +4096", lambda: c_fallocate(fd, 0, big - 4096, 4096)),
            ("fallocate 2^63-4096 +8192 (overflow)", lambda: c_fallocate(fd, 0, big - 4096, 8192)),
            ("fallocate 1 + 2^63-1 (overflow)", lambda: c_fallocate(fd, 0, 1, big - 1)),
            ("fallocate -1", lambda: c_fallocate(fd, 0, -1, 4096)),
            ("fallocate len -1", lambda: c_fallocate(fd, 0, 0, -1)),
            ("fallocate keep_size 2^62", lambda: c_fallocate(fd, 1, 2 ** 62, 4096)),
            ("fallocate punch 0 2^63-1", lambda: c_fallocate(fd, 3, 0, big - 1)),
            ("size3", lambda: os.fstat(fd).st_size),
            ("blocks3", lambda: os.fstat(fd).st_blocks),
            ("pwrite at -1", lambda: os.pwrite(fd, b"x", -1)),
        ]:
            out.append((label, outcome(fn)))
    finally:
        os.close(fd)
    out.append(("truncate path 2^63-1", outcome(os.truncate, "s", big - 1)))
    out.append(("unlink", outcome(os.unlink, "s")))
    return out


def case_zero():
    out = []
    fd = os.open("z", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"abc")
        for label, fn in [
            ("write 0", lambda: os.write(fd, b"")),
            ("pwrite 0 at 1 GiB", lambda: os.pwrite(fd, b"", 1 << 30)),
            ("size after empty pwrite", lambda: os.fstat(fd).st_size),
            ("read 0", lambda: len(os.pread(fd, 0, 0))),
            ("read past EOF", lambda: os.pread(fd, 10, 3)),
            ("read far past EOF", lambda: os.pread(fd, 10, 1 << 40)),
            ("read straddling EOF", lambda: os.pread(fd, 10, 1)),
            ("ftruncate same", lambda: os.ftruncate(fd, 3)),
            ("fallocate len 0", lambda: c_fallocate(fd, 0, 0, 0)),
            ("fsync", lambda: os.fsync(fd)),
            ("ftruncate 0", lambda: os.ftruncate(fd, 0)),
            ("read empty", lambda: os.pread(fd, 10, 0)),
            ("blocks", lambda: os.fstat(fd).st_blocks),
        ]:
            out.append((label, outcome(fn)))
    finally:
        os.close(fd)
    # chown(f, -1, -1) reaches chargefs as a SETATTR that sets nothing; tmpfs moves ctime on it
    # (pjdfstest chown/00.t). 20 ms apart: both clocks tick in ns.
    c0 = os.stat("z").st_ctime_ns
    time.sleep(0.02)
    out.append(("chown -1:-1", outcome(os.chown, "z", -1, -1)))
    out.append(("ctime moved by chown -1:-1", str(os.stat("z").st_ctime_ns != c0)))
    return out


def case_holes():
    out = []
    fd = os.open("h", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        out.append(("ftruncate 1 TiB", outcome(os.ftruncate, fd, 1 << 40)))
        out.append(("size", outcome(lambda: os.fstat(fd).st_size)))
        out.append(("blocks", outcome(lambda: os.fstat(fd).st_blocks)))
        out.append(("read in the middle", outcome(lambda: os.pread(fd, 8, 1 << 39) == b"\0" * 8)))
        out.append(("seek hole 0", outcome(os.lseek, fd, 0, os.SEEK_HOLE)))
        out.append(("seek data 0", outcome(os.lseek, fd, 0, os.SEEK_DATA)))
    finally:
        os.close(fd)
    return out


def case_xattrs():
    out = []
    open("x", "w").close()
    for label, fn in [
        ("name 255", lambda: os.setxattr("x", "user." + "a" * 250, b"v")),
        ("name 256", lambda: os.setxattr("x", "user." + "a" * 251, b"v")),
        ("value 65536", lambda: os.setxattr("x", "user.big", b"\xab" * 65536)),
        ("value 65537", lambda: os.setxattr("x", "user.big2", b"\xab" * 65537)),
        ("get 65536", lambda: len(os.getxattr("x", "user.big"))),
        ("get 255-name", lambda: os.getxattr("x", "user." + "a" * 250)),
        ("empty value", lambda: os.setxattr("x", "user.empty", b"")),
        ("get empty", lambda: os.getxattr("x", "user.empty")),
        ("binary name", lambda: os.setxattr("x", b"user.\xff\x01", b"1")),
        ("list", lambda: len(os.listxattr("x"))),
        ("remove big", lambda: os.removexattr("x", "user.big")),
        ("remove missing", lambda: os.removexattr("x", "user.nope")),
        ("no namespace", lambda: os.setxattr("x", "foo", b"1")),
        ("unknown namespace", lambda: os.setxattr("x", "bogus.foo", b"1")),
    ]:
        out.append((label, outcome(fn)))
    return out


def xattrs_many():
    """chargefs only: 2000 attributes of 100 bytes on one file, all listed and readable."""
    open("xm", "w").close()
    fails = []
    for i in range(2000):
        try:
            os.setxattr("xm", "user.attr%05d" % i, bytes([i % 256]) * 100)
        except OSError as e:
            fails.append("setxattr #%d: %s" % (i, ename(e.errno)))
            break
    names = os.listxattr("xm")
    if len(names) != 2000:
        fails.append("listxattr: %d names, expected 2000" % len(names))
    for i in (0, 999, 1999):
        if os.getxattr("xm", "user.attr%05d" % i) != bytes([i % 256]) * 100:
            fails.append("value %d differs" % i)
    for i in range(0, 2000, 2):
        os.removexattr("xm", "user.attr%05d" % i)
    if len(os.listxattr("xm")) != 1000:
        fails.append("after removing half: %d left" % len(os.listxattr("xm")))
    return fails


def case_links():
    out = []
    with open("l", "wb") as f:
        f.write(b"linked")
    os.mkdir("ld")
    n = 3000
    errs = set()
    for i in range(n):
        try:
            os.link("l", "ld/%05d" % i)
        except OSError as e:
            errs.add(ename(e.errno))
    out.append(("link errors", str(sorted(errs))))
    out.append(("nlink", str(os.stat("l").st_nlink)))
    out.append(("same inode", str(os.stat("ld/02999").st_ino == os.stat("l").st_ino)))
    out.append(("content via link", open("ld/01234", "rb").read().decode()))
    with open("ld/00007", "ab") as f:
        f.write(b"+")
    out.append(("append via link seen", open("l", "rb").read().decode()))
    for i in range(0, n, 2):
        os.unlink("ld/%05d" % i)
    out.append(("nlink after unlinking half", str(os.stat("l").st_nlink)))
    os.unlink("l")
    out.append(("nlink after unlinking the original", str(os.stat("ld/00001").st_nlink)))
    out.append(("link to a dir", outcome(os.link, "ld", "ld2")))
    out.append(("link over existing", outcome(os.link, "ld/00001", "ld/00003")))
    out.append(("link into missing dir", outcome(os.link, "ld/00001", "nodir/x")))
    return out


def case_renames():
    out = []
    os.makedirs("a/b/c/d")
    os.makedirs("e")
    open("a/f", "w").close()
    for label, fn in [
        ("a -> a/b/c/x", lambda: os.rename("a", "a/b/c/x")),
        ("a -> a/b", lambda: os.rename("a", "a/b")),
        ("a/b -> a/b/c/d/y", lambda: os.rename("a/b", "a/b/c/d/y")),
        ("a/b -> a/b/c/d (over nonempty? descendant)", lambda: os.rename("a/b", "a/b/c/d")),
        ("a/b/c -> a/b/c", lambda: os.rename("a/b/c", "a/b/c")),
        ("a -> a/.", lambda: os.rename("a", "a/.")),
        ("a/b/.. -> e/x", lambda: os.rename("a/b/..", "e/x")),
        (". -> e/x", lambda: os.rename(".", "e/x")),
        ("e -> a/b/c/d/e (ok)", lambda: os.rename("e", "a/b/c/d/e")),
        ("a -> a/b/c/d/e/z (deeper loop)", lambda: os.rename("a", "a/b/c/d/e/z")),
        ("exchange a <-> a/b/c", lambda: c_renameat2(b"a", b"a/b/c", 2)),
        ("exchange a/b/c <-> a", lambda: c_renameat2(b"a/b/c", b"a", 2)),
        ("noreplace a/f -> a/b", lambda: c_renameat2(b"a/f", b"a/b", 1)),
        ("dir over file", lambda: os.rename("a/b/c/d/e", "a/f")),
        ("file over dir", lambda: os.rename("a/f", "a/b/c/d/e")),
        ("dir over nonempty dir", lambda: os.rename("a/b/c", "a/b")),
        ("a/b/c/d/e -> e (back)", lambda: os.rename("a/b/c/d/e", "e")),
        ("walk", lambda: sorted(d for d, _, _ in os.walk("."))),
    ]:
        out.append((label, outcome(fn)))
    return out


# Where the kernel's tmpfs answers oddly, the answer chargefs may give instead. Kernel 6.x tmpfs
# says ENXIO for SEEK_DATA from 0 when the only data is in the page at 2^63-4096 (its page-cache
# walk stops short of that index); the data really starts there.
KNOWN_TMPFS_QUIRKS = {("sizes", "seek data 0"): ("ok:%d" % (2 ** 63 - 4096),)}

CASES = {"names": case_names, "deep": case_deep, "sizes": case_sizes, "zero": case_zero, "holes": case_holes,
         "xattrs": case_xattrs, "links": case_links, "renames": case_renames}
EXTRA = {"xattrs": xattrs_many}


def run_in(d, fn):
    old = os.open(".", os.O_RDONLY)
    os.chdir(d)
    try:
        return fn()
    finally:
        os.fchdir(old)
        os.close(old)


def compare(case, cfs, tmp):
    a = run_in(cfs, CASES[case])
    b = run_in(tmp, CASES[case])
    diffs = []
    for (la, ra), (_, rb) in zip(a, b):
        if ra == rb:
            continue
        if ra in KNOWN_TMPFS_QUIRKS.get((case, la), ()):
            print("  NOTE %s: %-28s chargefs=%s tmpfs=%s (tmpfs quirk, chargefs is right)" % (case, la, ra, rb))
            continue
        diffs.append((la, ra, rb))
    for la, ra, rb in diffs:
        print("  DIFF %s: %-28s chargefs=%s tmpfs=%s" % (case, la, ra[:200], rb[:200]))
    fails = run_in(cfs, EXTRA[case]) if case in EXTRA else []
    for f in fails:
        print("  FAIL %s: %s" % (case, f))
    print("  %s: %d outcomes compared, %d differ from tmpfs%s" % (case, len(a), len(diffs), ", %d chargefs-only failures" % len(fails) if case in EXTRA else ""))
    return 1 if diffs or fails or len(a) != len(b) else 0


# --- the real binary ---------------------------------------------------------------------------

def gen_args(r, mnt, memcg):
    keys = ["size", "nr_inodes", "mode", "uid", "gid", "memcg", "max_read", "blksize", "noatime", "allow_other",
            "ro", "fsname", "subtype", "x-a", "default_permissions", "auto_unmount", "direct_io"]
    nums = ["0", "1", "-1", "4096", "9223372036854775807", "9223372036854775808", "18446744073709551616", "8e",
            "7e", "100000%", "100001%", "1k", "7777", "17777", "4294967295", "4294967294", "0x10", "", "1\n", "1 g"]
    paths = [memcg, memcg + "/..", memcg + "/../..", memcg + "//", memcg + "/./", "/sys/fs/cgroup/memory/../../etc",
             "/proc/self/root" + memcg, "/dev/null", "/nonexistent", "/", "/sys/fs/cgroup", memcg + "/cgroup.procs",
             "/tmp", memcg + "/" + "x" * 300, "relative", memcg + "\\", memcg + ",size=1"]

    def rbytes(n):
        return bytes(r.randrange(1, 256) for _ in range(n))

    k = r.randrange(6)
    if k == 0:
        opt = rbytes(r.randrange(1, 40))
    elif k == 1:
        opt = b",".join((r.choice(keys) + r.choice(["", "="]) + r.choice(nums)).encode() for _ in range(r.randrange(1, 4)))
    elif k == 2:
        opt = ("memcg=" + r.choice(paths)).encode() + (b",size=" + r.choice(nums).encode() if r.random() < 0.3 else b"")
    elif k == 3:
        good = (r.choice(["size=1m", "nr_inodes=100", "mode=0700", "uid=1", "noatime", "memcg=" + memcg])).encode()
        b = bytearray(good)
        for _ in range(r.randrange(1, 4)):
            i = r.randrange(len(b) + 1)
            b[i:i + r.randrange(0, 2)] = rbytes(r.randrange(0, 3))
        opt = bytes(b) or b"x"
    elif k == 4:
        return [r.choice([b"-s", b"-h", b"-x", b"--cleanup", b"-o", b"-V", b"--", rbytes(5), mnt.encode(), b"/nonexistent", b"src\\"])
                for _ in range(r.randrange(1, 5))], False
    else:
        return [rbytes(r.randrange(1, 20)), mnt.encode(), b"-o", r.choice([b"size=1m", b"mode=0700", b"nr_inodes=10"])], True
    return [mnt.encode(), b"-o", opt], True


def is_mounted(mnt):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mnt for line in f)


def leftovers(mnt):
    r = subprocess.run(["pgrep", "-f", "--", mnt], capture_output=True, text=True)
    return [p for p in r.stdout.split() if int(p) != os.getpid()]


def fuzzbin(binary, mnt, count, seed, memcg="/nonexistent-cgroup"):
    r = random.Random(int(seed))
    count = int(count)
    stats = {"rejected": 0, "mounted": 0, "other": 0}
    fails = []
    t0 = time.monotonic()
    for i in range(count):
        args, uses_mnt = gen_args(r, mnt, memcg)
        try:
            p = subprocess.run([binary.encode()] + args, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            fails.append((args, "timed out (hang)"))
            subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            continue
        err = p.stderr.decode(errors="replace")
        lines = [ln for ln in err.split("\n") if ln]
        mounted = is_mounted(mnt)
        if p.returncode < 0:
            fails.append((args, "killed by signal %d: %r" % (-p.returncode, err[:300])))
        elif p.returncode == 0:
            # help/version/cleanup, or a mount that was accepted
            if mounted:
                stats["mounted"] += 1
                try:
                    with open(os.path.join(mnt, "probe"), "w") as f:
                        f.write("x")
                    os.unlink(os.path.join(mnt, "probe"))
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EPERM):
                        fails.append((args, "accepted mount does not work: %s" % ename(e.errno)))
                subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
                for _ in range(100):
                    if not leftovers(mnt):
                        break
                    time.sleep(0.05)
            else:
                stats["other"] += 1
        else:
            stats["rejected"] += 1
            if len(lines) != 1 or not lines[0].startswith("chargefsd: "):
                fails.append((args, "exit %d with %d stderr lines: %r" % (p.returncode, len(lines), err[:300])))
            if mounted:
                fails.append((args, "exit %d but mounted" % p.returncode))
                subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        left = leftovers(mnt)
        if left:
            fails.append((args, "processes left behind: %s" % left))
            for pid in left:
                try:
                    os.kill(int(pid), 9)
                except OSError:
                    pass
    took = time.monotonic() - t0
    for args, why in fails[:20]:
        print("  FAIL %r: %s" % (args, why))
    print("  real binary: %d runs in %.1f s: %d rejected, %d mounted and unmounted, %d other exit-0 (help/version/cleanup); %d failures"
          % (count, took, stats["rejected"], stats["mounted"], stats["other"], len(fails)))
    return 1 if fails else 0


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        sys.exit(compare(*sys.argv[2:5]))
    if sys.argv[1] == "fuzzbin":
        sys.exit(fuzzbin(*sys.argv[2:]))
    sys.exit("unknown command")
