import CFuse
import Glibc
import Synchronization
import SystemPackage

/// Charges arena pages to a memcg= target: a helper process in the leaf `<target>/chargefs-<pid>`
/// instantiates each range, so the kernel bills the target; ENOSPC instead of any OOM kill.
///
/// Deciding before the kernel: at the limit the kernel never fails a shmem charge, it OOM-kills the
/// instantiating task. So `charge` compares the range with the effective headroom first:
///   headroom = min over the target and its ancestors of (limit - usage + reclaimable file cache)
///              - margin
/// where the limit is memory.max (and memory.high) on v2, memory.limit_in_bytes on v1, and
/// reclaimable = clean active+inactive file pages (memory.stat). The margin (`marginBytes`) is
/// 256 KiB plus one memcg charge batch (64 pages) per possible CPU: usage is batched per CPU, and
/// the kernel's own metadata for the pages (xarray nodes, the helper's page tables) is charged too.
///
/// Re-read policy: usage and limits (cheap: a pread of a number per level) are re-read whenever the
/// bytes charged since the last read plus this range exceed half the headroom seen then, or that
/// reading is older than 100 ms; so with plenty of room most charges read nothing, and near the
/// limit every charge reads fresh numbers. memory.stat (costlier for the kernel) is read only when
/// the range does not fit without the reclaimable cache. Workloads in the target can still grow
/// between our check and the fallocate; then the kernel OOM-kills in the target, and the helper
/// (oom_score_adj 1000) is its first choice: we return ENOSPC and respawn it.
public final class CgroupCharger: PageCharger {
    public let target: CgroupTarget
    public let leaf: CgroupLeaf
    /// Safety margin subtracted from the headroom (see the type's documentation).
    public let marginBytes: Int64
    /// Our own copy of the arena fd: each (re)spawned helper inherits it.
    private let arenaFD: Int32
    private let state: Mutex<State>

    /// How long one fallocate may take before the helper is presumed stuck and killed.
    static let helperTimeoutMs: Int32 = 60_000
    static let cacheLifetime: Duration = .milliseconds(100)
    /// Tests that must race the kernel stretch the lifetime (a slow guest takes > 100 ms between steps).
    nonisolated(unsafe) var cacheLifetimeForTests: Duration?

    private struct State {
        var helper: ChargeHelper?
        var oomBaseline: Int64 = 0
        /// Headroom (margin already subtracted) seen at the last read; nil = unlimited.
        var roomSeen: Int64? = 0
        var chargedSinceRead: Int64 = 0
        var readAt: ContinuousClock.Instant?
        var closed = false
        var goneLogged = false
    }

    public init(target: CgroupTarget, arena: FileDescriptor) throws {
        self.target = target
        let ncpu = Int64(max(1, sysconf(Int32(_SC_NPROCESSORS_CONF))))
        let page = Int64(max(4096, sysconf(Int32(_SC_PAGESIZE))))
        marginBytes = 256 * 1024 + ncpu * 64 * page
        let fd = fcntl(arena.rawValue, F_DUPFD_CLOEXEC, 3)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        arenaFD = fd
        let leaf: CgroupLeaf
        do {
            leaf = try target.createLeaf()
        } catch {
            close(fd)
            throw error
        }
        self.leaf = leaf
        var st = State()
        do {
            st.oomBaseline = try Self.oomCount(target, leaf)
            st.helper = try ChargeHelper.spawn(arena: fd, leaf: leaf, userPath: target.path)
        } catch {
            try? target.removeLeaf(leaf)
            close(fd)
            throw error
        }
        state = Mutex(st)
        if target.version == .v2, (try? cgReadFile(target.resolvedPath + "/memory.oom.group"))?.cgTrimmed == "1" {
            Log.line("warning: \(target.path) has memory.oom.group=1: an OOM kill of the charge helper would take every process in it")
        }
    }

    deinit { shutdown() }

    public var summary: String {
        "memcg=\(target.path) (cgroup \(target.version == .v1 ? "v1" : "v2"))"
    }

    /// `arena` must be the fd given to init: the helper works on its own copy of it.
    public func charge(arena: FileDescriptor, offset: Int64, length: Int64) throws(Errno) {
        guard length > 0 else { return }
        try state.withLock { (st: inout State) throws(Errno) in
            guard !st.closed else { throw Errno.ioError }
            try checkRoom(&st, length)
            try instantiate(&st, offset: offset, length: length)
        }
    }

    public func availableBytes() -> Int64? {
        do throws(CgroupError) {
            guard let room = try target.headroom(reclaimable: true) else { return nil }
            return max(0, room - marginBytes)
        } catch {
            return 0
        }
    }

    public func shutdown() {
        let (wasOpen, helper): (Bool, ChargeHelper?) = state.withLock { st in
            guard !st.closed else { return (false, nil) }
            st.closed = true
            defer { st.helper = nil }
            return (true, st.helper)
        }
        guard wasOpen else { return }
        helper?.stop()
        do throws(CgroupError) {
            try target.removeLeaf(leaf)
        } catch {
            Log.line("\(error)")
        }
        close(arenaFD)
    }

    // MARK: status

    /// What the leaf is charged with now (its usage: the arena pages the helpers instantiated
    /// plus the helper's own few hundred KiB); nil when the leaf has no memory counters (v2 with
    /// memory not enabled in the target's subtree_control: then the target itself is charged).
    public var chargedBytesInLeaf: Int64? {
        let file = leaf.path + (target.version == .v1 ? "/memory.usage_in_bytes" : "/memory.current")
        return (try? cgReadFile(file)).flatMap { Int64($0.cgTrimmed) }
    }

    /// The target's usage and limit (nil = unlimited).
    public func targetUsage() throws(CgroupError) -> (usage: Int64, limit: Int64?) {
        try target.targetUsage()
    }

    /// e.g. "memcg=/sys/fs/cgroup/x (cgroup v2): leaf 12.0 MiB, target 40.0 MiB of 64.0 MiB, room 23.2 MiB"
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
    var helperPID: pid_t? { state.withLock { $0.helper?.pid } }

    // MARK: internals

    private func checkRoom(_ st: inout State, _ length: Int64) throws(Errno) {
        let now = ContinuousClock.now
        if let at = st.readAt, now - at < (cacheLifetimeForTests ?? Self.cacheLifetime) {
            guard let seen = st.roomSeen else { return }  // unlimited a moment ago
            if st.chargedSinceRead + length <= seen / 2 {
                st.chargedSinceRead += length
                return
            }
        }
        let room: Int64?
        do throws(CgroupError) {
            room = try target.headroom(reclaimable: false).map { $0 - marginBytes }
        } catch {
            throw fail(&st, error)
        }
        if let r = room, length > r {
            // Room that exists only after reclaim is never cached: re-read next time.
            st.readAt = nil
            let withCache: Int64?
            do throws(CgroupError) {
                withCache = try target.headroom(reclaimable: true).map { $0 - marginBytes }
            } catch {
                throw fail(&st, error)
            }
            if let r2 = withCache, length > r2 { throw Errno.noSpace }
            return
        }
        st.roomSeen = room
        st.chargedSinceRead = length
        st.readAt = now
    }

    private func instantiate(_ st: inout State, offset: Int64, length: Int64) throws(Errno) {
        for attempt in 0..<2 {
            let helper: ChargeHelper
            if let h = st.helper {
                helper = h
            } else {
                do throws(CgroupError) {
                    helper = try ChargeHelper.spawn(arena: arenaFD, leaf: leaf, userPath: target.path)
                    st.helper = helper
                } catch {
                    throw fail(&st, error)
                }
            }
            switch helper.request(offset: offset, length: length, timeoutMs: Self.helperTimeoutMs) {
            case .done(0):
                return
            case .done(let e):
                st.readAt = nil
                throw (e == ENOMEM || e == ENOSPC) ? Errno.noSpace : Errno(rawValue: e)
            case .died(let death):
                st.helper = nil
                st.readAt = nil
                let ooms = (try? Self.oomCount(target, leaf)) ?? st.oomBaseline
                let oomKilled = ooms > st.oomBaseline
                st.oomBaseline = ooms
                // Respawn now so the next charge finds a helper; the log names both pids.
                var respawned = "not respawned"
                do throws(CgroupError) {
                    let h = try ChargeHelper.spawn(arena: arenaFD, leaf: leaf, userPath: target.path)
                    st.helper = h
                    respawned = "respawned as pid \(h.pid)"
                } catch {
                    if error.kind == .gone { throw fail(&st, error) }
                    respawned = "respawn failed: \(error)"
                }
                if oomKilled {
                    Log.line("\(summary): charge helper pid \(helper.pid) was OOM-killed (\(death)); \(respawned); returning ENOSPC")
                    throw Errno.noSpace
                }
                let retry = attempt == 0 && st.helper != nil
                Log.line("\(summary): charge helper pid \(helper.pid) \(death); \(respawned); \(retry ? "retrying" : "returning EIO")")
                if !retry { throw Errno.ioError }
            }
        }
        throw Errno.ioError
    }

    /// Maps a cgroup failure to the errno the page store sees, logging the reason once.
    private func fail(_ st: inout State, _ error: CgroupError) -> Errno {
        if error.kind == .gone {
            if !st.goneLogged {
                st.goneLogged = true
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
        let inLeaf = (try? cgReadFile(leafFile)).flatMap { CgroupTarget.statValue($0, "oom_kill") } ?? 0
        return try target.oomKillCount() + (target.version == .v1 ? inLeaf : 0)
    }
}
