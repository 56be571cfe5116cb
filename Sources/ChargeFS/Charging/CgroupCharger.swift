import Glibc
import Synchronization
import SystemPackage

/// Charges arena pages to a memcg= target: a helper process (chargefs-charge-helper) in the leaf
/// `<target>/chargefs-<pid>` instantiates each range, so the kernel bills the target; ENOSPC
/// instead of any OOM kill.
///
/// Deciding before the kernel: at the limit the kernel never fails a shmem charge, it OOM-kills.
/// So `charge` compares the range with the effective headroom first:
///   headroom = min over the target and its ancestors of (limit - usage + reclaimable) - margin
/// where the limit is memory.max (and memory.high, see CgroupLimitPolicy) on v2,
/// memory.limit_in_bytes on v1; reclaimable = clean file pages no process maps (memory.stat).
/// The margin is a constant 256 KiB, whatever the CPU count: usage already includes every CPU's
/// pre-charged stock (it over-reads), and a charge that misses retries at its exact size after
/// draining those stocks, before any reclaim or OOM kill; what the margin covers is the kernel's
/// own memory charged with the pages (xarray nodes, about 0.2% of them) and counter reads that
/// are a moment old. Measured: a fresh-read fallocate fits right up to the limit on v1 (6.18)
/// and v2 (6.1), see README "Slack".
///
/// Re-read policy: usage and limits (cheap: a pread of a number per level) are re-read whenever the
/// bytes charged since the last read plus this range exceed half the headroom seen then, or that
/// reading is older than 100 ms; so with plenty of room most charges read nothing, and near the
/// limit every charge reads fresh numbers. memory.stat (costlier for the kernel) is read only when
/// the range does not fit without the reclaimable cache.
///
/// The race left: a workload in the target grows between our check and the fallocate. Then the
/// kernel OOM-kills in the target while the helper charges, and the helper (oom_score_adj 1000
/// while it charges, its daemon's value when idle) is the one it kills; the charge fails with
/// ENOSPC if a fresh reading shows no room, else a new helper retries it. A helper killed by
/// anything else (another OOM, a stray SIGKILL) is replaced the same way; a new helper is started
/// only when the room for its own memory exists, so a full target sees no fork at all, and
/// failing starts back off (0.1 s doubling to 5 s).
///
/// Concurrency: `charge` may be called from any number of threads; the round trips are serialised
/// by the charger's own lock (`channel`), which no other call takes while a charge waits:
/// `availableBytes` and the status read the cgroup's counters directly, so statfs answers while a
/// charge waits for a frozen target. A charge into a frozen target waits for the thaw (the helper
/// is frozen too); unmount (`shutdown`) ends such a wait within a second.
public final class CgroupCharger: PageCharger {
    public let target: CgroupTarget
    public let leaf: CgroupLeaf
    /// Safety margin subtracted from the headroom (see the type's documentation).
    public let marginBytes: Int64 = 256 * 1024
    /// The helper's own memory, measured when the first one started (at mount); counted as room
    /// needed when a helper must be started again.
    public let helperFootprint: Int64
    /// Our own copy of the arena fd: each helper inherits it.
    private let arenaFD: Int32
    private let helperPath: String
    /// The helper program, open (see ChargeHelper.openProgram); -1 if it could not be opened.
    private let programFD: Int32
    private let channel: Mutex<Channel>
    private let closed = Atomic<Bool>(false)
    private let starts = Atomic<Int>(0)

    /// How long a helper that is not frozen may stay silent before it is presumed stuck and killed.
    static let helperTimeoutMs = 60_000
    public static let defaultCacheLifetime: Duration = .milliseconds(100)
    /// How long a headroom read stays good. This charger's own setting, fixed at creation: tests
    /// that must race the kernel stretch it (a slow guest takes > 100 ms between steps).
    let cacheLifetime: Duration

    private struct Channel {
        var helper: ChargeHelper?
        var oomBaseline: Int64 = 0
        /// Headroom (margin already subtracted) seen at the last read; nil = unlimited.
        var roomSeen: Int64? = 0
        var chargedSinceRead: Int64 = 0
        var readAt: ContinuousClock.Instant?
        var goneLogged = false
        var failedStarts = 0
        var nextStartAt: ContinuousClock.Instant?
    }

    /// - Parameter helperPath: the helper program; by default next to the running executable.
    public init(target: CgroupTarget, arena: FileDescriptor, helperPath: String? = nil,
                cacheLifetime: Duration = CgroupCharger.defaultCacheLifetime) throws(CgroupError) {
        self.target = target
        self.cacheLifetime = cacheLifetime
        let path = helperPath ?? ChargeHelper.defaultPath()
        guard access(path, X_OK) == 0 else {
            throw CgroupError(.io, "memcg=\(target.path): the charge helper \(path) is missing or not executable (install \(ChargeHelper.programName) next to chargefsd)")
        }
        self.helperPath = path
        programFD = ChargeHelper.openProgram(path)
        let fd = fcntl(arena.rawValue, F_DUPFD_CLOEXEC, 3)
        guard fd >= 0 else {
            let e = errno
            if programFD >= 0 { close(programFD) }
            throw cgErrnoError(target.path, e, what: "dup of the arena")
        }
        arenaFD = fd
        let leaf: CgroupLeaf
        do {
            leaf = try target.createLeaf()
        } catch {
            close(fd)
            if programFD >= 0 { close(programFD) }
            throw error
        }
        self.leaf = leaf
        var ch = Channel()
        let before = (try? target.targetUsage().usage) ?? 0
        do {
            ch.oomBaseline = try Self.oomCount(target, leaf)
            ch.helper = try ChargeHelper.start(executable: path, programFD: programFD, arena: fd, leaf: leaf, userPath: target.path,
                                               wait: .init(timeoutMs: Self.helperTimeoutMs, isFrozen: { leaf.isFrozen }, cancelled: { false }))
        } catch {
            try? target.removeLeaf(leaf)
            close(fd)
            if programFD >= 0 { close(programFD) }
            throw error
        }
        starts.store(1, ordering: .relaxed)
        // The leaf's own counter where it has one; else what the target grew by (at mount, with
        // nothing else of ours charged yet). Never below what it was measured at here (~0.3 MiB).
        let measured = leaf.usage ?? ((try? target.targetUsage().usage).map { $0 - before } ?? 0)
        helperFootprint = min(max(measured, 256 * 1024), 4 << 20)
        channel = Mutex(ch)
        if target.version == .v2, (try? cgReadFile(target.resolvedPath + "/memory.oom.group"))?.cgTrimmed == "1" {
            Log.line("warning: \(target.path) has memory.oom.group=1: an OOM kill of the charge helper would take every process in it")
        }
    }

    deinit { shutdown() }

    public var summary: String {
        "memcg=\(target.path) (cgroup \(target.version == .v1 ? "v1" : "v2")\(target.version == .v2 ? ", limit \(target.limitPolicy.rawValue)" : ""))"
    }

    public func charge(offset: Int64, length: Int64) throws(Errno) {
        guard length > 0 else { return }
        try channel.withLock { (ch: inout Channel) throws(Errno) in
            guard !closed.load(ordering: .acquiring) else { throw Errno.ioError }
            try checkRoom(&ch, length)
            _ = try instantiate(&ch, .chargeArena(offset: offset, length: length), length: length)
        }
    }

    public func charge(file: FileDescriptor, offset: Int64, length: Int64) throws(Errno) {
        guard length > 0 else { return }
        try channel.withLock { (ch: inout Channel) throws(Errno) in
            guard !closed.load(ordering: .acquiring) else { throw Errno.ioError }
            try checkRoom(&ch, length)
            _ = try instantiate(&ch, .chargeFile(file.rawValue, offset: offset, length: length), length: length)
        }
    }

    public func makeFile(in directory: FileDescriptor) throws(Errno) -> FileDescriptor {
        try channel.withLock { (ch: inout Channel) throws(Errno) in
            guard !closed.load(ordering: .acquiring) else { throw Errno.ioError }
            // An inode, a dentry and a file: about 2 KiB of the target's memory.
            try checkRoom(&ch, 4096)
            return FileDescriptor(rawValue: try instantiate(&ch, .createFile(in: directory.rawValue), length: 4096))
        }
    }

    public func availableBytes() -> Int64? {
        do throws(CgroupError) {
            guard let room = try target.headroom(reclaimable: true, ownMapped: leaf.mappedBytes) else { return nil }
            return max(0, room - marginBytes)
        } catch {
            return 0
        }
    }

    public func limitBytes() -> Int64? {
        (try? target.targetUsage())?.limit
    }

    public func shutdown() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // A charge waiting for a frozen helper sees `closed` within a second and lets go.
        let helper = channel.withLock { ch in
            defer { ch.helper = nil }
            return ch.helper
        }
        helper?.stop()
        do throws(CgroupError) {
            try target.removeLeaf(leaf)
        } catch {
            Log.line("\(error)")
        }
        // A predecessor's leaf (an upgrade's or a crash's) is removed when this server makes its
        // own, unless that helper was still in it then (finishing a charge as its server exited):
        // nothing else removes it, so once more here. Only empty leaves go (rmdir decides).
        _ = try? StaleLeafCleanup.run(resolved: target.resolvedPath, userPath: target.path)
        close(arenaFD)
        if programFD >= 0 { close(programFD) }
    }

    // MARK: status

    /// What the leaf is charged with now (the arena pages the helpers instantiated plus the
    /// helper's own memory); nil when the leaf has no memory counters (v2 without memory in the
    /// target's subtree_control: then the target itself is charged).
    public var chargedBytesInLeaf: Int64? { leaf.usage }

    /// e.g. "memcg=/sys/fs/cgroup/x (cgroup v2, limit high): leaf 12.0 MiB, target 40.0 MiB of 64.0 MiB, room 23.2 MiB"
    public var statusLine: String {
        var s = summary
        func mib(_ b: Int64) -> String {
            let tenths = b * 10 / (1 << 20)
            return "\(tenths / 10).\(abs(tenths % 10)) MiB"
        }
        if let l = chargedBytesInLeaf { s += ": leaf \(mib(l))" } else { s += ":" }
        if let t = try? target.targetUsage() {
            s += ", target \(mib(t.usage)) of " + (t.limit.map(mib) ?? "unlimited")
        }
        if let room = availableBytes() { s += ", room \(mib(room))" }
        return s
    }

    /// OOM kills in the target, the leaf included (v1 counts a kill only in the victim's cgroup).
    public func oomKillCount() throws(CgroupError) -> Int64 {
        try Self.oomCount(target, leaf)
    }

    /// The current helper's pid (tests, diagnostics).
    var helperPID: pid_t? { channel.withLock { $0.helper?.pid } }
    /// Helpers started so far, the first included (tests: no respawn loop).
    var helperStarts: Int { starts.load(ordering: .relaxed) }

    // MARK: internals

    private var wait: ChargeHelper.Wait {
        let leaf = leaf
        return .init(timeoutMs: Self.helperTimeoutMs, isFrozen: { leaf.isFrozen },
                     cancelled: { [unowned self] in closed.load(ordering: .relaxed) })
    }

    /// Headroom now, less the margin and, with no helper running, the memory a new one needs.
    private func room(_ ch: Channel, reclaimable: Bool) throws(CgroupError) -> Int64? {
        try target.headroom(reclaimable: reclaimable, ownMapped: reclaimable ? leaf.mappedBytes : 0)
            .map { $0 - marginBytes - (ch.helper == nil ? helperFootprint : 0) }
    }

    private func checkRoom(_ ch: inout Channel, _ length: Int64) throws(Errno) {
        let now = ContinuousClock.now
        if let at = ch.readAt, now - at < cacheLifetime {
            guard let seen = ch.roomSeen else { return }  // unlimited a moment ago
            if ch.chargedSinceRead + length <= seen / 2 {
                ch.chargedSinceRead += length
                return
            }
        }
        let fresh: Int64?
        do throws(CgroupError) {
            fresh = try room(ch, reclaimable: false)
        } catch {
            throw fail(&ch, error)
        }
        if let r = fresh, length > r {
            // Room that exists only after reclaim is never cached: re-read next time.
            ch.readAt = nil
            let withCache: Int64?
            do throws(CgroupError) {
                withCache = try room(ch, reclaimable: true)
            } catch {
                throw fail(&ch, error)
            }
            if let r2 = withCache, length > r2 { throw Errno.noSpace }
            // v2: have the kernel reclaim what is missing, and count only what it really freed
            // (the estimate above cannot tell every unreclaimable page).
            if target.reclaim(toFit: length + marginBytes + (ch.helper == nil ? helperFootprint : 0)) {
                let after: Int64?
                do throws(CgroupError) {
                    after = try room(ch, reclaimable: false)
                } catch {
                    throw fail(&ch, error)
                }
                if let a = after, length > a { throw Errno.noSpace }
            }
            return
        }
        ch.roomSeen = fresh
        ch.chargedSinceRead = length
        ch.readAt = now
    }

    /// Has the helper do `request` (for `length` bytes of charge); returns the file it sent back.
    private func instantiate(_ ch: inout Channel, _ request: ChargeHelper.Request, length: Int64) throws(Errno) -> Int32 {
        for attempt in 0..<2 {
            let helper = try runningHelper(&ch)
            switch helper.request(request, wait) {
            case .done(0, let file):
                return file
            case .done(let e, let file):
                if file >= 0 { close(file) }
                ch.readAt = nil
                throw (e == ENOMEM || e == ENOSPC) ? Errno.noSpace : Errno(rawValue: e)
            case .died(let death):
                ch.helper = nil
                ch.readAt = nil
                if closed.load(ordering: .relaxed) { throw Errno.ioError }
                let ooms = (try? Self.oomCount(target, leaf)) ?? ch.oomBaseline
                let cause = ooms > ch.oomBaseline ? "OOM-killed" : "\(death)"
                ch.oomBaseline = ooms
                // Killed at the limit (our reading raced a workload) or by something unrelated:
                // only a fresh reading tells whether there is room for this range and a new helper.
                let fits: Bool
                do throws(CgroupError) {
                    fits = try room(ch, reclaimable: true).map { length <= $0 } ?? true
                } catch {
                    throw fail(&ch, error)
                }
                let retry = fits && attempt == 0
                Log.line("\(summary): charge helper pid \(helper.pid) \(cause) while charging \(length) bytes; "
                         + (retry ? "retrying with a new one" : fits ? "returning EIO" : "no room: returning ENOSPC"))
                if !fits { throw Errno.noSpace }
                if !retry { throw Errno.ioError }
            }
        }
        throw Errno.ioError
    }

    /// The running helper, or a new one (the caller has checked the room for it). Starts that
    /// fail back off, so a target that cannot take a helper is not hammered with forks.
    private func runningHelper(_ ch: inout Channel) throws(Errno) -> ChargeHelper {
        if let h = ch.helper { return h }
        let now = ContinuousClock.now
        if let next = ch.nextStartAt, now < next { throw Errno.ioError }
        do throws(CgroupError) {
            let h = try ChargeHelper.start(executable: helperPath, programFD: programFD, arena: arenaFD, leaf: leaf,
                                           userPath: target.path, wait: wait)
            let n = starts.add(1, ordering: .relaxed).newValue
            Log.line("\(summary): charge helper pid \(h.pid) started (helper \(n) of this mount)")
            ch.helper = h
            ch.failedStarts = 0
            ch.nextStartAt = nil
            return h
        } catch {
            if error.kind == .gone { throw fail(&ch, error) }
            ch.failedStarts += 1
            let backoff = Duration.milliseconds(100) * (1 << min(ch.failedStarts - 1, 6))
            ch.nextStartAt = now + min(backoff, .seconds(5))
            Log.line("\(summary): \(error); next attempt in \(min(backoff, .seconds(5)))")
            throw Errno.ioError
        }
    }

    /// Maps a cgroup failure to the errno the page store sees, logging the reason once.
    private func fail(_ ch: inout Channel, _ error: CgroupError) -> Errno {
        if error.kind == .gone {
            if !ch.goneLogged {
                ch.goneLogged = true
                Log.line("\(summary): the target cgroup disappeared while mounted (\(error)); writes fail with EIO")
            }
        } else {
            Log.line("\(summary): \(error)")
        }
        return Errno.ioError
    }

    /// OOM kills in the target plus in the leaf (v1 counts them where the victim was).
    private static func oomCount(_ target: CgroupTarget, _ leaf: CgroupLeaf) throws(CgroupError) -> Int64 {
        let leafFile = leaf.path + (target.version == .v1 ? "/memory.oom_control" : "/memory.events")
        let inLeaf = (try? cgReadFile(leafFile)).flatMap { cgStatValue($0, "oom_kill") } ?? 0
        return try target.oomKillCount() + (target.version == .v1 ? inLeaf : 0)
    }
}
