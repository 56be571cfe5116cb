import Glibc
import Synchronization

/// Leaves this process created (so that a leftover `chargefs-<ourpid>` of an earlier process that
/// had our pid, e.g. pid 1 in a container, is told apart from our own).
///
/// Global on purpose: a leaf is named after the process (`chargefs-<pid>`), so what it answers,
/// "did this process make that leaf", is a fact about the process, shared by every charger in it
/// (the daemon has one; tests make many), and must be one set for them all.
private let createdLeaves = Mutex<Set<String>>([])

/// The leaf `<target>/chargefs-<daemonpid>` that holds the charge helper. A leaf rather than the
/// target itself because cgroup v2 forbids processes in a cgroup whose children use a controller
/// (a pod), and so that a leaf that holds a process is known to be live (see StaleLeafCleanup).
///
/// The target's own setup is left as found: in particular nothing is written to its
/// cgroup.subtree_control (enabling memory there would keep an emptied target from taking
/// processes after unmount). Where memory is not enabled for the target's children, the leaf has
/// no memory counters of its own and its pages are charged to the target directly; the totals are
/// the same either way.
public struct CgroupLeaf: Sendable {
    public let path: String
    public let version: CgroupVersion
    public var procsPath: String { path + "/cgroup.procs" }

    /// The leaf's own memory usage; nil where it has no memory counters.
    public var usage: Int64? {
        let file = path + (version == .v1 ? "/memory.usage_in_bytes" : "/memory.current")
        return (try? cgReadFile(file)).flatMap { Int64($0.cgTrimmed) }
    }

    /// Mapped pages charged to the leaf (the arena pages the daemon maps, the helper's own);
    /// 0 where the leaf has no memory counters.
    public var mappedBytes: Int64 {
        guard let stat = try? cgReadFile(path + "/memory.stat") else { return 0 }
        return cgStatValue(stat, version == .v1 ? "mapped_file" : "file_mapped") ?? 0
    }

    /// True while the leaf is frozen (v2 cgroup.freeze on it or an ancestor: docker pause,
    /// systemctl freeze): its processes run again only after the thaw.
    public var isFrozen: Bool {
        guard version == .v2, let events = try? cgReadFile(path + "/cgroup.events") else { return false }
        return cgStatValue(events, "frozen") == 1
    }

    /// Opens what starting a process in the leaf needs: the directory (clone3 CLONE_INTO_CGROUP,
    /// v2) and cgroup.procs (v1, and the fallback). Creates the leaf again if it was removed
    /// (e.g. by a `--cleanup` between two helpers); `.gone` when the target itself is gone.
    func openForSpawn(userPath: String) throws(CgroupError) -> (directory: Int32, procs: Int32) {
        for attempt in 0..<2 {
            let dir = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if dir >= 0 {
                let procs = open(procsPath, O_WRONLY | O_CLOEXEC)
                if procs >= 0 { return (dir, procs) }
                let e = errno
                close(dir)
                if e != ENOENT && e != ENODEV { throw cgErrnoError(userPath, e, what: "opening \(procsPath)") }
            } else if errno != ENOENT && errno != ENODEV {
                throw cgErrnoError(userPath, errno, what: "opening \(path)")
            }
            if attempt == 0, mkdir(path, 0o755) != 0, errno != EEXIST {
                let e = errno
                if e == ENOENT || e == ENODEV {
                    throw CgroupError(.gone, "memcg=\(userPath): the target cgroup was removed")
                }
                throw cgErrnoError(userPath, e, what: "mkdir \(path)")
            }
        }
        throw CgroupError(.gone, "memcg=\(userPath): the leaf cgroup \(path) keeps disappearing")
    }
}

extension CgroupTarget {
    static let leafPrefix = "chargefs-"

    /// Creates this process's leaf, first removing stale (empty) ones.
    public func createLeaf() throws(CgroupError) -> CgroupLeaf {
        _ = try? StaleLeafCleanup.run(resolved: resolvedPath, userPath: path)
        let pid = getpid()
        var n = 0
        while true {
            let name = n == 0 ? "\(Self.leafPrefix)\(pid)" : "\(Self.leafPrefix)\(pid).\(n)"
            let leaf = resolvedPath + "/" + name
            let claimed = createdLeaves.withLock { set in set.insert(leaf).inserted }
            if !claimed { n += 1; continue }
            if mkdir(leaf, 0o755) == 0 { return CgroupLeaf(path: leaf, version: version) }
            let e = errno
            // Same name as ours but not made by this process: stale if empty (rmdir succeeds),
            // else live (a daemon of that pid in another PID namespace): take the next name.
            if e == EEXIST {
                if rmdir(leaf) == 0, mkdir(leaf, 0o755) == 0 { return CgroupLeaf(path: leaf, version: version) }
                n += 1
                continue
            }
            _ = createdLeaves.withLock { $0.remove(leaf) }
            if e == EACCES || e == EPERM {
                throw CgroupError(.permissionDenied, "memcg=\(path): permission denied: cannot create \(leaf)")
            }
            throw cgErrnoError(path, e, what: "mkdir \(leaf)")
        }
    }

    /// Removes the leaf, waiting up to ~2 s for its exiting helper. The charge of pages the helper
    /// instantiated stays with the target (a removed memcg lingers until they are freed).
    public func removeLeaf(_ leaf: CgroupLeaf) throws(CgroupError) {
        defer { _ = createdLeaves.withLock { $0.remove(leaf.path) } }
        for _ in 0..<200 {
            if rmdir(leaf.path) == 0 { return }
            let e = errno
            if e == ENOENT || e == ENODEV { return }
            guard e == EBUSY else { throw cgErrnoError(leaf.path, e, what: "rmdir") }
            usleep(10_000)
        }
        let procs = ((try? cgReadFile(leaf.procsPath)) ?? "").split(separator: "\n").joined(separator: " ")
        throw CgroupError(.io, "cannot remove \(leaf.path): still holds process(es) \(procs)")
    }

    static func isOwnLeaf(_ path: String) -> Bool {
        createdLeaves.withLock { $0.contains(path) }
    }
}
