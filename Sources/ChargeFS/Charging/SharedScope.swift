import Glibc
import Synchronization
import SystemPackage

/// What memcg=auto asks of the cgroups (see FileSystemCore+Shares): the scope P, the cgroup of
/// a calling process clamped to P, and the usage and limit of a cgroup and its ancestors up to P.
public protocol SharedScope: Sendable {
    /// P after realpath.
    var scopePath: String { get }
    /// The memory cgroup of process `pid` if it lies inside P, else P (a process outside P, or
    /// one whose /proc entry is gone, counts as P).
    func cgroupPath(ofProcess pid: Int32) -> String
    /// Usage and limit (nil: none) of `path` and each ancestor up to P, `path` first; levels
    /// without a limit file are left out, and so are levels that cannot be read.
    func levels(of path: String) -> [(cgroup: String, used: Int64, limit: Int64?)]
}

/// memcg=auto on this host's cgroups: /proc/PID/cgroup for who calls, each cgroup's counters
/// held open after its first use (one CgroupTarget per cgroup seen, dropped at unmount).
public final class CgroupSharedScope: SharedScope {
    public let scopePath: String
    let version: CgroupVersion
    let limitPolicy: CgroupLimitPolicy
    let root: String
    private let counters = Mutex<[String: CgroupTarget]>([:])

    public init(scope: CgroupTarget) {
        scopePath = scope.resolvedPath
        version = scope.version
        limitPolicy = scope.limitPolicy
        root = CgroupMembership.hierarchyRoot(of: scope.resolvedPath)
    }

    public func cgroupPath(ofProcess pid: Int32) -> String {
        guard let path = CgroupMembership.memoryCgroup(ofProcess: pid, root: root, version: version) else { return scopePath }
        return path == scopePath || path.hasPrefix(scopePath + "/") ? path : scopePath
    }

    public func levels(of path: String) -> [(cgroup: String, used: Int64, limit: Int64?)] {
        let target: CgroupTarget? = counters.withLock { cache in
            if let found = cache[path] { return found }
            guard let opened = try? CgroupTarget.resolve(path, limitPolicy: limitPolicy) else { return nil }
            cache[path] = opened
            return opened
        }
        guard let target, let usages = try? target.levelUsages(reclaimable: false) else { return [] }
        return usages.filter { $0.path == scopePath || $0.path.hasPrefix(scopePath + "/") }
            .map { (cgroup: $0.path, used: $0.usage, limit: $0.limit) }
    }
}
