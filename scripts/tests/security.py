#!/usr/bin/env python3
"""Permission checks for security.sh. Run in the directory under test.

  security.py prepare DIR            (as root) builds the fixture tree in DIR
  security.py user DIR               (as uid 65534) tries what modes forbid; prints 'label outcome'
  security.py other DIR              (as uid 65533) tries to remove 65534's file in the sticky dir
  security.py after DIR              (as root) prints modes/existence after the user steps
Outputs of chargefs and a kernel tmpfs given the same steps must be identical.
"""
import errno
import os
import sys

U, OTHER = 65534, 65533


def ename(e):
    return errno.errorcode.get(e, str(e))


def outcome(fn, *a):
    try:
        r = fn(*a)
    except OSError as e:
        return ename(e.errno)
    return "ok" if r is None else "ok:%s" % (r,)


def write_file(p, data=b"data"):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file(p):
    with open(p, "rb") as f:
        return len(f.read())


def prepare(d):
    os.chdir(d)
    os.chmod(".", 0o755)
    write_file("f600"); os.chmod("f600", 0o600)
    write_file("f644"); os.chmod("f644", 0o644)
    write_file("f666"); os.chmod("f666", 0o666)
    os.mkdir("d700"); write_file("d700/x"); os.chmod("d700", 0o700)
    os.mkdir("d755"); write_file("d755/x")
    os.mkdir("d711"); write_file("d711/x"); os.chmod("d711", 0o711)
    os.mkdir("sticky"); os.chmod("sticky", 0o1777)
    write_file("sticky/root-file"); os.chmod("sticky/root-file", 0o666)
    write_file("sticky/other"); os.chown("sticky/other", OTHER, OTHER); os.chmod("sticky/other", 0o666)
    write_file("sticky/mine"); os.chown("sticky/mine", U, U)
    write_file("suid"); os.chmod("suid", 0o6777)               # root's setuid+setgid, world-writable
    write_file("sgid-noexec"); os.chmod("sgid-noexec", 0o2666)  # setgid without group exec: a lock mark
    write_file("own-suid"); os.chown("own-suid", U, U); os.chmod("own-suid", 0o6755)
    os.mkdir("shared"); os.chmod("shared", 0o777)


def user(d):
    os.chdir(d)
    steps = [
        ("read f600", lambda: read_file("f600")),
        ("write f644", lambda: write_file("f644")),
        ("read f644", lambda: read_file("f644")),
        ("write f666", lambda: write_file("f666", b"x")),
        ("truncate f644", lambda: os.truncate("f644", 0)),
        ("chmod f644", lambda: os.chmod("f644", 0o777)),
        ("chown f666 to self", lambda: os.chown("f666", U, U)),
        ("utime f644 explicit", lambda: os.utime("f644", (1, 1))),
        ("utime f666 now", lambda: os.utime("f666", None)),
        ("setxattr f644", lambda: os.setxattr("f644", "user.x", b"1")),
        ("setxattr f666", lambda: os.setxattr("f666", "user.x", b"1")),
        ("trusted xattr", lambda: os.setxattr("f666", "trusted.x", b"1")),
        ("list d700", lambda: len(os.listdir("d700"))),
        ("stat d700/x", lambda: os.stat("d700/x").st_size),
        ("list d711", lambda: len(os.listdir("d711"))),
        ("stat d711/x", lambda: os.stat("d711/x").st_size),
        ("list d755", lambda: len(os.listdir("d755"))),
        ("unlink d755/x", lambda: os.unlink("d755/x")),
        ("create in d755", lambda: write_file("d755/new")),
        ("mkdir in root", lambda: os.mkdir("mine")),
        ("rename d755/x out", lambda: os.rename("d755/x", "shared/x")),
        ("unlink sticky/root-file", lambda: os.unlink("sticky/root-file")),
        ("rename sticky/root-file", lambda: os.rename("sticky/root-file", "sticky/r2")),
        ("write sticky/root-file", lambda: write_file("sticky/root-file", b"y")),
        ("unlink sticky/other", lambda: os.unlink("sticky/other")),
        ("create sticky/new", lambda: write_file("sticky/new")),
        ("rename sticky/mine", lambda: os.rename("sticky/mine", "sticky/mine2")),
        ("unlink sticky/mine2", lambda: os.unlink("sticky/mine2")),
        ("write suid", lambda: write_file("suid", b"pwn")),
        ("write sgid-noexec", lambda: write_file("sgid-noexec", b"z")),
        ("hard link f600", lambda: os.link("f600", "shared/l600")),
        ("symlink in shared", lambda: os.symlink("/etc/shadow", "shared/s")),
        ("mknod fifo in shared", lambda: os.mkfifo("shared/fifo")),
        ("chmod own-suid keeps", lambda: os.chmod("own-suid", 0o6755)),
        ("write own-suid", lambda: write_file("own-suid", b"w")),
    ]
    for label, fn in steps:
        print("%-28s %s" % (label, outcome(fn)))


def other(d):
    os.chdir(d)
    write_file("sticky/by-other")
    print("%-28s %s" % ("65533 unlink sticky/mine", outcome(os.unlink, "sticky/mine")))
    print("%-28s %s" % ("65533 unlink sticky/new", outcome(os.unlink, "sticky/new")))
    print("%-28s %s" % ("65533 unlink own file", outcome(os.unlink, "sticky/by-other")))


def after(d):
    os.chdir(d)
    for p in ["suid", "sgid-noexec", "own-suid", "f644", "f666"]:
        st = os.stat(p)
        print("%-28s mode %o uid %d size %d" % (p, st.st_mode & 0o7777, st.st_uid, st.st_size))
    os.chown("suid", 0, 0)
    os.chmod("own-suid", 0o6755)
    os.chown("own-suid", 1, 1)  # chown by root of a setuid/setgid-exec file clears both
    for p in ["suid", "own-suid"]:
        print("%-28s mode %o after chown" % (p, os.stat(p).st_mode & 0o7777))
    for p in ["sticky/root-file", "sticky/other", "sticky/mine", "d755/x", "d755/new"]:
        print("%-28s %s" % ("exists " + p, os.path.lexists(p)))


if __name__ == "__main__":
    {"prepare": prepare, "user": user, "other": other, "after": after}[sys.argv[1]](sys.argv[2])
