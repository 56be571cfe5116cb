#!/usr/bin/env python3
"""What the kernel does with a dead FUSE-over-io_uring server's requests (scripts/tests/uring.sh,
takeover_uring_kernel; docs/takeover.md "io_uring").

Usage: uring_takeover.py MNT KEEPER_PID LOG

The mount is a `-o takeover,io_uring=on` chargefsd under the test hooks
CHARGEFS_TEST_TAKEOVER_URING (a takeover mount served over io_uring; each successor registers new
ring entries) and CHARGEFS_TEST_KILL_BEFORE_REPLY=mkdir (the server SIGKILLs itself after applying
the first MKDIR, before its reply). The other callers use statfs (STATFS: never answered from the
kernel's caches, and takes no directory lock, while the held mkdir holds MNT's). Steps:
  1. the keeper is stopped (SIGSTOP), so no successor starts until step 4;
  2. caller "held": mkdir MNT/held from the first CPU: the server takes it in a ring entry, applies it and
     dies without answering (the ring entry of a dead io_uring instance holds it);
  3. callers "queuedN": statfs MNT from each of (up to) two CPUs N, issued 0.3 s after
     the death: they wait in the kernel's per-CPU ring queues, no entry being available;
  4. the keeper resumes: its successor replays INIT, registers new ring entries on the live
     connection and writes FUSE_NOTIFY_RESEND;
  5. 3 s later: who has been answered, with what, after how long;
  6. "kick": one statfs of MNT from each CPU (new requests, after the successor registered);
  7. 2 s later: who has been answered;
  8. SIGKILL to every caller still waiting; 1 s later: which of them are gone (their pids are
     printed: the shell test then answers the held request from another process).
Prints one line per fact, `name=value`, for the shell test to assert; exits 0 if it ran.
"""
import json, os, signal, subprocess, sys, time

mnt, keeper, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out_dir = os.path.dirname(log)
signal.alarm(60)

CALLER = r'''
import errno, json, os, sys, time
op, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.monotonic()
try:
    if op == "mkdir":
        os.mkdir(path, 0o750)
    else:
        os.statvfs(path)
    r = "ok"
except OSError as e:
    r = errno.errorcode.get(e.errno, str(e.errno))
open(out + ".tmp", "w").write(json.dumps({"result": r, "start": t, "end": time.monotonic()}))
os.rename(out + ".tmp", out)
'''


def spawn(name, cpu, op, path):
    out = os.path.join(out_dir, "caller-" + name + ".json")
    p = subprocess.Popen([sys.executable, "-c", CALLER, op, path, out],
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    return {"name": name, "proc": p, "out": out, "cpu": cpu}


def result(c):
    try:
        return json.load(open(c["out"]))
    except (OSError, ValueError):
        return None


def state(pid):
    try:
        fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        wchan = open("/proc/%d/wchan" % pid).read().strip()
        return fields[0] + ":" + (wchan or "-")
    except OSError:
        return "gone"


def report(tag, callers, since):
    for c in callers:
        r = result(c)
        if r:
            print("%s.%s=%s after %.1f ms" % (tag, c["name"], r["result"], (r["end"] - (r["start"] if since is None else since)) * 1e3))
        else:
            print("%s.%s=waiting (%s)" % (tag, c["name"], state(c["proc"].pid)))
    sys.stdout.flush()


def log_has(text):
    try:
        return text in open(log, errors="replace").read()
    except OSError:
        return False


# The kernel puts a request on the queue of the CPU its caller runs on: callers are pinned, to at
# most two of the CPUs this may run on (one queue each).
cpus = sorted(os.sched_getaffinity(0))[:2]
print("cpus=%s" % ",".join(str(c) for c in cpus))
server = int(subprocess.run(["pgrep", "-P", str(keeper), "-x", "chargefsd"], capture_output=True,
                            text=True).stdout.split()[0])
pidfd = os.pidfd_open(server)
os.kill(keeper, signal.SIGSTOP)
try:
    held = spawn("held", cpus[0], "mkdir", os.path.join(mnt, "held"))
    import select
    dead = bool(select.select([pidfd], [], [], 10)[0])
    t_death = time.monotonic()
    print("server_died_on_mkdir=%s" % ("yes" if dead else "no"))
    time.sleep(0.3)
    queued = [spawn("queued%d" % c, c, "statfs", mnt) for c in cpus]
    time.sleep(1.0)
    callers = [held] + queued
    report("before_successor", callers, t_death)
finally:
    os.kill(keeper, signal.SIGCONT)
t_cont = time.monotonic()
deadline = t_cont + 20
while time.monotonic() < deadline and not log_has("serves (takeover 1)"):
    time.sleep(0.05)
t_serve = time.monotonic()
print("successor_serving=%s after %.0f ms" % ("yes" if log_has("serves (takeover 1)") else "no",
                                               (t_serve - t_cont) * 1e3))
print("successor_registered=%s" % ("yes" if log_has("serving over io_uring") and
                                   open(log, errors="replace").read().count("serving over io_uring") >= 2 else "no"))
time.sleep(3)
report("after_successor", callers, t_serve)
kicks = []
for cpu in cpus:
    k = spawn("kick%d" % cpu, cpu, "statfs", mnt)
    try:
        k["proc"].wait(5)
    except subprocess.TimeoutExpired:
        pass
    kicks.append(k)
t_kick = time.monotonic()
report("kick", kicks, None)
time.sleep(2)
report("after_kick", callers, t_kick)
waiting = [c for c in callers if result(c) is None]
for c in waiting:
    c["proc"].kill()
time.sleep(1)
for c in waiting:
    print("after_sigkill.%s=%s" % (c["name"], state(c["proc"].pid)))
for c in callers:
    print("pid.%s=%d" % (c["name"], c["proc"].pid))
for line in open(log, errors="replace"):
    if ("io_uring" in line or "takeover" in line) and "io_uring test:" not in line:
        print("log: " + line.rstrip())
