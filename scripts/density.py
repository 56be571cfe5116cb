#!/usr/bin/env python3
"""100 volumes on one node: publish/unpublish latency, memory and CPU of idle volumes.

Driven by scripts/density.sh, which starts the plugin and prepares the kubelet dir and the
cgroup root. Usage: density.py ENDPOINT KUBELET_DIR CGROUP_ROOT PLUGIN_PID N CONCURRENCY
Pods are cgroups in the kubelet's cgroupfs layout (CGROUP_ROOT/kubepods/burstable/pod<uid>, v1
memory hierarchy), 64 MiB each. Prints a Markdown table.
"""
import concurrent.futures
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
import csi  # noqa: E402  (generates the CSI stubs)

MiB = 1 << 20
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))]


def proc_mem(pid):
    """(rss, pss, threads, cgroup of the memory hierarchy) of a process, bytes."""
    rss = pss = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    threads = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    cg = "?"
    with open("/proc/%d/cgroup" % pid) as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if "memory" in parts[1].split(","):
                cg = parts[2]
    return rss, pss, threads, cg


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def ppid(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def children_named(name):
    out = []
    for n in os.listdir("/proc"):
        if not n.isdigit():
            continue
        try:
            if open("/proc/%s/comm" % n).read().strip() == name:
                out.append(int(n))
        except OSError:
            pass
    return out


def main(argv):
    endpoint, kdir, cgroot, plugin_pid, n, conc = argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6])
    c = csi.Client(endpoint)
    pods = []
    for i in range(n):
        uid = str(uuid.uuid4())
        cg = os.path.join(cgroot, "kubepods", "burstable", "pod" + uid)
        os.makedirs(cg, exist_ok=True)
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(64 * MiB))
        target = os.path.join(kdir, "pods", uid, "volumes", "kubernetes.io~csi", "scratch", "mount")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pods.append((uid, "csi-%s" % uid, target, cg))

    def pub(p):
        t0 = time.monotonic()
        code, msg, _ = c.publish(p[1], p[2], p[0], {"size": "32Mi"})
        if code != "OK":
            raise RuntimeError("publish %s: %s %s" % (p[1], code, msg))
        return time.monotonic() - t0

    def unpub(p):
        t0 = time.monotonic()
        code, msg, _ = c.unpublish(p[1], p[2])
        if code != "OK":
            raise RuntimeError("unpublish %s: %s %s" % (p[1], code, msg))
        return time.monotonic() - t0

    rows = []
    plugin_rss0 = proc_mem(plugin_pid)[0]
    # one at a time
    t0 = time.monotonic()
    lat_pub1 = [pub(p) for p in pods]
    wall_pub1 = time.monotonic() - t0

    # every volume holds 1 MiB, written by this process (charged to the pod through memcg=)
    for p in pods:
        with open(os.path.join(p[2], "data"), "wb") as f:
            f.write(os.urandom(MiB))
    time.sleep(2)
    daemons = sorted({pid for p in pods for pid in csi.daemon_pids(p[2])})
    helpers = [h for h in children_named("chargefs-helper") if ppid(h) in daemons]
    dm = [proc_mem(d) for d in daemons]
    hm = [proc_mem(h) for h in helpers]
    plugin_rss = proc_mem(plugin_pid)[0]
    # idle CPU over 10 s: daemons, helpers and the plugin
    groups = {"daemons": daemons, "helpers": helpers, "plugin": [plugin_pid]}
    c0 = {k: sum(cpu_ticks(p) for p in v) for k, v in groups.items()}
    time.sleep(10)
    c1 = {k: sum(cpu_ticks(p) for p in v) for k, v in groups.items()}
    split = {k: (c1[k] - c0[k]) / HZ / 10.0 for k in groups}
    idle_cpu = sum(split.values())
    pod_usage = []
    for p in pods:
        with open(os.path.join(p[3], "memory.usage_in_bytes")) as f:
            pod_usage.append(int(f.read()))
    daemon_cg = sorted({m[3] for m in dm})
    daemon_cg_usage = 0
    for cg in daemon_cg:
        try:
            with open("/sys/fs/cgroup/memory" + cg + "/memory.usage_in_bytes") as f:
                daemon_cg_usage += int(f.read())
        except OSError:
            pass
    helper_cg = sorted({m[3].rsplit("/", 1)[0] + "/…" for m in hm})

    t0 = time.monotonic()
    lat_unpub1 = [unpub(p) for p in pods]
    wall_unpub1 = time.monotonic() - t0

    # 10 at once
    with concurrent.futures.ThreadPoolExecutor(max_workers=conc) as ex:
        t0 = time.monotonic()
        lat_pubc = list(ex.map(pub, pods))
        wall_pubc = time.monotonic() - t0
        plugin_rss_c = proc_mem(plugin_pid)[0]
        t0 = time.monotonic()
        lat_unpubc = list(ex.map(unpub, pods))
        wall_unpubc = time.monotonic() - t0
    left = [p for p in pods if csi.is_mounted(p[2])]

    ms = lambda s: "%.0f ms" % (s * 1000)
    mib = lambda b: "%.2f MiB" % (b / MiB)
    print("| measure (%d volumes, %d pods of 64 MiB) | value |" % (n, n))
    print("|---|---|")
    print("| publish one at a time: p50 / p99 / max | %s / %s / %s (all %d in %.1f s) |" % (ms(statistics.median(lat_pub1)), ms(pct(lat_pub1, 99)), ms(max(lat_pub1)), n, wall_pub1))
    print("| unpublish one at a time: p50 / p99 / max | %s / %s / %s (all in %.1f s) |" % (ms(statistics.median(lat_unpub1)), ms(pct(lat_unpub1, 99)), ms(max(lat_unpub1)), wall_unpub1))
    print("| publish %d at once: p50 / p99 / max | %s / %s / %s (all %d in %.1f s) |" % (conc, ms(statistics.median(lat_pubc)), ms(pct(lat_pubc, 99)), ms(max(lat_pubc)), n, wall_pubc))
    print("| unpublish %d at once: p50 / p99 / max | %s / %s / %s (all in %.1f s) |" % (conc, ms(statistics.median(lat_unpubc)), ms(pct(lat_unpubc, 99)), ms(max(lat_unpubc)), wall_unpubc))
    print("| daemons (one per volume) | %d |" % len(daemons))
    if dm:
        print("| daemon RSS: median (min-max) | %s (%s-%s) |" % (mib(statistics.median(m[0] for m in dm)), mib(min(m[0] for m in dm)), mib(max(m[0] for m in dm))))
        print("| daemon PSS: median (sum over all) | %s (%s) |" % (mib(statistics.median(m[1] for m in dm)), mib(sum(m[1] for m in dm))))
        print("| daemon threads: median (max) | %d (%d) |" % (statistics.median(m[2] for m in dm), max(m[2] for m in dm)))
        print("| daemon memory paid by | the driver's node-level cgroup %s: %s for all %d |" % (", ".join(daemon_cg), mib(daemon_cg_usage), len(dm)))
    print("| charge helpers | %d |" % len(hm))
    if hm:
        print("| helper RSS / PSS: median | %s / %s |" % (mib(statistics.median(m[0] for m in hm)), mib(statistics.median(m[1] for m in hm))))
        print("| helper threads | %d |" % max(m[2] for m in hm))
        print("| helper memory paid by | the pod: %s |" % ", ".join(helper_cg[:1]))
    print("| pod usage with 1 MiB stored: median (min-max) | %s (%s-%s) |" % (mib(statistics.median(pod_usage)), mib(min(pod_usage)), mib(max(pod_usage))))
    print("| plugin RSS: before / with %d volumes / after %d concurrent | %s / %s / %s |" % (n, conc, mib(plugin_rss0), mib(plugin_rss), mib(plugin_rss_c)))
    print("| CPU while idle, 10 s: all / daemons / helpers / plugin | %.1f / %.1f / %.1f / %.1f ms per s |" % (idle_cpu * 1000, split["daemons"] * 1000, split["helpers"] * 1000, split["plugin"] * 1000))
    print("| volumes left mounted at the end | %d |" % len(left))
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
