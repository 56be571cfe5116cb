#!/usr/bin/env python3
"""takeover.sh kill_unlink_listed_held: a request sent after a successor's first bump, answered
after the resent UNLINK's reply and before the unlinking caller runs its end of the UNLINK.

The mount (chargefsd pinned to CPU_A) holds d1/a and d2/b, one file, and was started with
CHARGEFS_TEST_KILL_BEFORE_REPLY=unlink and CHARGEFS_TEST_RESENT_REPLY_GATE=GATE. This process
(pinned to CPU_A) forks the rm of d1/a, pinned to CPU_B; the server dies before its reply; the
successor bumps, serves, reads the resent UNLINK and holds its reply until GATE exists. Then a
request about b is sent (HOW=list: a getdents64 of d2 at offset 0, one READDIRPLUS; HOW=stat: a
stat of d2/b, one GETATTR, b's attributes being invalid after the bump): the successor holds it
until the resent reply is written (ResentFirst). A SCHED_FIFO spinner is started on CPU_B (at
most SPIN_MS, RLIMIT_RTTIME past that; its pid in PIDFILE, named cfs-rt-spinner), then GATE is
created: the reply wakes the rm on CPU_B, where it cannot run; the request is answered (after
the second bump, when the successor makes it) and its reply handled on CPU_A with the file's
count after the unlink (1). Only then is the spinner killed, and the rm runs the kernel's own
decrement (fuse_entry_unlinked). Without the second bump the kernel took the reply's count
(cached nlink 1), the decrement left 0 and `ln d2/b d2/c` failed with ENOENT.

Prints one line of what happened; exits 0 when the window was held and ln succeeded.
Usage: unlink_held.py MNT LOG GATE PIDFILE HOW CPU_A CPU_B"""
import ast
import ctypes
import os
import resource
import select
import signal
import sys
import time

mnt, log, gate, pidfile, how = sys.argv[1:6]
cpu_a, cpu_b = int(sys.argv[6]), int(sys.argv[7])
SPIN_MS = 300
signal.alarm(30)

libc = ctypes.CDLL(None, use_errno=True)
libc.getdents64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
libc.getdents64.restype = ctypes.c_ssize_t
libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
AT_FDCWD, AT_STATX_DONT_SYNC, STATX_NLINK, PR_SET_NAME = -100, 0x4000, 0x4, 15

d2 = os.path.join(mnt, "d2")
b = os.path.join(d2, "b")


def cached_nlink(path):
    """The kernel's cached link count (AT_STATX_DONT_SYNC: no request)."""
    buf = ctypes.create_string_buffer(256)
    if libc.statx(AT_FDCWD, path.encode(), AT_STATX_DONT_SYNC, STATX_NLINK, buf) != 0:
        return -ctypes.get_errno()
    return int.from_bytes(buf.raw[16:20], "little")


def listing(fd):
    """One getdents64 (no fstat first, as fdopendir would: a GETATTR of d2 ahead of it)."""
    buf = ctypes.create_string_buffer(65536)
    n = libc.getdents64(fd, buf, len(buf))
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    raw, off, names = buf.raw[:n], 0, []
    while off < n:
        reclen = int.from_bytes(raw[off + 16:off + 18], "little")
        name = raw[off + 19:off + reclen].split(b"\0", 1)[0].decode()
        if name not in (".", ".."):
            names.append(name)
        off += reclen
    return sorted(names)


def wait_log(text, secs):
    deadline = time.monotonic() + secs
    while True:
        with open(log, errors="replace") as f:
            if text in f.read():
                return
        if time.monotonic() > deadline:
            sys.exit("not in the daemon's log within %d s: %r" % (secs, text))
        time.sleep(0.005)


def waiting_on_fuse(pid):
    """Whether pid sleeps in a FUSE request (its kernel stack, root only; else its wchan)."""
    try:
        with open("/proc/%d/stack" % pid) as f:
            stack = f.read()
        if stack:
            return "request_wait_answer" in stack or "fuse_simple_request" in stack
    except OSError:
        pass
    try:
        with open("/proc/%d/wchan" % pid) as f:
            wchan = f.read()
        return "fuse" in wchan or "request_wait_answer" in wchan
    except OSError:
        return False


os.sched_setaffinity(0, {cpu_a})
status = dict(kv.split("=", 1) for kv in os.getxattr(mnt, "user.chargefs.status").decode().split() if "=" in kv)
server = os.pidfd_open(int(status["pid"]))
dirfd = os.open(d2, os.O_RDONLY | os.O_DIRECTORY)   # opened now: the listing below is one request
before = cached_nlink(b)

rm_r, rm_w = os.pipe()
rm = os.fork()
if rm == 0:
    os.close(rm_r)
    os.sched_setaffinity(0, {cpu_b})
    try:
        os.unlink(os.path.join(mnt, "d1", "a"))
        os.write(rm_w, b"ok")
    except OSError as e:
        os.write(rm_w, str(e).encode())
    os._exit(0)
os.close(rm_w)

if not select.select([server], [], [], 20)[0]:
    sys.exit("the server did not die at the rm")
wait_log(" serves (takeover", 20)
wait_log("test hook: the reply to resent request", 20)   # the resent UNLINK, read and held

# The spinner: waits for "g", then takes CPU_B (SCHED_FIFO 50) for at most SPIN_MS.
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
spinner = os.fork()
if spinner == 0:
    try:
        os.close(go_w)
        os.close(ready_r)
        os.sched_setaffinity(0, {cpu_b})
        libc.prctl(PR_SET_NAME, b"cfs-rt-spinner", 0, 0, 0)
        resource.setrlimit(resource.RLIMIT_RTTIME, ((SPIN_MS + 50) * 1000,) * 2)   # SIGKILL past it
        if os.read(go_r, 1) == b"g":
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
            end = time.monotonic() + SPIN_MS / 1e3
            os.write(ready_w, b"r")
            while time.monotonic() < end:
                pass
    finally:
        os._exit(0)
os.close(go_r)
os.close(ready_w)
with open(pidfile, "w") as f:
    f.write(str(spinner))
spinner_reaped = False

try:
    # The request, sent after the first bump; the successor holds it behind the resent UNLINK.
    ask_r, ask_w = os.pipe()
    asker = os.fork()
    if asker == 0:
        os.close(ask_r)
        try:
            got = listing(dirfd) if how == "list" else os.stat(b).st_nlink
            os.write(ask_w, repr((got, cached_nlink(b))).encode())
        except OSError as e:
            os.write(ask_w, repr(("error", str(e))).encode())
        os._exit(0)
    os.close(ask_w)
    deadline = time.monotonic() + 5
    while not waiting_on_fuse(asker):
        if time.monotonic() > deadline:
            sys.exit("the %s did not wait on the successor" % how)
        time.sleep(0.001)
    time.sleep(0.02)

    os.write(go_w, b"g")
    if os.read(ready_r, 1) != b"r":
        sys.exit("the spinner could not take CPU %d (SCHED_FIFO refused?)" % cpu_b)
    gate_at = time.monotonic()
    open(gate, "w").close()   # the resent UNLINK's reply goes now; the rm cannot run
    answered = select.select([ask_r], [], [], SPIN_MS / 1e3 * 0.8)[0] != []
    answered_ms = (time.monotonic() - gate_at) * 1e3
    rm_ran = select.select([rm_r], [], [], 0)[0] != []
    spinning = os.waitpid(spinner, os.WNOHANG) == (0, 0)
    if not spinning:   # done already, and reaped: its pid is no longer ours
        spinner_reaped = True
        os.unlink(pidfile)
finally:
    if not spinner_reaped:   # not reaped yet (running or a zombie): the pid is still ours
        os.kill(spinner, signal.SIGKILL)
        os.waitpid(spinner, 0)
        os.unlink(pidfile)

got = ast.literal_eval(os.read(ask_r, 4096).decode() or "('error', 'no answer')")
os.waitpid(asker, 0)
rm_said = os.read(rm_r, 4096).decode()
os.waitpid(rm, 0)
held = answered and not rm_ran and spinning
what = ("%s answered %.0f ms after the gate (%s), rm %s; the kernel's cached nlink of b: %d before, %s after the answer"
        % (how, answered_ms, got[0], "still held" if held else "NOT held (rm ran: %s, spinner ran: %s)" % (rm_ran, spinning),
           before, got[1]))
if rm_said != "ok":
    sys.exit("rm d1/a: %s; %s" % (rm_said, what))
try:
    os.link(b, os.path.join(d2, "c"))
except OSError as e:
    sys.exit("ln d2/b d2/c: %s; %s" % (e, what))
if not held:
    sys.exit("the window was not held; %s" % what)
print("ln d2/b d2/c ok; %s; nlink %d" % (what, os.stat(b).st_nlink))
