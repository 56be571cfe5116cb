import Glibc
import SystemPackage

/// Usage of one level of the hierarchy (the target or an ancestor), in bytes.
public struct CgroupLevelUsage: Sendable {
    public let path: String
    public let usage: Int64
    /// nil = unlimited. On v2 memory.max, or the lower of memory.max and memory.high (the
    /// target's `limitPolicy`).
    public let limit: Int64?
    /// File cache the kernel will drop to make room: clean file pages that no process maps; nil
    /// when not read.
    public let reclaimable: Int64?
}

extension CgroupTarget {
    /// Usage and limit of each level (target first). memory.stat is read only if `reclaimable`;
    /// `ownMapped` is what of the mapped file pages is the charger's own (see reclaimableBytes).
    public func levelUsages(reclaimable: Bool, ownMapped: Int64 = 0) throws(CgroupError) -> [CgroupLevelUsage] {
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
                rec = try reclaimableBytes(stat, level.path, ownMapped: ownMapped)
            }
            out.append(CgroupLevelUsage(path: level.path, usage: usage, limit: limit, reclaimable: rec))
        }
        return out
    }

    /// Bytes that can still be charged before some level reaches its limit: min over the limited
    /// levels of (limit - usage [+ reclaimable]); nil when no level is limited. Not yet reduced by
    /// any safety margin (that is the charger's business). May be negative.
    public func headroom(reclaimable: Bool, ownMapped: Int64 = 0) throws(CgroupError) -> Int64? {
        var best: Int64?
        for l in try levelUsages(reclaimable: reclaimable, ownMapped: ownMapped) {
            guard let limit = l.limit else { continue }
            let room = limit - l.usage + (l.reclaimable ?? 0)
            best = min(best ?? room, room)
        }
        return best
    }

    /// v2: asks the kernel to reclaim, now, from every limited level that has less than `bytes`
    /// of room, what it lacks (memory.reclaim, Linux 5.19+). Best effort: the caller reads the
    /// counters again, so only what was really freed counts. False where there is no
    /// memory.reclaim (v1, older kernels).
    @discardableResult
    public func reclaim(toFit bytes: Int64) -> Bool {
        guard version == .v2 else { return false }
        guard let usages = try? levelUsages(reclaimable: false) else { return false }
        var any = false
        for l in usages {
            guard let limit = l.limit, limit - l.usage < bytes else { continue }
            let lacking = bytes - (limit - l.usage)
            let e = cgWriteFile(l.path + "/memory.reclaim", "\(lacking + 64 * 1024)\n")
            if e == ENOENT || e == EINVAL { return any }
            any = true  // EAGAIN: it freed less; the counters say how much
        }
        return any
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
        return try cgStatValue(readFD(fd, resolvedPath), "oom_kill") ?? 0
    }

    /// Clean file pages that no process maps. Mapped ones (the executables and libraries of the
    /// cgroup's running processes) show as active/inactive file, but the kernel's reclaim does
    /// not get them back in time: counting them let a pod's fill end in OOM kills. The mapped
    /// count (file_mapped, v1 mapped_file) also holds shmem pages mapped by someone: the arena's
    /// pages the daemon maps, which are not on the file lists; `ownMapped` (the leaf's mapped
    /// count) takes those out again. Dirty and writeback pages cannot be dropped at once either.
    private func reclaimableBytes(_ fd: FileDescriptor, _ path: String, ownMapped: Int64) throws(CgroupError) -> Int64 {
        let text = try readFD(fd, path)
        let keys = version == .v2
            ? (["active_file", "inactive_file"], ["file_dirty", "file_writeback"], "file_mapped")
            : (["total_active_file", "total_inactive_file"], ["total_dirty", "total_writeback"], "total_mapped_file")
        var sum: Int64 = 0
        for k in keys.0 { sum += cgStatValue(text, k) ?? 0 }
        for k in keys.1 { sum -= cgStatValue(text, k) ?? 0 }
        sum -= max(0, (cgStatValue(text, keys.2) ?? 0) - ownMapped)
        return max(0, sum)
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
            let n: Int
            do throws(Errno) {
                n = try retryingInterrupts {
                    buf.withUnsafeMutableBytes { p in pread(fd.rawValue, p.baseAddress.map { $0 + total }, p.count - total, off_t(total)) }
                }
            } catch {
                let e = error.rawValue
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
