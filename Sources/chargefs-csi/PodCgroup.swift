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
        let procs = (try? String(contentsOfFile: mount.path + rel + "/cgroup.procs", encoding: .utf8)) ?? ""
        let pid = String(getpid())
        if !procs.split(separator: "\n").contains(where: { $0 == pid }) {
            return "this process's cgroup \(rel) does not hold it under \(mount.path): not the host's cgroup tree"
        }
        return nil
    }

    /// This process's memory cgroup relative to the hierarchy's mount ("/" for the root).
    func ownCgroupPath() -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8) else { return nil }
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
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
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
