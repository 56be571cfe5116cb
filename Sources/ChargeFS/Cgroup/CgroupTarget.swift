import CFuse
import Glibc
import Synchronization
import SystemPackage

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

public enum CgroupVersion: Sendable, Equatable {
    case v1, v2
}

/// Usage of one level of the hierarchy (the target or an ancestor), in bytes.
public struct CgroupLevelUsage: Sendable {
    public let path: String
    public let usage: Int64
    /// nil = unlimited. On v2 the lower of memory.max and memory.high (past memory.high the kernel
    /// does not fail a charge but throttles the charging task for seconds, which for us is worse).
    public let limit: Int64?
    /// File cache the kernel can drop to make room (clean active+inactive file pages); nil when
    /// not read.
    public let reclaimable: Int64?
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
    /// The hierarchy root (mount root) itself: no limit of its own.
    public let isRoot: Bool
    /// Target first, then each ancestor up to the mount root; only levels that have a limit file.
    let levels: [CgroupLevelFiles]
    let oomEvents: FileDescriptor?
    let ownedFDs: [FileDescriptor]

    /// Resolves and validates `path`.
    /// - Parameter accessAs: check write access to cgroup.procs for these ids (by a forked child
    ///   that drops to them) instead of this process's real uid/gid (access(2)).
    public static func resolve(_ path: String, accessAs: (uid: uid_t, gid: gid_t)? = nil) throws(CgroupError) -> CgroupTarget {
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
        case Int(CFUSE_CGROUP2_SUPER_MAGIC): version = .v2
        case Int(CFUSE_CGROUP_SUPER_MAGIC): version = .v1
        default:
            throw CgroupError(.notCgroup, "memcg=\(path): not a cgroup (resolves to \(resolved), which is not on a cgroup filesystem)")
        }
        let isRoot = cgIsMountRoot(resolved, dev: st.st_dev)
        switch version {
        case .v1:
            guard access(resolved + "/memory.limit_in_bytes", F_OK) == 0 else {
                throw CgroupError(.noMemoryController, "memcg=\(path): cgroup v1 hierarchy without the memory controller (no memory.limit_in_bytes in \(resolved))")
            }
        case .v2:
            if !isRoot {
                let controllers = (try? cgReadFile(resolved + "/cgroup.controllers")) ?? ""
                guard controllers.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory") else {
                    throw CgroupError(.noMemoryController, "memcg=\(path): memory controller not enabled for \(resolved) (add +memory to its parent's cgroup.subtree_control)")
                }
            }
        }
        try checkMayMoveProcesses(path: path, resolved: resolved, accessAs: accessAs)

        // Open the counters of every level up to the mount root.
        var owned: [FileDescriptor] = []
        var levels: [CgroupLevelFiles] = []
        var oomEvents: FileDescriptor?
        func open(_ p: String) -> FileDescriptor? {
            let fd = Glibc.open(p, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            owned.append(FileDescriptor(rawValue: fd))
            return FileDescriptor(rawValue: fd)
        }
        let (usageName, limitNames, statName, oomName) = version == .v1
            ? ("memory.usage_in_bytes", ["memory.limit_in_bytes"], "memory.stat", "memory.oom_control")
            : ("memory.current", ["memory.max", "memory.high"], "memory.stat", "memory.events")
        oomEvents = open(resolved + "/" + oomName)
        var level = resolved
        while true {
            let limits = limitNames.compactMap { open(level + "/" + $0) }
            if !limits.isEmpty, let usage = open(level + "/" + usageName) {
                levels.append(CgroupLevelFiles(path: level, usage: usage, limits: limits, stat: open(level + "/" + statName)))
            }
            guard level != "/", !cgIsMountRoot(level, dev: st.st_dev) else { break }
            level = cgParentPath(level)
        }
        return CgroupTarget(path: path, resolvedPath: resolved, version: version, isRoot: isRoot,
                            levels: levels, oomEvents: oomEvents, ownedFDs: owned)
    }

    private init(path: String, resolvedPath: String, version: CgroupVersion, isRoot: Bool,
                 levels: [CgroupLevelFiles], oomEvents: FileDescriptor?, ownedFDs: [FileDescriptor]) {
        self.path = path
        self.resolvedPath = resolvedPath
        self.version = version
        self.isRoot = isRoot
        self.levels = levels
        self.oomEvents = oomEvents
        self.ownedFDs = ownedFDs
    }

    deinit {
        for fd in ownedFDs { try? fd.close() }
    }

    /// The permission rule of the tmpfs memcg= patch: the mounter must be allowed to move
    /// processes into the target, i.e. write its cgroup.procs.
    static func checkMayMoveProcesses(path: String, resolved: String, accessAs: (uid: uid_t, gid: gid_t)?) throws(CgroupError) {
        let procs = resolved + "/cgroup.procs"
        let rc: Int32
        if let ids = accessAs {
            rc = cfuse_access_as(procs, W_OK, ids.uid, ids.gid)
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

    // MARK: counters

    /// Usage and limit of each level (target first). memory.stat is read only if `reclaimable`.
    public func levelUsages(reclaimable: Bool) throws(CgroupError) -> [CgroupLevelUsage] {
        var out: [CgroupLevelUsage] = []
        out.reserveCapacity(levels.count)
        for level in levels {
            let usage = try readNumber(level.usage, level.path) ?? 0
            var limit: Int64?
            for fd in level.limits {
                if let l = try readNumber(fd, level.path) { limit = min(limit ?? l, l) }
            }
            var rec: Int64?
            if reclaimable, let stat = level.stat {
                rec = try reclaimableBytes(stat, level.path)
            }
            out.append(CgroupLevelUsage(path: level.path, usage: usage, limit: limit, reclaimable: rec))
        }
        return out
    }

    /// Bytes that can still be charged before some level reaches its limit: min over the limited
    /// levels of (limit - usage [+ reclaimable]); nil when no level is limited. Not yet reduced by
    /// any safety margin (that is the charger's business). May be negative.
    public func headroom(reclaimable: Bool) throws(CgroupError) -> Int64? {
        var best: Int64?
        for l in try levelUsages(reclaimable: reclaimable) {
            guard let limit = l.limit else { continue }
            let room = limit - l.usage + (l.reclaimable ?? 0)
            best = min(best ?? room, room)
        }
        return best
    }

    /// The target's own usage and limit (nil = unlimited).
    public func targetUsage() throws(CgroupError) -> (usage: Int64, limit: Int64?) {
        guard let first = try levelUsages(reclaimable: false).first, first.path == resolvedPath else {
            return (0, nil)  // the root: no counters of its own
        }
        return (first.usage, first.limit)
    }

    /// OOM kills counted for the target (v2 memory.events oom_kill, v1 memory.oom_control oom_kill).
    public func oomKillCount() throws(CgroupError) -> Int64 {
        guard let fd = oomEvents else { return 0 }
        return try Self.statValue(readFD(fd, resolvedPath), "oom_kill") ?? 0
    }

    private func reclaimableBytes(_ fd: FileDescriptor, _ path: String) throws(CgroupError) -> Int64 {
        let text = try readFD(fd, path)
        // Dirty and writeback pages cannot be dropped at once (no swap, writeback is slow), so
        // they do not count as room.
        let keys = version == .v2
            ? (["active_file", "inactive_file"], ["file_dirty", "file_writeback"])
            : (["total_active_file", "total_inactive_file"], ["total_dirty", "total_writeback"])
        var sum: Int64 = 0
        for k in keys.0 { sum += Self.statValue(text, k) ?? 0 }
        for k in keys.1 { sum -= Self.statValue(text, k) ?? 0 }
        return max(0, sum)
    }

    static func statValue(_ text: String, _ key: String) -> Int64? {
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, parts[0] == key { return Int64(parts[1]) }
        }
        return nil
    }

    /// A number file; nil = unlimited ("max" on v2, PAGE_COUNTER_MAX * PAGE_SIZE on v1).
    private func readNumber(_ fd: FileDescriptor, _ path: String) throws(CgroupError) -> Int64? {
        let text = try readFD(fd, path).cgTrimmed
        if text == "max" { return nil }
        guard let n = Int64(text) else { throw CgroupError(.io, "memcg=\(self.path): unexpected counter value '\(text)' in \(path)") }
        return n >= (Int64(1) << 62) ? nil : n
    }

    func readFD(_ fd: FileDescriptor, _ path: String) throws(CgroupError) -> String {
        var buf = [UInt8](repeating: 0, count: 8192)
        var total = 0
        while true {
            if total == buf.count { buf.append(contentsOf: repeatElement(0, count: buf.count)) }
            let n = buf.withUnsafeMutableBytes { p in
                pread(fd.rawValue, p.baseAddress.map { $0 + total }, p.count - total, off_t(total))
            }
            if n < 0 {
                if errno == EINTR { continue }
                let e = errno
                if e == ENODEV || e == ENOENT {
                    throw CgroupError(.gone, "memcg=\(self.path): the cgroup \(path) was removed")
                }
                throw CgroupError(.io, "memcg=\(self.path): reading \(path): \(String(cString: strerror(e)))")
            }
            if n == 0 { break }
            total += n
        }
        return String(decoding: buf[0..<total], as: UTF8.self)
    }
}

// MARK: - leaf cgroup and stale cleanup

/// Leaves this process created (so a leftover `chargefs-<ourpid>` from an earlier process that had
/// our pid, e.g. pid 1 in a container, is recognised as stale).
private let createdLeaves = Mutex<Set<String>>([])

/// The leaf `<target>/chargefs-<daemonpid>` that holds the helper. A leaf rather than the target
/// itself because cgroup v2 forbids processes in a cgroup whose children use the memory
/// controller (a pod), and so that our process can be found and the leaf removed.
public struct CgroupLeaf: Sendable {
    public let path: String
    public var procsPath: String { path + "/cgroup.procs" }
}

extension CgroupTarget {
    static let leafPrefix = "chargefs-"
    static let helperComm = "chargefs-helper"

    /// Creates this process's leaf, first cleaning up stale ones.
    public func createLeaf() throws(CgroupError) -> CgroupLeaf {
        _ = try? Self.cleanupStale(resolved: resolvedPath, userPath: path)
        if version == .v2 { enableMemoryForChildren() }
        let pid = getpid()
        var n = 0
        while true {
            let name = n == 0 ? "\(Self.leafPrefix)\(pid)" : "\(Self.leafPrefix)\(pid).\(n)"
            let leaf = resolvedPath + "/" + name
            let claimed = createdLeaves.withLock { set in
                if set.contains(leaf) { return false }
                set.insert(leaf)
                return true
            }
            if !claimed { n += 1; continue }
            if mkdir(leaf, 0o755) == 0 { return CgroupLeaf(path: leaf) }
            let e = errno
            if e == EEXIST {
                // Same name as ours but not made by this process: left by a dead one.
                if (try? Self.removeLeafDir(leaf, killHelpers: true)) != nil, mkdir(leaf, 0o755) == 0 {
                    return CgroupLeaf(path: leaf)
                }
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

    /// v2: best effort `+memory` in the target's subtree_control, so the leaf gets its own
    /// counters (chargedBytesInLeaf). Totals do not change either way: without it the leaf's pages
    /// are charged to the target directly. The kernel refuses (EBUSY) while the target itself
    /// holds processes; then we leave it be. Pod cgroups have it enabled already.
    func enableMemoryForChildren() {
        let control = resolvedPath + "/cgroup.subtree_control"
        let current = (try? cgReadFile(control)) ?? ""
        if current.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory") { return }
        _ = cgWriteFile(control, "+memory\n")
    }

    /// Removes the leaf (waiting up to ~2 s for its exiting helper). The charge of pages the
    /// helper instantiated stays with the target (a removed v1/v2 memcg lingers until they free).
    public func removeLeaf(_ leaf: CgroupLeaf) throws(CgroupError) {
        defer { _ = createdLeaves.withLock { $0.remove(leaf.path) } }
        try Self.removeLeafDir(leaf.path, killHelpers: false)
    }

    /// Removes every `chargefs-<pid>` child of `target` whose daemon is gone: kills the helpers
    /// still in it (only processes named chargefs-helper) and rmdirs it. Returns the removed paths.
    @discardableResult
    public static func cleanupStale(target: String) throws(CgroupError) -> [String] {
        let t = try resolve(target)
        return try cleanupStale(resolved: t.resolvedPath, userPath: target)
    }

    static func cleanupStale(resolved: String, userPath: String) throws(CgroupError) -> [String] {
        guard let dir = opendir(resolved) else { throw cgErrnoError(userPath, errno) }
        var names: [String] = []
        while let ent = readdir(dir) {
            let name = withUnsafePointer(to: ent.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name.hasPrefix(leafPrefix) { names.append(name) }
        }
        closedir(dir)
        var removed: [String] = []
        var firstError: CgroupError?
        for name in names {
            let digits = name.dropFirst(leafPrefix.count).prefix(while: { $0.isASCII && $0.isNumber })
            guard let pid = pid_t(digits), pid > 0 else { continue }
            let leaf = resolved + "/" + name
            let ours = createdLeaves.withLock { $0.contains(leaf) }
            if ours || (pid != getpid() && processExists(pid)) { continue }
            do throws(CgroupError) {
                try removeLeafDir(leaf, killHelpers: true)
                removed.append(leaf)
            } catch {
                firstError = firstError ?? error
            }
        }
        if let e = firstError, removed.isEmpty { throw e }
        return removed
    }

    static func processExists(_ pid: pid_t) -> Bool {
        kill(pid, 0) == 0 || errno == EPERM
    }

    /// rmdir with retries while processes leave; with killHelpers, SIGKILLs those in it whose
    /// comm is chargefs-helper first (through a pidfd, so a recycled pid is never hit).
    static func removeLeafDir(_ leaf: String, killHelpers: Bool) throws(CgroupError) {
        for attempt in 0..<200 {
            if rmdir(leaf) == 0 { return }
            let e = errno
            if e == ENOENT { return }
            guard e == EBUSY else { throw cgErrnoError(leaf, e, what: "rmdir") }
            if killHelpers && attempt % 20 == 0 {
                let procs = (try? cgReadFile(leaf + "/cgroup.procs")) ?? ""
                for p in procs.split(separator: "\n") {
                    guard let pid = pid_t(p) else { continue }
                    let pidfd = cfuse_pidfd_open(pid)
                    guard pidfd >= 0 else { continue }
                    defer { close(pidfd) }
                    let comm = ((try? cgReadFile("/proc/\(pid)/comm")) ?? "").cgTrimmed
                    if comm == helperComm { _ = cfuse_pidfd_send_signal(pidfd, SIGKILL) }
                }
            }
            usleep(10_000)
        }
        let procs = ((try? cgReadFile(leaf + "/cgroup.procs")) ?? "").split(separator: "\n").joined(separator: " ")
        throw CgroupError(.io, "cannot remove \(leaf): still holds process(es) \(procs)")
    }
}

/// `chargefsd --cleanup PATH`: removes stale leaves below PATH; prints what it did. Exit status.
public func chargefsdCleanupCommand(_ path: String) -> Int32 {
    do throws(CgroupError) {
        let removed = try CgroupTarget.cleanupStale(target: path)
        for r in removed { print("removed \(r)") }
        if removed.isEmpty { print("nothing to clean below \(path)") }
        return 0
    } catch {
        Log.line("\(error)")
        return 1
    }
}

// MARK: - small helpers

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

private func cgRealPath(_ path: String) throws(CgroupError) -> String {
    guard let p = realpath(path, nil) else { throw cgErrnoError(path, errno) }
    defer { free(p) }
    return String(cString: p)
}

/// True when `path` is the root of its mount (its parent is on another device): the top of a
/// cgroup hierarchy as this process sees it.
private func cgIsMountRoot(_ path: String, dev: dev_t) -> Bool {
    if path == "/" { return true }
    var st = stat()
    guard stat(cgParentPath(path), &st) == 0 else { return true }
    return st.st_dev != dev
}

private func cgParentPath(_ path: String) -> String {
    guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
    return String(path[..<slash])
}

func cgReadFile(_ path: String) throws(CgroupError) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw cgErrnoError(path, errno) }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; throw cgErrnoError(path, errno) }
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

func cgWriteFile(_ path: String, _ text: String) -> Int32 {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return errno }
    defer { close(fd) }
    var s = text
    let rc = s.withUTF8 { b in write(fd, b.baseAddress, b.count) }
    return rc < 0 ? errno : 0
}

extension StringProtocol {
    var cgTrimmed: String {
        let s = Substring(self)
        guard let first = s.firstIndex(where: { !$0.isWhitespace }),
              let last = s.lastIndex(where: { !$0.isWhitespace }) else { return "" }
        return String(s[first...last])
    }
}
