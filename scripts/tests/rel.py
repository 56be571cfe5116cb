#!/usr/bin/env python3
"""Helpers for the reliability/security shell tests (faults.sh, hostile.sh, security.sh).

Usage: rel.py COMMAND ARGS...   Every command prints one result line on stdout; exit 0 = ok.
Errors are reported by errno name (ENOSPC, ENOTCONN, ...) so shell tests can grep them.
"""
import errno
import hashlib
import os
import random
import signal
import stat
import sys
import threading
import time


def ename(e):
    return errno.errorcode.get(e, str(e))


def writer(path, chunk, secs, pause=0, sync_every=8):
    """Writes CHUNK-byte random blocks to PATH (appending) for SECS seconds or until an error,
    sleeping PAUSE seconds between writes. Prints 'ok BYTES' or 'ERRNAME BYTES'. Exit 0 either
    way (the shell judges the errno)."""
    chunk, secs, pause = int(chunk), float(secs), float(pause)
    data = os.urandom(int(chunk))
    done, n = 0, 0
    end = time.monotonic() + secs
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        while time.monotonic() < end:
            done += os.write(fd, data)
            n += 1
            if pause:
                time.sleep(pause)
            if n % sync_every == 0:
                os.fsync(fd)
        os.close(fd)
    except OSError as e:
        print(ename(e.errno), done, flush=True)
        return 0
    print("ok", done, flush=True)
    return 0


def fill(directory, prefix, size, manifest):
    """Writes SIZE-byte random files DIR/PREFIXnnnnn until ENOSPC (removing a partial one).
    Manifest lines: 'path sha256 size'. Prints 'ENOSPC files bytes' or 'ERRNAME ...'."""
    size = int(size)
    n, kept = 0, 0
    with open(manifest, "w") as man:
        while True:
            p = os.path.join(directory, "%s%06d" % (prefix, n))
            data = os.urandom(random.randint(1, size))
            try:
                with open(p, "wb") as f:
                    f.write(data)
            except OSError as e:
                try:
                    os.unlink(p)
                except OSError:
                    pass
                print(ename(e.errno), n, kept, flush=True)
                return 0
            man.write("%s %s %d\n" % (p, hashlib.sha256(data).hexdigest(), len(data)))
            man.flush()
            kept += len(data)
            n += 1


def mkinodes(directory, prefix):
    """Creates empty files until an error; prints 'ERRNAME count'."""
    n = 0
    while True:
        try:
            os.close(os.open(os.path.join(directory, "%s%06d" % (prefix, n)), os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError as e:
            print(ename(e.errno), n, flush=True)
            return 0
        n += 1


def verify(*manifests):
    """Checks every 'path sha256 size' line; prints 'N files, M bad'."""
    total, bad = 0, 0
    for m in manifests:
        for line in open(m):
            p, h, _ = line.split()
            total += 1
            try:
                with open(p, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() != h:
                        bad += 1
            except OSError:
                bad += 1
    print("%d files, %d bad" % (total, bad))
    return 1 if bad else 0


def tree_sum(root):
    """Prints 'files bytes blocks512 inodes' for everything below ROOT (hard links once)."""
    seen = set()
    files = size = blocks = 0
    for d, dirs, names in os.walk(root):
        for name in dirs + names:
            st = os.lstat(os.path.join(d, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
            blocks += st.st_blocks
    print(files, size, blocks, len(seen) + 1)
    return 0


def hold(seconds, *paths):
    """Opens PATHS (O_RDWR) and keeps them open; prints 'held' then sleeps."""
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in paths]
    print("held", len(fds), flush=True)
    time.sleep(float(seconds))
    return 0


def blocked_read(fifo):
    """Opens FIFO for reading and blocks in read(2); prints what ended it."""
    try:
        fd = os.open(fifo, os.O_RDONLY)
        print("opened", flush=True)
        r = os.read(fd, 1)
        print("read", len(r), flush=True)
    except OSError as e:
        print(ename(e.errno), flush=True)
    return 0


def probe(path, secs):
    """stat(PATH) in a thread; prints the errno name (or 'ok'), or 'HANG' after SECS."""
    out = []

    def go():
        try:
            os.stat(path)
            out.append("ok")
        except OSError as e:
            out.append(ename(e.errno))
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(float(secs))
    print(out[0] if out else "HANG", flush=True)
    os._exit(0 if out else 1)


def sha(path):
    with open(path, "rb") as f:
        print(hashlib.sha256(f.read()).hexdigest())
    return 0


def hog(mib, hold_secs, step_mib=4):
    """Allocates and touches MIB MiB of anonymous memory in STEP chunks, then holds it."""
    blocks = []
    for _ in range(int(mib) // int(step_mib)):
        b = bytearray(int(step_mib) << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        blocks.append(b)
    print("holding", len(blocks) * int(step_mib), flush=True)
    time.sleep(float(hold_secs))
    return 0


COMMANDS = {
    "writer": writer, "fill": fill, "mkinodes": mkinodes, "verify": verify, "tree_sum": tree_sum,
    "hold": hold, "blocked_read": blocked_read, "probe": probe, "sha": sha, "hog": hog,
}

if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(COMMANDS[sys.argv[1]](*sys.argv[2:]) or 0)
