#!/usr/bin/env python3
"""Passthrough readers beside writers, on a chargefs mount (scripts/tests/passthrough.sh).

  passthrough.py rw FILE      FILE (>= 1 MiB, dense) is opened read-only first (the open that
                              passes through), then read-write; every change made through the
                              writer (overwrite, write past the end, truncate up, punch, truncate
                              down) must be seen at once through the reader, by pread and by a
                              fresh read-only shared and private mapping.
  passthrough.py map FILE     maps FILE read-only, shared and private, and reads every page.
  passthrough.py writer_mmap FILE   with a reader open (passthrough), a writer's open passes
                              through too (the kernel takes no other kind then) with direct I/O:
                              its shared mapping, its write(2) and the reader agree.
  passthrough.py fill PATTERN SOURCE FILE   writes SOURCE's bytes (whole MiBs) into FILE the
                              way PATTERN says: falloc (posix_fallocate, then 1 MiB writes),
                              reverse (1 MiB writes, last first), mmap (ftruncate, stores through a
                              shared mapping, msync).
Prints one line per check ("ok: ..." or "FAIL: ..."); exit 1 when any failed.
"""
import errno
import mmap
import os
import sys

fails = 0


def check(what, cond):
    global fails
    print(("ok: " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        fails += 1


def punch(fd, offset, length):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, 3, offset, length) != 0:  # PUNCH_HOLE | KEEP_SIZE
        raise OSError(ctypes.get_errno(), "fallocate")


def own_shmem():
    """Shmem bytes charged to this process's memory cgroup (v1 or v2), None if unknown."""
    for line in open("/proc/self/cgroup"):
        ident, controllers, path = line.rstrip("\n").split(":", 2)
        if "memory" in controllers.split(","):
            stat, key = "/sys/fs/cgroup/memory" + path + "/memory.stat", "total_shmem"
            break
        if ident == "0":
            stat, key = "/sys/fs/cgroup" + path + "/memory.stat", "shmem"
    else:
        return None
    for line in open(stat):
        k, v = line.split()
        if k == key:
            return int(v)
    return None


def mapped(fd, size, private):
    flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
    m = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    try:
        return m[:]
    finally:
        m.close()


def rw(path):
    size = os.stat(path).st_size
    reader = os.open(path, os.O_RDONLY)
    writer = os.open(path, os.O_RDWR)
    model = bytearray(os.pread(reader, size, 0))
    check("the reader reads the whole file", len(model) == size)

    def same(what):
        n = os.fstat(reader).st_size
        check(what + ": size seen by the reader", n == len(model))
        check(what + ": pread through the reader", os.pread(reader, len(model) + 1, 0) == bytes(model))
        check(what + ": shared mapping", len(model) == 0 or mapped(reader, len(model), False) == bytes(model))
        check(what + ": private mapping", len(model) == 0 or mapped(reader, len(model), True) == bytes(model))
        # The maps above faulted every page below the size: none may have been a hole.
        check(what + ": the reader's cgroup holds no shmem (%s)" % own_shmem(), own_shmem() == 0)

    data = os.urandom(100_000)
    os.pwrite(writer, data, 12345)
    model[12345:12345 + len(data)] = data
    same("overwrite")

    tail = os.urandom(5000)
    at = len(model) + 3 * 1024 * 1024 + 77
    os.pwrite(writer, tail, at)
    model.extend(bytes(at - len(model)))
    model[at:at + len(tail)] = tail
    same("write 3 MiB past the end")

    os.ftruncate(writer, len(model) + 2 * 1024 * 1024)
    model.extend(bytes(2 * 1024 * 1024))
    same("truncate up 2 MiB")

    punch(writer, 4096, 256 * 1024)
    model[4096:4096 + 256 * 1024] = bytes(256 * 1024)
    same("punch 256 KiB")

    os.ftruncate(writer, 1500 * 1024)
    del model[1500 * 1024:]
    same("truncate down")
    os.close(writer)
    os.close(reader)


def map_all(path):
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY)
    with open(path, "rb") as f:
        plain = f.read()
    check("shared mapping reads what read(2) does", mapped(fd, size, False) == plain)
    check("private mapping reads what read(2) does", mapped(fd, size, True) == plain)
    os.close(fd)


def writer_mmap(path):
    reader = os.open(path, os.O_RDONLY)
    writer = os.open(path, os.O_RDWR)
    m = mmap.mmap(writer, 8192, flags=mmap.MAP_SHARED)
    m[4096:4100] = b"mmap"
    check("a store through the writer's shared mapping is read by the reader",
          os.pread(reader, 4, 4096) == b"mmap")
    os.pwrite(writer, b"wrote", 100)
    check("a write(2) through the writer is seen in its mapping", m[100:105] == b"wrote")
    check("and by the reader", os.pread(reader, 5, 100) == b"wrote")
    m.close()
    os.close(writer)
    os.close(reader)


def fill(pattern, source, path):
    with open(source, "rb") as f:
        data = f.read()
    mib = 1 << 20
    pieces = range(0, len(data), mib)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if pattern == "falloc":
        os.posix_fallocate(fd, 0, len(data))
    if pattern == "mmap":
        os.ftruncate(fd, len(data))
        m = mmap.mmap(fd, len(data), flags=mmap.MAP_SHARED)
        for at in pieces:
            m[at:at + mib] = data[at:at + mib]
        m.flush()
        m.close()
    else:
        for at in (reversed(pieces) if pattern == "reverse" else pieces):
            os.pwrite(fd, data[at:at + mib], at)
    os.close(fd)


if __name__ == "__main__":
    if sys.argv[1] == "fill":
        fill(*sys.argv[2:5])
        sys.exit(0)
    {"rw": rw, "map": map_all, "writer_mmap": writer_mmap}[sys.argv[1]](sys.argv[2])
    sys.exit(1 if fails else 0)
