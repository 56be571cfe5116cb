#!/usr/bin/env python3
"""Concurrent stress of a mounted file system with a full consistency check at the end.

  stress.py ROOT [--workers N] [--seconds S] [--seed X] [--until FILE] [--keep]

N worker processes (default 4) run mixed data and metadata operations for S seconds (default
20) on one shared tree (ROOT/shared/d0..d7: everyone creates, renames, links and lists there).
Each worker owns the entries it created (named w<k>_...) and keeps a model of them: content
(bytes), mode, hard-link names, xattrs, symlink targets, empty directories. Every operation's
result is checked as it happens (reads against the model, readdir must show every own entry of
that directory, stat must match); at the end the whole tree is walked and every entry compared
with the union of the models (type, size, content, mode, nlink, inode sharing of hard links,
xattrs, link targets), with nothing missing and nothing extra, and df's used blocks must equal
the sum of st_blocks. Prints 'ops N errors M ...'; exit 1 on any inconsistency or unexpected
errno. --until FILE: the workers stop as soon as FILE exists (--seconds still bounds the run;
stress.sh kill_loop stops them after its last kill). Also used by scripts/soak.sh and
scripts/sanitize.sh.
"""
import argparse
import ctypes
import errno
import hashlib
import json
import os
import random
import stat
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
NDIRS = 8


class Worker:
    def __init__(self, k, root, seed):
        self.k, self.root = k, root
        self.r = random.Random(seed * 1000 + k)
        self.files = {}      # file id -> {"data": bytearray, "mode": int, "names": set(path), "xattrs": {}}
        self.symlinks = {}   # path -> target
        self.dirs = set()    # own empty directories
        self.n = 0
        self.ops = 0
        self.errors = []

    def err(self, what):
        if len(self.errors) < 50:
            self.errors.append("w%d: %s" % (self.k, what))

    def newname(self, kind):
        self.n += 1
        return os.path.join(self.root, "shared", "d%d" % self.r.randrange(NDIRS), "w%d_%s%d" % (self.k, kind, self.n))

    def pick_file(self):
        if not self.files:
            return None, None
        fid = self.r.choice(list(self.files))
        return fid, self.files[fid]

    def any_name(self, f):
        return self.r.choice(sorted(f["names"]))

    # --- operations (each returns nothing; checks raise AssertionError via self.err) ---
    def op_create(self):
        p = self.newname("f")
        data = bytearray(os.urandom(self.r.choice([0, 1, 100, 4096, 5000, 65536, 200000])))
        mode = self.r.choice([0o644, 0o600, 0o664, 0o755])
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        try:
            if data:
                os.write(fd, data)
        finally:
            os.close(fd)
        self.files[p] = {"data": data, "mode": mode, "names": {p}, "xattrs": {}}

    def op_pwrite(self):
        fid, f = self.pick_file()
        if not f:
            return
        off = self.r.randrange(0, len(f["data"]) + 65536)
        buf = os.urandom(self.r.choice([1, 17, 4096, 8191, 40000]))
        fd = os.open(self.any_name(f), os.O_WRONLY)
        try:
            n = os.pwrite(fd, buf, off)
        finally:
            os.close(fd)
        if n != len(buf):
            self.err("short pwrite %d of %d" % (n, len(buf)))
        d = f["data"]
        if off > len(d):
            d.extend(b"\0" * (off - len(d)))
        d[off:off + len(buf)] = buf

    def op_append(self):
        fid, f = self.pick_file()
        if not f:
            return
        buf = os.urandom(self.r.randrange(1, 9000))
        fd = os.open(self.any_name(f), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, buf)
        finally:
            os.close(fd)
        f["data"].extend(buf)

    def op_truncate(self):
        fid, f = self.pick_file()
        if not f:
            return
        size = self.r.choice([0, self.r.randrange(0, len(f["data"]) + 1), len(f["data"]) + self.r.randrange(1, 100000)])
        os.truncate(self.any_name(f), size)
        d = f["data"]
        if size < len(d):
            del d[size:]
        else:
            d.extend(b"\0" * (size - len(d)))

    def op_punch(self):
        fid, f = self.pick_file()
        if not f or len(f["data"]) < 8192:
            return
        off = self.r.randrange(0, len(f["data"]) - 4096) & ~4095
        length = min(self.r.choice([4096, 8192, 65536]), len(f["data"]) - off)
        fd = os.open(self.any_name(f), os.O_WRONLY)
        try:
            if libc.fallocate(fd, PUNCH, off, length) != 0:
                raise OSError(ctypes.get_errno(), "fallocate")
        finally:
            os.close(fd)
        f["data"][off:off + length] = b"\0" * length

    def op_read(self):
        fid, f = self.pick_file()
        if not f:
            return
        p = self.any_name(f)
        with open(p, "rb") as fh:
            got = fh.read()
        if got != bytes(f["data"]):
            self.err("content of %s differs (%d bytes read, %d expected)" % (p, len(got), len(f["data"])))

    def op_stat(self):
        fid, f = self.pick_file()
        if not f:
            return
        st = os.stat(self.any_name(f))
        if st.st_size != len(f["data"]) or st.st_mode & 0o7777 != f["mode"] or st.st_nlink != len(f["names"]):
            self.err("stat %s: size %d/%d mode %o/%o nlink %d/%d" % (fid, st.st_size, len(f["data"]), st.st_mode & 0o7777,
                                                                    f["mode"], st.st_nlink, len(f["names"])))

    def op_rename(self):
        fid, f = self.pick_file()
        if not f:
            return
        old = self.any_name(f)
        new = self.newname("f")
        os.rename(old, new)
        f["names"].discard(old)
        f["names"].add(new)

    def op_link(self):
        fid, f = self.pick_file()
        if not f or len(f["names"]) > 6:
            return
        new = self.newname("l")
        os.link(self.any_name(f), new)
        f["names"].add(new)

    def op_unlink(self):
        fid, f = self.pick_file()
        if not f:
            return
        p = self.any_name(f)
        os.unlink(p)
        f["names"].discard(p)
        if not f["names"]:
            del self.files[fid]

    def op_chmod(self):
        fid, f = self.pick_file()
        if not f:
            return
        mode = self.r.choice([0o600, 0o640, 0o644, 0o700, 0o755, 0o444, 0o666])
        os.chmod(self.any_name(f), mode)
        f["mode"] = mode

    def op_xattr(self):
        fid, f = self.pick_file()
        if not f:
            return
        key = "user.k%d" % self.r.randrange(4)
        p = self.any_name(f)
        if self.r.random() < 0.7:
            val = os.urandom(self.r.randrange(0, 300))
            os.setxattr(p, key, val)
            f["xattrs"][key] = val
        elif key in f["xattrs"]:
            os.removexattr(p, key)
            del f["xattrs"][key]
        got = {k: os.getxattr(p, k) for k in os.listxattr(p)}
        if got != f["xattrs"]:
            self.err("xattrs of %s: %s != %s" % (p, sorted(got), sorted(f["xattrs"])))

    def op_symlink(self):
        p = self.newname("s")
        target = "target-%d-%s" % (self.n, "x" * self.r.randrange(0, 200))
        os.symlink(target, p)
        self.symlinks[p] = target
        if os.readlink(p) != target:
            self.err("readlink %s" % p)
        if len(self.symlinks) > 50:
            q = self.r.choice(sorted(self.symlinks))
            os.unlink(q)
            del self.symlinks[q]

    def op_dir(self):
        if self.dirs and self.r.random() < 0.5:
            d = self.r.choice(sorted(self.dirs))
            if self.r.random() < 0.5:
                os.rmdir(d)
                self.dirs.discard(d)
            else:
                new = self.newname("d")
                os.rename(d, new)
                self.dirs.discard(d)
                self.dirs.add(new)
        else:
            d = self.newname("d")
            os.mkdir(d, 0o755)
            self.dirs.add(d)

    def op_readdir(self):
        d = os.path.join(self.root, "shared", "d%d" % self.r.randrange(NDIRS))
        names = set(os.listdir(d))
        own = {os.path.basename(p) for f in self.files.values() for p in f["names"] if os.path.dirname(p) == d}
        own |= {os.path.basename(p) for p in list(self.symlinks) + list(self.dirs) if os.path.dirname(p) == d}
        missing = own - names
        if missing:
            self.err("readdir %s misses own entries %s" % (d, sorted(missing)[:5]))
        if len(names) != len(set(names)):
            self.err("readdir %s lists duplicates" % d)

    OPS = [("create", 10), ("pwrite", 14), ("append", 6), ("truncate", 6), ("punch", 3), ("read", 14),
           ("stat", 8), ("rename", 8), ("link", 4), ("unlink", 6), ("chmod", 3), ("xattr", 5),
           ("symlink", 3), ("dir", 4), ("readdir", 6)]

    def run(self, seconds, until=None):
        names = [n for n, w in self.OPS for _ in range(w)]
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(self.errors) < 50:
            if until and self.ops % 16 == 0 and os.path.exists(until):
                break
            name = self.r.choice(names)
            try:
                getattr(self, "op_" + name)()
            except OSError as e:
                self.err("%s: %s (%s)" % (name, errno.errorcode.get(e.errno, e.errno), e.filename))
            self.ops += 1
            if len(self.files) > 60:
                self.op_unlink()

    def model(self):
        entries = {}
        for fid, f in self.files.items():
            info = {"type": "file", "size": len(f["data"]), "sha": hashlib.sha256(f["data"]).hexdigest(),
                    "mode": f["mode"], "nlink": len(f["names"]), "group": fid,
                    "xattrs": {k: v.hex() for k, v in f["xattrs"].items()}}
            for p in f["names"]:
                entries[p] = info
        for p, t in self.symlinks.items():
            entries[p] = {"type": "symlink", "target": t}
        for d in self.dirs:
            entries[d] = {"type": "dir"}
        return {"entries": entries, "ops": self.ops, "errors": self.errors}


def check_tree(root, entries, check_df=True):
    problems = []
    groups = {}
    seen = set()
    blocks = 0
    inos = set()
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if st.st_ino not in inos:
                inos.add(st.st_ino)
                blocks += st.st_blocks
            rel_dir = os.path.relpath(d, root)
            if rel_dir == "shared" or (rel_dir == "." and name == "shared"):
                continue  # the fixed skeleton
            if rel_dir == ".":
                problems.append("unexpected top-level entry %s" % p)
                continue
            seen.add(p)
            e = entries.get(p)
            if e is None:
                problems.append("extra entry %s" % p)
                continue
            if e["type"] == "dir":
                if not stat.S_ISDIR(st.st_mode) or os.listdir(p):
                    problems.append("%s: not an empty dir" % p)
            elif e["type"] == "symlink":
                if not stat.S_ISLNK(st.st_mode) or os.readlink(p) != e["target"]:
                    problems.append("%s: symlink differs" % p)
            else:
                if not stat.S_ISREG(st.st_mode):
                    problems.append("%s: not a file" % p)
                    continue
                with open(p, "rb") as f:
                    data = f.read()
                if len(data) != e["size"] or hashlib.sha256(data).hexdigest() != e["sha"]:
                    problems.append("%s: content differs (%d bytes, %d expected)" % (p, len(data), e["size"]))
                if st.st_mode & 0o7777 != e["mode"]:
                    problems.append("%s: mode %o, expected %o" % (p, st.st_mode & 0o7777, e["mode"]))
                if st.st_nlink != e["nlink"]:
                    problems.append("%s: nlink %d, expected %d" % (p, st.st_nlink, e["nlink"]))
                x = {k: os.getxattr(p, k).hex() for k in os.listxattr(p)}
                if x != e["xattrs"]:
                    problems.append("%s: xattrs differ" % p)
                groups.setdefault(e["group"], set()).add(st.st_ino)
    for p in entries:
        if p not in seen:
            problems.append("missing entry %s (%s)" % (p, entries[p]["type"]))
    for g, s in groups.items():
        if len(s) != 1:
            problems.append("hard links of %s are %d different inodes" % (g, len(s)))
    sv = os.statvfs(root)
    used = (sv.f_blocks - sv.f_bfree) * sv.f_frsize
    if check_df and used != blocks * 512:
        problems.append("df used %d != sum of st_blocks %d" % (used, blocks * 512))
    return problems, len(seen)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--until", help="stop the workers once this file exists (at most --seconds)")
    ap.add_argument("--keep", action="store_true", help="leave the tree (default: remove it after the check)")
    a = ap.parse_args()
    os.umask(0)  # the model holds the modes it asks for
    root = os.path.join(a.root, "stress-%d" % os.getpid())
    os.mkdir(root)
    for i in range(NDIRS):
        os.makedirs(os.path.join(root, "shared", "d%d" % i))
    pipes = []
    t0 = time.monotonic()
    for k in range(a.workers):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            w = Worker(k, root, a.seed)
            try:
                w.run(a.seconds, a.until)
                out = w.model()
            except Exception as e:  # a bug in the test itself must show, not hang the parent
                out = {"entries": {}, "ops": w.ops, "errors": ["w%d crashed: %r" % (k, e)]}
            with os.fdopen(wfd, "w") as f:
                json.dump(out, f)
            os._exit(0)
        os.close(wfd)
        pipes.append((pid, rfd))
    entries, ops, errors = {}, 0, []
    for pid, rfd in pipes:
        with os.fdopen(rfd) as f:
            m = json.load(f)
        os.waitpid(pid, 0)
        entries.update(m["entries"])
        ops += m["ops"]
        errors += m["errors"]
    took = time.monotonic() - t0
    # df must equal the tree's blocks only when the tree is all the mount holds
    alone = os.listdir(a.root) == [os.path.basename(root)] and os.path.ismount(a.root)
    problems, n = check_tree(root, entries, check_df=alone)
    for e in errors[:20]:
        print("  error:", e)
    for p in problems[:20]:
        print("  inconsistent:", p)
    print("ops %d errors %d in %.1f s with %d workers (%.0f ops/s); final check: %d entries, %d inconsistencies"
          % (ops, len(errors), took, a.workers, ops / max(took, 0.001), n, len(problems)), flush=True)
    if not a.keep:
        for d, dirs, files in os.walk(root, topdown=False):
            for name in files:
                os.unlink(os.path.join(d, name))
            for name in dirs:
                p = os.path.join(d, name)
                (os.unlink if os.path.islink(p) else os.rmdir)(p)
        os.rmdir(root)
    return 1 if errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
