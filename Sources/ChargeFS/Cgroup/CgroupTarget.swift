import CChargeHelper
import CFuse  // statfs (sys/vfs.h)
import Glibc
import SystemPackage

public enum CgroupVersion: Sendable, Equatable {
    case v1, v2
}

/// Which v2 limit ends the room (`memcg_limit=`). v1 has only memory.limit_in_bytes.
public enum CgroupLimitPolicy: String, Sendable, Equatable, CaseIterable {
    /// The lower of memory.high and memory.max (the default): stored pages cannot be reclaimed,
    /// so above memory.high the kernel would throttle every allocation in the cgroup for as long
    /// as they stay; ENOSPC at memory.high instead.
    case high
    /// memory.max only, as the tmpfs memcg= patch: the room up to memory.max, with the cgroup's
    /// processes (the charge helper included) throttled by the kernel while above memory.high.
    case max
}

/// One cgroup level's open counter files (pread at offset 0 gives fresh values each time).
struct CgroupLevelFiles: Sendable {
    let path: String
    let usage: FileDescriptor
    let limits: [FileDescriptor]
    let stat: FileDescriptor?
}

/// A validated memcg= target: a memory cgroup (v1 or v2) that the caller may move processes into,
/// with its counters and those of its ancestors held open.
public final class CgroupTarget: Sendable {
    /// The path as the user gave it (for messages).
    public let path: String
    /// The path after realpath; everything is done relative to this.
    public let resolvedPath: String
    public let version: CgroupVersion
    public let limitPolicy: CgroupLimitPolicy
    /// Target first, then each ancestor up to the mount root; only levels that have a limit file.
    let levels: [CgroupLevelFiles]
    let oomEvents: FileDescriptor?
    let ownedFDs: [FileDescriptor]

    /// Resolves and validates `path`.
    /// - Parameter accessAs: check write access to cgroup.procs for these ids (by a forked child
    ///   that drops to them) instead of this process's real uid/gid (access(2)); `groups`: the
    ///   supplementary groups it drops to with them (none by default).
    public static func resolve(_ path: String, limitPolicy: CgroupLimitPolicy = .high,
                               accessAs: (uid: uid_t, gid: gid_t)? = nil, groups: [gid_t] = []) throws(CgroupError) -> CgroupTarget {
        let resolved = try cgRealPath(path)
        var st = stat()
        guard stat(resolved, &st) == 0 else { throw cgErrnoError(path, errno) }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            throw CgroupError(.notDirectory, "memcg=\(path): not a directory (resolves to \(resolved))")
        }
        var sfs = statfs()
        guard statfs(resolved, &sfs) == 0 else { throw cgErrnoError(path, errno) }
        let version: CgroupVersion
        switch Int(sfs.f_type) {
        case 0x6367_7270: version = .v2  // CGROUP2_SUPER_MAGIC
        case 0x0027_e0eb: version = .v1  // CGROUP_SUPER_MAGIC
        default:
            throw CgroupError(.notCgroup, "memcg=\(path): not a cgroup (resolves to \(resolved), which is not on a cgroup filesystem)")
        }
        switch version {
        case .v1:
            guard access(resolved + "/memory.limit_in_bytes", F_OK) == 0 else {
                throw CgroupError(.noMemoryController, "memcg=\(path): cgroup v1 hierarchy without the memory controller (no memory.limit_in_bytes in \(resolved))")
            }
        case .v2:
            if !cgIsMountRoot(resolved, dev: st.st_dev) {
                let controllers = (try? cgReadFile(resolved + "/cgroup.controllers")) ?? ""
                guard controllers.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory") else {
                    throw CgroupError(.noMemoryController, "memcg=\(path): memory controller not enabled for \(resolved) (add +memory to its parent's cgroup.subtree_control)")
                }
            }
        }
        try checkMayMoveProcesses(path: path, resolved: resolved, accessAs: accessAs, groups: groups)

        // Open the counters of every level up to the mount root.
        var owned: [FileDescriptor] = []
        var levels: [CgroupLevelFiles] = []
        func open(_ p: String) -> FileDescriptor? {
            let fd = Glibc.open(p, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            owned.append(FileDescriptor(rawValue: fd))
            return FileDescriptor(rawValue: fd)
        }
        let limitNames = version == .v1 ? ["memory.limit_in_bytes"]
            : limitPolicy == .high ? ["memory.max", "memory.high"] : ["memory.max"]
        let (usageName, oomName) = version == .v1
            ? ("memory.usage_in_bytes", "memory.oom_control")
            : ("memory.current", "memory.events")
        let oomEvents = open(resolved + "/" + oomName)
        var level = resolved
        while true {
            let limits = limitNames.compactMap { open(level + "/" + $0) }
            if !limits.isEmpty, let usage = open(level + "/" + usageName) {
                levels.append(CgroupLevelFiles(path: level, usage: usage, limits: limits, stat: open(level + "/memory.stat")))
            }
            guard level != "/", !cgIsMountRoot(level, dev: st.st_dev) else { break }
            level = cgParentPath(level)
        }
        return CgroupTarget(path: path, resolvedPath: resolved, version: version, limitPolicy: limitPolicy,
                            levels: levels, oomEvents: oomEvents, ownedFDs: owned)
    }

    private init(path: String, resolvedPath: String, version: CgroupVersion, limitPolicy: CgroupLimitPolicy,
                 levels: [CgroupLevelFiles], oomEvents: FileDescriptor?, ownedFDs: [FileDescriptor]) {
        self.path = path
        self.resolvedPath = resolvedPath
        self.version = version
        self.limitPolicy = limitPolicy
        self.levels = levels
        self.oomEvents = oomEvents
        self.ownedFDs = ownedFDs
    }

    deinit {
        for fd in ownedFDs { try? fd.close() }
    }

    /// The permission rule of the tmpfs memcg= patch: the mounter must be allowed to move
    /// processes into the target, i.e. write its cgroup.procs.
    static func checkMayMoveProcesses(path: String, resolved: String, accessAs: (uid: uid_t, gid: gid_t)?,
                                      groups: [gid_t] = []) throws(CgroupError) {
        let procs = resolved + "/cgroup.procs"
        let rc: Int32
        if let ids = accessAs {
            rc = groups.withUnsafeBufferPointer { chargehelper_access_as(procs, W_OK, ids.uid, ids.gid, $0.count, $0.baseAddress) }
        } else {
            rc = access(procs, W_OK) == 0 ? 0 : -errno
        }
        switch -rc {
        case 0: return
        case EACCES, EPERM, EROFS:
            throw CgroupError(.permissionDenied, "memcg=\(path): permission denied: you may not move processes into this cgroup")
        default:
            throw cgErrnoError(path, -rc)
        }
    }
}
