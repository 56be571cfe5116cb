// Cgroup/: resolving a memcg= target, its counters, the leaf cgroup the charge helper lives in,
// and stale-leaf cleanup. Calls only Support/ (logging) and the kernel.
import Glibc

/// Why a memcg= target cannot be used (or stopped being usable). `description` is one line that
/// names the path and the problem, fit for the mount's error output.
public struct CgroupError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: Sendable, Equatable {
        case notFound, notDirectory, notCgroup, noMemoryController, permissionDenied
        /// The cgroup was removed while in use (its files answer ENODEV/ENOENT).
        case gone
        case io
    }
    public let kind: Kind
    public let message: String
    public var description: String { message }

    init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
}

/// The error for errno `e` met on `path` (while doing `what`).
func cgErrnoError(_ path: String, _ e: Int32, what: String? = nil) -> CgroupError {
    let msg = String(cString: strerror(e))
    let prefix = "memcg=\(path): " + (what.map { $0 + ": " } ?? "")
    switch e {
    case ENOENT: return CgroupError(.notFound, prefix + "no such cgroup (\(msg))")
    case ENOTDIR: return CgroupError(.notDirectory, prefix + "not a directory (\(msg))")
    case EACCES, EPERM: return CgroupError(.permissionDenied, prefix + "permission denied (\(msg))")
    case ENODEV: return CgroupError(.gone, prefix + "the cgroup was removed (\(msg))")
    default: return CgroupError(.io, prefix + msg)
    }
}
