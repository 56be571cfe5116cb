#!/usr/bin/env python3
"""A CSI v1 client for chargefs-csi tests: real gRPC (grpcio) over the plugin's unix socket.

Stubs are generated at run time from Sources/CSIProto/csi.proto (grpc_tools.protoc) into a
temporary folder, so nothing generated is committed for Python.

Usage: csi.py ENDPOINT COMMAND ARGS...
  info                                   Identity and NodeGetInfo/Capabilities as JSON
  publish VOLID TARGET POD_UID [K=V...] [--ro] [--not-ephemeral] [--block]
                                         prints OK or the status code name and message
  unpublish VOLID TARGET                 prints OK or CODE message
  stats VOLID PATH                       prints JSON {"bytes": {...}, "inodes": {...},
                                         "condition": {"abnormal": B, "message": M}} or CODE
  suite SCRATCH POD_UID MISSING_POD_UID  every RPC and every error code; prints ok/FAIL lines
Exit status: 0 when the call returned OK (suite: when every check passed), 1 otherwise.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROTO_DIR = os.path.join(REPO, "Sources", "CSIProto")

_tmp = tempfile.mkdtemp(prefix="csi-py-")
try:
    from grpc_tools import protoc
    import grpc
    rc = protoc.main(["protoc", "-I" + PROTO_DIR,
                      "-I" + os.path.join(os.path.dirname(protoc.__file__), "_proto"),
                      "--python_out=" + _tmp, "--grpc_python_out=" + _tmp,
                      os.path.join(PROTO_DIR, "csi.proto")])
    if rc != 0:
        raise RuntimeError("grpc_tools.protoc failed with %d" % rc)
    sys.path.insert(0, _tmp)
    import csi_pb2 as pb  # noqa: E402
    import csi_pb2_grpc as pbg  # noqa: E402
finally:
    shutil.rmtree(_tmp, ignore_errors=True)

EPHEMERAL = "csi.storage.k8s.io/ephemeral"
POD_UID = "csi.storage.k8s.io/pod.uid"


class Client:
    def __init__(self, endpoint):
        target = endpoint if endpoint.startswith("unix:") else "unix://" + endpoint
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.identity = pbg.IdentityStub(self.channel)
        self.node = pbg.NodeStub(self.channel)

    def call(self, fn, req, timeout=120):
        """(code name, message, response)."""
        try:
            return "OK", "", fn(req, timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", None

    def publish(self, volid, target, pod_uid=None, attrs=None, ro=False, ephemeral=True,
                access="mount", capability=True):
        req = pb.NodePublishVolumeRequest(volume_id=volid, target_path=target, readonly=ro)
        if capability:
            cap = pb.VolumeCapability()
            cap.access_mode.mode = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            if access == "mount":
                cap.mount.SetInParent()
            elif access == "block":
                cap.block.SetInParent()
            req.volume_capability.CopyFrom(cap)
        ctx = dict(attrs or {})
        if ephemeral:
            ctx[EPHEMERAL] = "true"
        if pod_uid is not None:
            ctx[POD_UID] = pod_uid
            ctx["csi.storage.k8s.io/pod.name"] = "test-pod"
            ctx["csi.storage.k8s.io/pod.namespace"] = "default"
            ctx["csi.storage.k8s.io/serviceAccount.name"] = "default"
        req.volume_context.update(ctx)
        return self.call(self.node.NodePublishVolume, req)

    def unpublish(self, volid, target):
        return self.call(self.node.NodeUnpublishVolume,
                         pb.NodeUnpublishVolumeRequest(volume_id=volid, target_path=target))

    def stats(self, volid, path):
        code, msg, r = self.call(self.node.NodeGetVolumeStats,
                                 pb.NodeGetVolumeStatsRequest(volume_id=volid, volume_path=path))
        if r is None:
            return code, msg, None
        out = {}
        for u in r.usage:
            name = pb.VolumeUsage.Unit.Name(u.unit).lower()
            out[name] = {"total": u.total, "used": u.used, "available": u.available}
        if r.HasField("volume_condition"):
            out["condition"] = {"abnormal": r.volume_condition.abnormal,
                                "message": r.volume_condition.message}
        return code, msg, out

    def info(self):
        out = {}
        _, _, r = self.call(self.identity.GetPluginInfo, pb.GetPluginInfoRequest())
        out["name"], out["vendor_version"] = r.name, r.vendor_version
        _, _, r = self.call(self.identity.GetPluginCapabilities, pb.GetPluginCapabilitiesRequest())
        out["plugin_capabilities"] = [pb.PluginCapability.Service.Type.Name(c.service.type)
                                      for c in r.capabilities]
        _, _, r = self.call(self.identity.Probe, pb.ProbeRequest())
        out["probe_ready"] = r.ready.value if r.HasField("ready") else None
        _, _, r = self.call(self.node.NodeGetInfo, pb.NodeGetInfoRequest())
        out["node_id"], out["max_volumes_per_node"] = r.node_id, r.max_volumes_per_node
        _, _, r = self.call(self.node.NodeGetCapabilities, pb.NodeGetCapabilitiesRequest())
        out["node_capabilities"] = [pb.NodeServiceCapability.RPC.Type.Name(c.rpc.type)
                                    for c in r.capabilities]
        return out


def status_xattr(path):
    raw = os.getxattr(path, "user.chargefs.status").decode()
    return dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)


def daemon_pids(target):
    out = []
    for n in os.listdir("/proc"):
        if not n.isdigit():
            continue
        try:
            args = open("/proc/%s/cmdline" % n, "rb").read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"chargefsd") and target.encode() in args:
            out.append(int(n))
    return out


def is_mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def suite(c, scratch, pod_uid, missing_uid):
    """Every RPC and every error code the plugin can return, with real outcomes."""
    fails = []

    def check(what, cond, detail=""):
        print(("  ok: " if cond else "  FAIL: ") + what + ("" if cond else "  [%s]" % detail),
              file=sys.stderr, flush=True)
        if not cond:
            fails.append(what)

    def expect(what, got, code, needle=None):
        c_, msg, _ = got
        ok = c_ == code and (needle is None or needle in msg)
        check("%s -> %s%s" % (what, code, "" if needle is None else " naming %r" % needle), ok,
              "%s: %s" % (c_, msg))

    info = c.info()
    check("GetPluginInfo name csi.chargefs.io", info["name"] == "csi.chargefs.io", info)
    check("GetPluginInfo has a vendor_version", bool(info["vendor_version"]), info)
    check("GetPluginCapabilities: no CONTROLLER_SERVICE", "CONTROLLER_SERVICE" not in info["plugin_capabilities"], info)
    check("Probe ready", info["probe_ready"] is True, info)
    check("NodeGetInfo node_id", info["node_id"] == "test-node", info)
    check("NodeGetCapabilities = [GET_VOLUME_STATS, VOLUME_CONDITION]",
          info["node_capabilities"] == ["GET_VOLUME_STATS", "VOLUME_CONDITION"], info)

    tgt = os.path.join(scratch, "pods", "vol-a")
    os.makedirs(os.path.dirname(tgt), exist_ok=True)
    # NodePublishVolume: missing and malformed input
    expect("publish without volume_id", c.publish("", tgt, pod_uid), "INVALID_ARGUMENT", "volume_id")
    expect("publish without target_path", c.publish("v1", "", pod_uid), "INVALID_ARGUMENT", "target_path")
    expect("publish without capability", c.publish("v1", tgt, pod_uid, capability=False), "INVALID_ARGUMENT", "volume_capability")
    expect("publish with no access_type", c.publish("v1", tgt, pod_uid, access=None), "INVALID_ARGUMENT", "access_type")
    expect("publish block access", c.publish("v1", tgt, pod_uid, access="block"), "INVALID_ARGUMENT", "block")
    expect("publish a non-ephemeral volume", c.publish("v1", tgt, pod_uid, ephemeral=False), "INVALID_ARGUMENT", "ephemeral")
    expect("publish without pod uid", c.publish("v1", tgt, None), "INVALID_ARGUMENT", "podInfoOnMount")
    expect("publish with a pod uid that is a path", c.publish("v1", tgt, "../../etc"), "INVALID_ARGUMENT", "pod.uid")
    expect("publish relative target_path", c.publish("v1", "rel/path", pod_uid), "INVALID_ARGUMENT", "absolute")
    for k, v in [("size", "64Qi"), ("size", "-1Mi"), ("size", "1.5.5G"), ("size", "abc"), ("size", "99999999999Ei"),
                 ("nr_inodes", "lots"), ("mode", "999"), ("mode", "rwx"), ("cache", "writeback")]:
        expect("publish %s=%s" % (k, v), c.publish("v1", tgt, pod_uid, {k: v}), "INVALID_ARGUMENT", k)
    expect("publish with unknown attribute", c.publish("v1", tgt, pod_uid, {"sizee": "1Gi"}), "INVALID_ARGUMENT", "sizee")
    expect("publish for a pod whose cgroup never appears", c.publish("v1", tgt, missing_uid), "UNAVAILABLE", missing_uid)
    check("nothing mounted or left at the target after refusals", not os.path.exists(tgt))

    # Quantities reach chargefsd as bytes (its status shows the limit it was given).
    for q, want in [("64Mi", 64 << 20), ("500M", 500 * 10**6), ("1Gi", 1 << 30), ("1048576", 1 << 20),
                    ("0.5Gi", 1 << 29), ("2e6", 2 * 10**6), ("1.5k", 1500)]:
        code, msg, _ = c.publish("vq", tgt, pod_uid, {"size": q})
        got = status_xattr(tgt).get("size_limit_bytes") if code == "OK" else None
        check("size=%s -> size_limit_bytes %d" % (q, want), code == "OK" and got == str(want), "%s %s got %s" % (code, msg, got))
        c.unpublish("vq", tgt)

    # The real thing.
    attrs = {"size": "32Mi", "nr_inodes": "1000", "mode": "1777", "cache": "direct"}
    expect("publish", c.publish("v1", tgt, pod_uid, attrs), "OK")
    check("target is a fuse.chargefsd mount", is_mounted(tgt))
    st = os.stat(tgt)
    check("volume root mode 1777", oct(st.st_mode & 0o7777) == "0o1777", oct(st.st_mode))
    with open(os.path.join(tgt, "hello"), "wb") as f:
        f.write(b"x" * (3 << 20))
    expect("publish the same again (idempotent)", c.publish("v1", tgt, pod_uid, attrs), "OK")
    with open(os.path.join(tgt, "hello"), "rb") as f:
        check("data survives the repeated publish", f.read() == b"x" * (3 << 20))
    expect("same id, other target", c.publish("v1", tgt + "-other", pod_uid, attrs), "ALREADY_EXISTS", "v1")
    expect("same id, other size", c.publish("v1", tgt, pod_uid, dict(attrs, size="64Mi")), "ALREADY_EXISTS", "v1")
    expect("same id, read-only", c.publish("v1", tgt, pod_uid, attrs, ro=True), "ALREADY_EXISTS", "v1")
    expect("other id, same target", c.publish("v2", tgt, pod_uid, attrs), "ALREADY_EXISTS", "v1")
    check("the other target was not created", not os.path.exists(tgt + "-other"))

    # NodeGetVolumeStats
    code, msg, s = c.stats("v1", tgt)
    check("stats OK", code == "OK", "%s %s" % (code, msg))
    check("stats condition normal, serving", s and s.get("condition") == {"abnormal": False, "message": "serving"}, s)
    if s:
        vfs = os.statvfs(tgt)
        check("stats bytes total = statvfs (%d)" % (vfs.f_blocks * vfs.f_frsize), s["bytes"]["total"] == vfs.f_blocks * vfs.f_frsize, s)
        check("stats bytes total <= size 32Mi", 0 < s["bytes"]["total"] <= 32 << 20, s)
        check("stats bytes used >= 3 MiB written", s["bytes"]["used"] >= 3 << 20, s)
        check("stats bytes available = total - used", s["bytes"]["available"] == s["bytes"]["total"] - s["bytes"]["used"], s)
        check("stats inodes total 1000", s["inodes"]["total"] == 1000, s)
        check("stats inodes used >= 2 (root, hello)", s["inodes"]["used"] >= 2, s)
    expect("stats without volume_id", c.stats("", tgt), "INVALID_ARGUMENT", "volume_id")
    expect("stats without volume_path", c.stats("v1", ""), "INVALID_ARGUMENT", "volume_path")
    expect("stats of an unknown volume", c.stats("nope", tgt), "NOT_FOUND", "nope")
    expect("stats of a path that is not the volume", c.stats("v1", scratch), "NOT_FOUND", scratch)

    # read-only publish of another volume
    tro = os.path.join(scratch, "pods", "vol-ro")
    expect("publish read-only", c.publish("vro", tro, pod_uid, {"size": "1Mi"}, ro=True), "OK")
    try:
        open(os.path.join(tro, "f"), "w")
        check("read-only volume refuses writes", False, "write succeeded")
    except OSError as e:
        check("read-only volume refuses writes (EROFS)", e.errno == 30, e)
    expect("unpublish read-only", c.unpublish("vro", tro), "OK")

    # A second call for a volume while the first is still in progress: ABORTED. The first
    # waits (1 s) for a pod cgroup that never appears.
    import threading
    first = {}
    t = threading.Thread(target=lambda: first.update(r=c.publish("vbusy", tgt + "-busy", missing_uid)))
    t.start()
    import time
    time.sleep(0.3)
    expect("publish while the same volume's publish is in progress", c.publish("vbusy", tgt + "-busy", missing_uid), "ABORTED", "in progress")
    t.join()
    check("the first call still ends UNAVAILABLE", first["r"][0] == "UNAVAILABLE", first)

    # INTERNAL: the target's parent does not exist (the CO creates it), so nothing can be mounted
    expect("publish under a missing parent", c.publish("vnp", os.path.join(scratch, "no-such-dir", "t"), pod_uid), "INTERNAL", "no-such-dir")

    # A volume without takeover whose chargefsd died (SIGKILL): stats say abnormal with the
    # cause; publishing it again clears the dead mount and serves an empty volume; unpublish
    # works either way. (With takeover, the default, csi.sh's takeover test kills it.)
    tdead = os.path.join(scratch, "pods", "vol-dead")
    dead_attrs = {"size": "4Mi", "takeover": "false"}
    expect("publish (to be killed)", c.publish("vdead", tdead, pod_uid, dead_attrs), "OK")
    pids = daemon_pids(tdead)
    check("its chargefsd processes (daemon, charge helper) found", len(pids) >= 1, pids)
    for p in pids:
        os.kill(p, 9)
    for _ in range(50):
        if not daemon_pids(tdead):
            break
        time.sleep(0.1)
    code, msg, s1 = c.stats("vdead", tdead)
    check("stats of a volume whose daemon was killed: OK, abnormal, ENOTCONN, no usage",
          code == "OK" and s1.get("condition", {}).get("abnormal") is True
          and "ENOTCONN" in s1["condition"]["message"] and "bytes" not in s1, (code, msg, s1))
    expect("publish it again: remounted", c.publish("vdead", tdead, pod_uid, dead_attrs), "OK")
    code, _, s2 = c.stats("vdead", tdead)
    check("it serves again (stats OK, normal, empty)", code == "OK" and s2["inodes"]["used"] == 1
          and s2["condition"]["abnormal"] is False, (code, s2))
    expect("unpublish it", c.unpublish("vdead", tdead), "OK")
    check("its target is gone", not os.path.exists(tdead))

    # NodeUnpublishVolume
    expect("unpublish without volume_id", c.unpublish("", tgt), "INVALID_ARGUMENT", "volume_id")
    expect("unpublish without target_path", c.unpublish("v1", ""), "INVALID_ARGUMENT", "target_path")
    expect("unpublish", c.unpublish("v1", tgt), "OK")
    check("target unmounted", not is_mounted(tgt))
    check("target directory removed", not os.path.exists(tgt))
    expect("unpublish again (idempotent)", c.unpublish("v1", tgt), "OK")
    expect("unpublish an unknown volume", c.unpublish("never-published", tgt), "OK")
    expect("stats after unpublish", c.stats("v1", tgt), "NOT_FOUND", "v1")

    print("suite: %d failed" % len(fails), file=sys.stderr)
    return 0 if not fails else 1


def main(argv):
    if len(argv) < 3 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
    c = Client(argv[1])
    cmd, args = argv[2], argv[3:]
    if cmd == "info":
        print(json.dumps(c.info(), sort_keys=True))
        return 0
    if cmd == "publish":
        flags = [a for a in args if a.startswith("--")]
        pos = [a for a in args if not a.startswith("--")]
        volid, target, pod = pos[0], pos[1], pos[2]
        attrs = dict(a.split("=", 1) for a in pos[3:])
        code, msg, _ = c.publish(volid, target, pod, attrs, ro="--ro" in flags,
                                 ephemeral="--not-ephemeral" not in flags,
                                 access="block" if "--block" in flags else "mount")
        print(code if code == "OK" else "%s %s" % (code, msg))
        return 0 if code == "OK" else 1
    if cmd == "unpublish":
        code, msg, _ = c.unpublish(args[0], args[1])
        print(code if code == "OK" else "%s %s" % (code, msg))
        return 0 if code == "OK" else 1
    if cmd == "stats":
        code, msg, s = c.stats(args[0], args[1])
        print(json.dumps(s, sort_keys=True) if code == "OK" else "%s %s" % (code, msg))
        return 0 if code == "OK" else 1
    if cmd == "suite":
        return suite(c, args[0], args[1], args[2])
    print("unknown command %s" % cmd, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
