import Foundation

/// The node's memory cgroup tree as this plugin sees it: where it is, which version, and whether
/// it is the host's real tree (a private cgroup namespace would show a container its own subtree,
/// where no pod's cgroup can be found and no ancestor's limit read).
struct CgroupTree: Sendable {
    enum Version: Sendable { case v1, v2 }
    /// The memory hierarchy: --cgroup-root itself on cgroup v2, or its memory/ on a v1 host.
    let root: String
    let version: Version

    /// Finds the memory hierarchy at or below `cgroupRoot` (default /sys/fs/cgroup).
    static func find(cgroupRoot: String) -> Result<CgroupTree, CSIError> {
        let fm = FileManager.default
        let root = cgroupRoot.count > 1 && cgroupRoot.hasSuffix("/")
            ? String(cgroupRoot.dropLast()) : cgroupRoot
        if let controllers = try? String(contentsOfFile: root + "/cgroup.controllers", encoding: .utf8),
           controllers.split(separator: " ").contains(where: { $0.trimmingCharacters(in: .whitespacesAndNewlines) == "memory" }) {
            return .success(CgroupTree(root: root, version: .v2))
        }
        if fm.fileExists(atPath: root + "/memory/memory.usage_in_bytes") {
            return .success(CgroupTree(root: root + "/memory", version: .v1))
        }
        if fm.fileExists(atPath: root + "/memory.usage_in_bytes") {
            return .success(CgroupTree(root: root, version: .v1))
        }
        // A non-root v2 cgroup has no cgroup.controllers listing memory unless its parent
        // enabled it; memory.current then shows it is usable.
        if fm.fileExists(atPath: root + "/memory.current") {
            return .success(CgroupTree(root: root, version: .v2))
        }
        return .failure(CSIError(.failedPrecondition,
            "no memory cgroup controller at \(root) (neither cgroup v2 with memory nor a v1 memory hierarchy)"))
    }

    /// Why this process does not see the host's cgroup tree, or nil when it does. Checked at
    /// start; publishing is refused while it is not nil, rather than mounting a volume whose
    /// limit (or whose ancestors' limits) the daemon cannot read, which could end in OOM kills.
    func hostViewProblem() -> String? {
        // 1. Another cgroup namespace than the host's init (visible with hostPID).
        if let own = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/cgroup"),
           let initNS = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/1/ns/cgroup"),
           own != initNS {
            return "this process is in a private cgroup namespace (\(own), host init has \(initNS)): run the plugin with the host's cgroup namespace and hostPID"
        }
        // 2. Our own cgroup, as /proc/self/cgroup names it, must hold us in this tree; in a
        //    cgroup namespace or a bind-mounted subtree it names a path that does not.
        guard let rel = ownCgroupPath() else {
            return "cannot read this process's memory cgroup from /proc/self/cgroup"
        }
        guard let mount = mountPoint(containing: root) else {
            return "\(root) is not on a cgroup filesystem"
        }
        if mount.fsRoot != "/" {
            return "the cgroup filesystem at \(mount.path) shows the subtree \(mount.fsRoot), not the host's whole tree (a private cgroup namespace?)"
        }
        let procs = readKernelFile(mount.path + rel + "/cgroup.procs") ?? ""
        let pid = String(getpid())
        if !procs.split(separator: "\n").contains(where: { $0 == pid }) {
            return "this process's cgroup \(rel) does not hold it under \(mount.path): not the host's cgroup tree"
        }
        return nil
    }

    /// This process's memory cgroup relative to the hierarchy's mount ("/" for the root).
    func ownCgroupPath() -> String? {
        guard let text = readKernelFile("/proc/self/cgroup") else { return nil }
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            switch version {
            case .v2 where parts[0] == "0" && parts[1].isEmpty:
                return parts[2] == "/" ? "" : String(parts[2])
            case .v1 where parts[1].split(separator: ",").contains("memory"):
                return parts[2] == "/" ? "" : String(parts[2])
            default: continue
            }
        }
        return nil
    }

    struct Mount { let path: String; let fsRoot: String }

    /// The cgroup mount whose mount point is the longest prefix of `path` (from mountinfo).
    func mountPoint(containing path: String) -> Mount? {
        guard let text = readKernelFile("/proc/self/mountinfo") else { return nil }
        var best: Mount?
        for line in text.split(separator: "\n") {
            let halves = line.components(separatedBy: " - ")
            guard halves.count >= 2 else { continue }
            let left = halves[0].split(separator: " ")
            let right = halves[1].split(separator: " ")
            guard left.count >= 5, right.count >= 3 else { continue }
            let fstype = right[0]
            let superOpts = right[2].split(separator: ",")
            let isMemory = fstype == "cgroup2" || (fstype == "cgroup" && superOpts.contains("memory"))
            guard isMemory else { continue }
            let mnt = unescapeMountinfo(String(left[4]))
            guard path == mnt || path.hasPrefix(mnt == "/" ? "/" : mnt + "/") else { continue }
            if best == nil || mnt.count > (best?.path.count ?? 0) {
                best = Mount(path: mnt, fsRoot: unescapeMountinfo(String(left[3])))
            }
        }
        return best
    }
}

/// The whole of a procfs or cgroupfs file. Foundation's String(contentsOfFile:) trusts the size
/// stat reports, 0 for these, and returns only its first read: on this host /proc/self/mountinfo
/// came back cut at 3,935 of 7,798 bytes, so mounts past the first page were not seen (a
/// published volume reported "not a chargefsd mount" once a node had a few dozen mounts).
func readKernelFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { return nil }
        if n == 0 { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

/// Octal escapes (\040 for a space) in /proc/self/mountinfo fields.
func unescapeMountinfo(_ s: String) -> String {
    guard s.contains("\\") else { return s }
    var out = [UInt8]()
    let b = Array(s.utf8)
    var i = 0
    while i < b.count {
        if b[i] == UInt8(ascii: "\\"), i + 3 < b.count,
           let v = UInt8(String(decoding: b[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
            out.append(v); i += 4
        } else {
            out.append(b[i]); i += 1
        }
    }
    return String(decoding: out, as: UTF8.self)
}

/// Where the kubelet puts a pod's cgroup, for both cgroup drivers and every QoS class
/// (kubelet cgroup_manager_linux.go), below the memory hierarchy's root.
enum PodCgroup {
    /// A pod uid as the API server makes it (a UUID); anything else could name a path outside.
    static func isValidUID(_ uid: String) -> Bool {
        !uid.isEmpty && uid.count <= 64
            && uid.unicodeScalars.allSatisfy { ($0.value >= 48 && $0.value <= 57) || ($0.value >= 97 && $0.value <= 102)
                || ($0.value >= 65 && $0.value <= 70) || $0 == "-" }
    }

    /// Candidate paths relative to the tree's root, in the order they are looked for.
    static func candidates(uid: String) -> [String] {
        let u = uid.replacingOccurrences(of: "-", with: "_")  // systemd unit names use _ for -
        return [
            // systemd driver
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod\(u).slice",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod\(u).slice",
            "kubepods.slice/kubepods-pod\(u).slice",
            // cgroupfs driver
            "kubepods/burstable/pod\(uid)",
            "kubepods/besteffort/pod\(uid)",
            "kubepods/pod\(uid)",
        ]
    }

    /// The pod's cgroup if it exists now.
    static func lookup(root: String, uid: String) -> String? {
        var isDir: ObjCBool = false
        for rel in candidates(uid: uid) {
            let p = root + "/" + rel
            if FileManager.default.fileExists(atPath: p, isDirectory: &isDir), isDir.boolValue { return p }
        }
        return nil
    }

    /// Waits up to `timeout` seconds for the pod's cgroup: the kubelet creates it before it
    /// mounts volumes, but the mount runs in another loop, so it may lag.
    static func wait(root: String, uid: String, timeout: Double) async -> String? {
        let deadline = ContinuousClock.now + .milliseconds(Int64(timeout * 1000))
        while true {
            if let p = lookup(root: root, uid: uid) { return p }
            if ContinuousClock.now >= deadline { return nil }
            try? await Task.sleep(for: .milliseconds(100))
        }
    }
}

/// The node-level cgroups the chargefsd daemons run in: one on every hierarchy where this
/// plugin is not at the root. A container runtime gives the plugin's container a cgroup on every
/// hierarchy (v1: cpu, memory, pids, freezer, devices...; v2: one) and, when it stops the
/// container, freezes and kills every process in them (runc reads the pids of its devices and
/// freezer cgroups on v1) and then removes them. A daemon left in any one of them dies with the
/// plugin, and the pod's data with it; so every daemon is born in cgroups of the driver's own.
enum DaemonCgroups {
    /// Creates `relative` (e.g. "csi.chargefs.io") below the root of each hierarchy this
    /// process is in, except those where it is at the root (nothing there to leave) and the
    /// memory hierarchy (`memoryCgroup`, created by the caller, always used). Returns the
    /// cgroup.procs files to write a daemon's pid into, memory's first.
    static func prepare(memoryCgroup: String, relative: String) -> Result<[String], CSIError> {
        var procs = [memoryCgroup + "/cgroup.procs"]
        guard let own = readKernelFile("/proc/self/cgroup"),
              let mountinfo = readKernelFile("/proc/self/mountinfo") else {
            return .failure(CSIError(.internal, "cannot read /proc/self/cgroup and /proc/self/mountinfo"))
        }
        let mounts = cgroupMounts(mountinfo)
        for line in own.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3, parts[2] != "/" else { continue }
            let controllers = Set(parts[1].split(separator: ",").map(String.init))
            if controllers.contains("memory") { continue }
            // v2 is "0::PATH"; a v1 hierarchy is named by its controllers (or name=...)
            guard let mount = mounts.first(where: { m in
                controllers.isEmpty ? m.v2 : (!m.v2 && controllers.isSubset(of: m.options))
            }) else {
                return .failure(CSIError(.failedPrecondition,
                    "this process is in cgroup \(parts[2]) of hierarchy \"\(parts[1])\", which is not mounted here: daemons cannot leave it (mount /sys/fs/cgroup of the host into the plugin)"))
            }
            let dir = mount.path + "/" + relative
            if let err = create(dir, below: mount.path) { return .failure(err) }
            let p = dir + "/cgroup.procs"
            if !procs.contains(p) { procs.append(p) }
        }
        return .success(procs)
    }

    struct CgroupMount { let path: String; let v2: Bool; let options: Set<String> }

    /// Every cgroup mount showing its hierarchy's whole tree (a bind of a subtree would put the
    /// daemons' cgroup inside the one they leave), first mount first.
    static func cgroupMounts(_ mountinfo: String) -> [CgroupMount] {
        var out: [CgroupMount] = []
        for line in mountinfo.split(separator: "\n") {
            let halves = line.components(separatedBy: " - ")
            guard halves.count >= 2 else { continue }
            let left = halves[0].split(separator: " "), right = halves[1].split(separator: " ")
            guard left.count >= 5, right.count >= 3, left[3] == "/" else { continue }
            let path = unescapeMountinfo(String(left[4]))
            if right[0] == "cgroup2" {
                out.append(CgroupMount(path: path, v2: true, options: []))
            } else if right[0] == "cgroup" {
                out.append(CgroupMount(path: path, v2: false, options: Set(right[2].split(separator: ",").map(String.init))))
            }
        }
        return out
    }

    /// mkdir -p of a cgroup; a new cpuset cgroup gets its parent's cpus and mems (v1 starts it
    /// with none, and no process can join it then).
    private static func create(_ dir: String, below root: String) -> CSIError? {
        var path = root
        for comp in dir.dropFirst(root.count).split(separator: "/") {
            let parent = path
            path += "/" + comp
            if mkdir(path, 0o755) != 0 && errno != EEXIST {
                return CSIError(.internal, "cannot create the daemons' cgroup \(path): \(String(cString: strerror(errno)))")
            }
            for f in ["cpuset.cpus", "cpuset.mems"] {
                guard let cur = try? String(contentsOfFile: path + "/" + f, encoding: .utf8),
                      cur.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty,
                      let up = try? String(contentsOfFile: parent + "/" + f, encoding: .utf8) else { continue }
                do {
                    try up.write(toFile: path + "/" + f, atomically: false, encoding: .utf8)
                } catch {
                    return CSIError(.internal, "cannot give the daemons' cgroup \(path) its parent's \(f): \(error.localizedDescription)")
                }
            }
        }
        return nil
    }
}
