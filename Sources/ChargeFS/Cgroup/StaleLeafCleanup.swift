import Glibc

/// Finds and removes the leaves (`chargefs-*` children of a target) that dead daemons left.
///
/// A leaf is live exactly when a process is in it: the charge helper dies with its daemon (its
/// socket reads EOF when the daemon's end closes), and a live daemon keeps
/// a helper in its leaf between charges. So a leaf is stale when rmdir succeeds, which the kernel
/// decides atomically; nothing is judged by pid numbers (they differ between PID namespaces) and
/// no process is ever killed. A live daemon whose leaf was removed in the instant between two
/// helpers creates it again.
public enum StaleLeafCleanup {
    public struct Result: Sendable, Equatable {
        /// Stale leaves removed.
        public var removed: [String] = []
        /// Leaves holding a process: a live daemon's, kept.
        public var inUse: [String] = []
    }

    /// Cleans the stale leaves below the target at `path` (as given by the user), which must be
    /// a memory cgroup the caller may use as a target.
    public static func run(target path: String) throws(CgroupError) -> Result {
        let target = try CgroupTarget.resolve(path)
        return try run(resolved: target.resolvedPath, userPath: path)
    }

    static func run(resolved: String, userPath: String) throws(CgroupError) -> Result {
        guard let names = cgDirectoryNames(resolved) else { throw cgErrnoError(userPath, errno) }
        var result = Result()
        var firstError: CgroupError?
        for name in names where isLeafName(name) {
            let leaf = resolved + "/" + name
            if CgroupTarget.isOwnLeaf(leaf) { continue }
            if rmdir(leaf) == 0 {
                result.removed.append(leaf)
                continue
            }
            switch errno {
            case EBUSY: result.inUse.append(leaf)
            case ENOENT, ENOTDIR: continue  // gone meanwhile, or not a cgroup
            case let e: firstError = firstError ?? cgErrnoError(leaf, e, what: "rmdir")
            }
        }
        if let e = firstError, result.removed.isEmpty { throw e }
        return result
    }

    /// `chargefs-<pid>` or `chargefs-<pid>.<n>`: the names createLeaf gives, nothing else.
    static func isLeafName(_ name: String) -> Bool {
        guard name.hasPrefix(CgroupTarget.leafPrefix) else { return false }
        let parts = name.dropFirst(CgroupTarget.leafPrefix.count).split(separator: ".", omittingEmptySubsequences: false)
        return (1...2).contains(parts.count) && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy { $0.isASCII && $0.isNumber } }
    }
}
