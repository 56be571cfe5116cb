import CFuse
import Glibc
import SystemPackage

/// All file data of a mount, as 4 KiB pages of the arena (`Arena`), and who pays for them.
///
/// Every page is charged by a `PendingCharge` before it is handed out, and goes back through
/// `free`: those are where a page is charged (through the `PageCharger`, which decides which
/// cgroup pays) and where the charge is given back (punching the page out of the arena). Pages are numbered from 1; 0 means "no page" in page maps.
///
/// Stale data must never reach another file. A page is handed out only from places holding
/// pages known to read as zeros: never-used pages (holes), `punched` (a punch that succeeded:
/// holes again), and `reserve` (charged holes); or from `freed`, the charged pages files gave
/// back, which `takeCharged` zero-fills as it hands them out (every byte written, or the page
/// does not go). A page whose zeroing fails is punched instead; a page whose punch fails too is
/// never used again. Freeing costs no system call until the reserve is full (unlinking a small
/// file used to cost a 4 KiB zero-fill or a punch of its own, each a pwrite or a fallocate).
///
/// Not thread-safe: the file system calls it under its own lock. Only a `PendingCharge` runs
/// outside it (a charge may wait on a frozen or slow target); the pages it charges belong to no
/// one else until `settle` takes them back.
public final class PageStore {
    /// Charged pages kept free for reuse, so that small writes do not each cost a charge round
    /// trip. This is the store's part of the slack between bytes stored and bytes charged.
    public static let reserveLimit = 64  // 256 KiB
    /// Pages are charged in runs of at least this many (256 KiB); the extras wait in the reserve.
    /// A run is charged only when the reserve is short; callers charging at once may overfill it,
    /// and each trims it back to `reserveLimit` once its own operation has taken its pages. One
    /// charge round trip serves 64 single-page writes.
    static let chargeBatch = reserveLimit

    /// One charge target's own pages: its charger, and the charged pages it keeps for reuse
    /// (a page charged to one target must never be handed to a file of another).
    struct Pool {
        let charger: PageCharger
        /// The target's cgroup path after realpath ("" for the mount's own).
        let key: String
        var reserve: [UInt32] = []
        var freed: [UInt32] = []
        var pagesInUse = 0
    }
    /// Index 0 is the mount's own target (memcg=, or the daemon); others are directories'
    /// targets (`openTarget`), opened when first set. A slot whose target was given back is nil.
    private var pools: [Pool?]
    /// The target the current operation charges to and frees into: set by the file system for
    /// the inode it works on, under its exclusive lock (so no other operation sees it change).
    public var activeTarget = 0
    private var charger: PageCharger { pools[activeTarget]?.charger ?? mountCharger }
    /// The mount's own target's charger (pool 0's). A backing file is made and charged by its
    /// own target's charger (`BackingFile.target`: a directory's target's for a mapped or
    /// executed file below it).
    private let mountCharger: PageCharger
    let arena: Arena
    var capacityPages: Int { arena.capacityPages }

    /// Next never-used page number; pages below it were handed out at least once.
    private var nextFresh: Int = 1
    /// Freed pages punched out of the arena (holes, uncharged); reusing one charges it again.
    private var punched: [UInt32] = []
    /// Charged pages that read as zeros (just charged: holes). Newly charged runs are pushed in
    /// descending order, so that taking from the end hands a write ascending pages (one copy per
    /// run).
    private var reserve: [UInt32] {
        get { pools[activeTarget]?.reserve ?? [] }
        _modify { yield &pools[activeTarget]!.reserve }
    }
    /// Charged pages given back by files, still holding their data: zero-filled only when handed
    /// out again (`takeCharged`, last freed first), punched in batches when the reserve overflows.
    private var freed: [UInt32] {
        get { pools[activeTarget]?.freed ?? [] }
        _modify { yield &pools[activeTarget]!.freed }
    }
    /// Pages that belong to files right now.
    public private(set) var pagesInUse = 0
    /// Freed pages whose punch failed (and which were not zero-filled into the reserve): never
    /// handed out again, and still charged.
    public private(set) var pagesLost = 0

    /// Pages charged to the charger's cgroup (in use, the reserve, any lost, any whose punch waits).
    public var pagesCharged: Int {
        pagesInUse + pagesLost + deferred.count + pools.reduce(0) { $0 + ($1.map { $0.reserve.count + $0.freed.count } ?? 0) }
    }

    /// With state kept for a successor (docs/takeover.md): punches wait for `punchDeferred`,
    /// which the file system calls once the record that no longer names the pages is published.
    /// A crash in between then leaves the successor's page maps over pages that still hold their
    /// data, not over holes. The pages are charged meanwhile and handed to no one.
    public var deferPunches = false
    /// Set for a mount that keeps state for a successor (-o takeover): every arena page a reply
    /// reads from is in this process's page tables before the reply is written. Data is stored
    /// with pwrite, which maps nothing, and a reply copied from a page with no page-table entry
    /// takes the kernel's slow path, which fails the copy when a SIGKILL is pending: the caller
    /// of a READ answered at that moment got EIO, with no resend (stress.sh kill_loop,
    /// docs/takeover.md "Kill loops"). A read maps what it replies from (`mapForReply`, one call
    /// per run at a page's first read); only if the bits that say what is mapped cannot be had,
    /// each page a charge adds is mapped at once (`Arena.populate`, one call per charged run).
    public var mapsChargedPages = false {
        // Why: mapping at the charge zero-filled each page before its first write (6% of a
        // server's CPU in 4 KiB creates); a read maps it once its data is there instead.
        didSet { if mapsChargedPages && mapped == nil { mapped = MappedPages(capacityPages: arena.capacityPages) } }
    }
    /// Which arena pages are mapped (nil without `mapsChargedPages`).
    private var mapped: MappedPages?
    private var deferred: [UInt32] = []
    /// The pages being punched, swapped with `deferred`: both keep their buffers (no
    /// allocation per published record; an unlink with state kept punches after each).
    private var punching: [UInt32] = []

    /// Punches what waited for a record to be published.
    public func punchDeferred() {
        guard !deferred.isEmpty else { return }
        swap(&deferred, &punching)
        punchNow(&punching)
        punching.removeAll(keepingCapacity: true)
    }

    /// A store on `arena` whose pages `charger` pays for (a charger that instantiates pages from
    /// another process was built from the same arena's `fileDescriptor`).
    /// `key`: the mount's target cgroup after realpath ("" for the daemon's own cgroup).
    public init(arena: Arena, charger: PageCharger, key: String = "") {
        self.arena = arena
        self.pools = [Pool(charger: charger, key: key)]
        self.mountCharger = charger
    }

    /// Opens directories' targets (nil: no directory may have one, EOPNOTSUPP).
    public var targets: (any ChargeTargets)?

    /// The cgroup path (after realpath) of target `index`; "" for the daemon's own cgroup.
    public func targetKey(_ index: Int) -> String { pools.indices.contains(index) ? pools[index]?.key ?? "" : "" }

    /// Moves whenever a target is opened or given back: kept state records the table
    /// (`targetKeys`) in the next transaction when it moved (one compare per change otherwise).
    public private(set) var targetsGeneration = 0
    /// Each target's cgroup by index (nil: a slot given back); index 0 is the mount's.
    public var targetKeys: [String?] { pools.map { $0?.key } }

    /// A takeover: opens the targets a dead server had, at the same indexes (files name them
    /// by index), each with a new charger (a helper in a leaf of it: the old one went with the
    /// server), and sets the pages each one's files hold (`pagesInUse`, by index; backing files'
    /// pages included, as `noteBackingPages` counts them). The pages stay charged where they
    /// are: a charge belongs to the page, not to the helper that made it. Returns the target
    /// that could not be opened and why (its cgroup removed meanwhile; ENOTSUP: no `targets`).
    public func adoptTargets(_ keys: [String?], pagesInUse counts: [Int: Int]) -> (key: String, error: Errno)? {
        for (index, key) in keys.enumerated() where index > 0 {
            guard let key else { continue }
            guard let targets else { return (key, .notSupported) }
            let charger: PageCharger
            do throws(Errno) {
                charger = try targets.charger(for: key, arena: arena.fileDescriptor)
            } catch {
                return (key, error)
            }
            while pools.count <= index { pools.append(nil) }
            pools[index] = Pool(charger: charger, key: key, pagesInUse: counts[index] ?? 0)
        }
        pools[0]?.pagesInUse = counts[0] ?? 0
        targetsGeneration += 1
        return nil
    }

    /// Directories' targets in use (index 1 on): each one's cgroup, the pages charged to it
    /// (held by files, and kept for reuse) and its charger (for its limit and headroom).
    public var directoryTargets: [(key: String, chargedPages: Int, charger: PageCharger)] {
        pools.dropFirst().compactMap { pool in
            pool.map { ($0.key, $0.pagesInUse + $0.reserve.count + $0.freed.count, $0.charger) }
        }
    }

    /// The pages files of target `index` hold.
    public func pagesInUse(target index: Int) -> Int { pools.indices.contains(index) ? pools[index]?.pagesInUse ?? 0 : 0 }

    /// A store taking over an arena whose pages in use are `inUse` (read from the kept page
    /// maps; their targets are set by `adoptTargets`) plus
    /// `backingPages` in backing files. Every other page below the highest in use is punched:
    /// it was free, in a reserve, or picked by a charge the dead server never settled, and a
    /// punch makes it a hole and gives its charge back, whichever it was (the charge is thus
    /// recomputed from the page maps and cannot drift).
    public convenience init(adopting arena: Arena, charger: PageCharger, key: String = "", inUse: [UInt32], backingPages: Int) {
        self.init(arena: arena, charger: charger, key: key)
        var used = [Bool](repeating: false, count: 0)
        let highest = Int(inUse.max() ?? 0)
        used = [Bool](repeating: false, count: highest + 1)
        for page in inUse { used[Int(page)] = true }
        nextFresh = highest + 1
        var free: [UInt32] = []
        var run: (first: Int, count: Int) = (0, 0)
        if highest >= 1 {
            for page in 1...highest {
                if used[page] {
                    if run.count > 0 && run.first + run.count == page { run.count += 1 } else {
                        arena.populate(first: UInt32(run.first), count: run.count)
                        run = (page, 1)
                    }
                } else {
                    free.append(UInt32(page))
                }
            }
        }
        arena.populate(first: UInt32(run.first), count: run.count)
        // Past the highest page in use, nothing is known: punch the rest of what the arena's
        // file may hold (one call; a hole stays a hole).
        let rest = arena.capacityPages + 1 - nextFresh
        if rest > 0 { _ = arena.punch(first: UInt32(nextFresh), count: rest) }
        punch(&free)
        pagesInUse = inUse.count + backingPages
        pools[0]?.pagesInUse = inUse.count
    }

    /// The target for `path` if the caller may charge it (ChargeTargets.check): the one already
    /// open for that cgroup, else a new one, whose charger (a helper) starts now: only targets
    /// in use cost a helper.
    public func openTarget(_ path: String, uid: UInt32, gid: UInt32, groups: [UInt32] = []) throws(Errno) -> Int {
        guard let targets else { throw .notSupported }
        let key = try targets.check(path, uid: uid, gid: gid, groups: groups)
        if let found = pools.firstIndex(where: { $0?.key == key }) { return found }
        return addPool(Pool(charger: try targets.charger(for: key, arena: arena.fileDescriptor), key: key))
    }

    /// Puts a new target's pool in the first free slot after the mount's own; its index.
    private func addPool(_ pool: Pool) -> Int {
        targetsGeneration += 1
        if let free = pools.indices.dropFirst().first(where: { pools[$0] == nil }) {
            pools[free] = pool
            return free
        }
        pools.append(pool)
        return pools.count - 1
    }

    /// memcg=auto (nil on other mounts): the scope P, whose cgroups files are charged to.
    public var shares: (any SharedScope)?

    /// memcg=auto: P after realpath (pool 0's key), nil on other mounts.
    public var sharedScopePath: String? { shares?.scopePath }

    /// memcg=auto: the cgroup a calling process counts as (its own inside P, else P), for the
    /// file system's facade to ask with no lock held (it reads /proc).
    public var callerCgroupLookup: (@Sendable (Int32) -> String)? {
        guard let shares else { return nil }
        return { pid in shares.cgroupPath(ofProcess: pid) }
    }

    /// memcg=auto: usage and limit of a cgroup and its ancestors up to P (reads cgroupfs: ask
    /// with no lock held).
    public var sharedLevelsLookup: (@Sendable (String) -> [(cgroup: String, used: Int64, limit: Int64?)])? {
        guard let shares else { return nil }
        return { path in shares.levels(of: path) }
    }

    /// memcg=auto: the target for cgroup `path` (inside P), opened with its charger when first
    /// named. The mounter's permission on P covers every cgroup below it, so nothing is checked
    /// per cgroup. A cgroup that cannot take a charger (removed meanwhile, no memory controller
    /// of its own on v2) gives way to its parent, up to P (target 0).
    public func openSharedTarget(_ path: String) -> Int {
        guard let scope = sharedScopePath, let targets else { return 0 }
        var level = path
        while level != scope && level.hasPrefix(scope + "/") {
            if let found = pools.firstIndex(where: { $0?.key == level }) { return found }
            if let charger = try? targets.charger(for: level, arena: arena.fileDescriptor) {
                return addPool(Pool(charger: charger, key: level))
            }
            guard let slash = level.lastIndex(of: "/") else { break }
            level = String(level[..<slash])
        }
        return 0
    }

    /// Gives a directory's target back once no file holds its pages and no directory names it:
    /// its kept pages are punched and its helper stops. The mount's own target stays.
    public func releaseTarget(_ index: Int) {
        guard index > 0, pools.indices.contains(index), let pool = pools[index], pool.pagesInUse == 0 else { return }
        let active = activeTarget
        activeTarget = index
        var all = reserve + freed
        reserve.removeAll()
        freed.removeAll()
        punch(&all)
        activeTarget = active
        pool.charger.shutdown()
        pools[index] = nil
        targetsGeneration += 1
    }

    /// A store on an arena of its own, paid for by the charger `makeCharger` builds for that
    /// arena's file (in-process users: tests, tools).
    public convenience init(capacityPages: Int = Int(UInt32.max) - 1,
                            charger makeCharger: (FileDescriptor) throws -> PageCharger) throws {
        let arena = try Arena(capacityPages: capacityPages)
        self.init(arena: arena, charger: try makeCharger(arena.fileDescriptor))
    }

    /// Bytes that can still be charged (the cgroup's headroom); nil when nothing limits it.
    public func availableBytes() -> Int64? { mountCharger.availableBytes() }

    /// Where charges go, for logs and the status attribute.
    public var chargeSummary: String { mountCharger.summary }

    /// Stops the charger (its helper and leaf cgroup); the pages stay readable.
    public func shutdownCharger() {
        mountCharger.shutdown()
        for pool in pools.dropFirst() { pool?.charger.shutdown() }
    }

    @inline(__always)
    public func address(of page: UInt32) -> UnsafeMutableRawPointer {
        arena.address(of: page)
    }

    /// With `mapsChargedPages`: maps the arena pages of a reply's vector that are not mapped yet
    /// (one call for the vector, at the first read of its pages; a bit test per 64 pages after).
    /// Under the file system's lock, shared or exclusive. A vector outside the arena (the zeros
    /// a hole reads as) is left alone.
    @inline(__always)
    func mapForReply(_ vector: iovec) {
        guard let mapped, let start = vector.iov_base, vector.iov_len > 0 else { return }
        let offset = UnsafeRawPointer(arena.address(of: 0)).distance(to: UnsafeRawPointer(start))
        guard offset >= 0, offset < arena.mappedBytes else { return }
        let first = offset / PageSize.bytes
        let count = (offset + vector.iov_len + PageSize.bytes - 1) / PageSize.bytes - first
        if mapped.allMapped(first: first, count: count) { return }
        arena.populate(first: UInt32(first), count: count)
        mapped.set(first: first, count: count, mapped: true)
    }

    // MARK: - Large files' backing files

    /// Whether large files can have backing files of their own: the arena is on a private tmpfs
    /// (a memfd arena follows the host's huge-page setting) and the charger can make them.
    public var canMakeBackingFiles: Bool { arena.tmpfsRoot != nil }

    /// A new, empty backing file on the arena's tmpfs, made by target `target`'s charger (for a
    /// cgroup, inside it), which charges its pages too. Takes a charger round trip: call it with
    /// no lock of the tree held (the charger is looked up under it: `backingCharger`).
    static func makeBackingFile(root: FileDescriptor, charger: PageCharger, target: Int,
                                       calls: PageFileCalls) throws(Errno) -> BackingFile {
        let file = BackingFile(try charger.makeFile(in: root), target: target)
        file.syscalls = calls
        return file
    }

    /// What `makeBackingFile` needs of the store for target `target`, read under the tree's lock:
    /// nil when no backing file can be made (no private tmpfs, or the target was given back).
    func backingMaker(target: Int) -> (root: FileDescriptor, charger: PageCharger, calls: PageFileCalls)? {
        guard let root = arena.tmpfsRoot else { return nil }
        guard target == 0 || (pools.indices.contains(target) && pools[target] != nil) else { return nil }
        return (root, pools[target]?.charger ?? mountCharger, backingFileCalls)
    }

    /// A new, empty backing file of the mount's own target (see the static form).
    public func makeBackingFile() throws(Errno) -> BackingFile {
        guard let root = arena.tmpfsRoot else { throw .notSupported }
        let file = BackingFile(try mountCharger.makeFile(in: root))
        file.syscalls = backingFileCalls
        return file
    }

    /// The system calls new backing files change their contents with (tests inject failures).
    var backingFileCalls = PageFileCalls.kernel

    /// Pages of backing files count as in use, as arena pages do (size=, df, the status), and
    /// as their target's (which is not given back while a file holds its pages).
    public func noteBackingPages(_ delta: Int, of file: BackingFile) {
        pagesInUse += delta
        if pools.indices.contains(file.target) { pools[file.target]?.pagesInUse += delta }
    }

    /// A charge of page ranges of a backing file (pages `first..<first+count` of the file), for
    /// `wanted` of them; `owner` and `shrinks` say which file and which of its shapes it was for.
    public func pendingCharge(of file: BackingFile, runs: [(first: Int, count: Int)], wanted: Int,
                              owner: UInt64, shrinks: UInt64, wholeOrNothing: Bool = false) -> PendingCharge {
        let charger = pools.indices.contains(file.target) ? pools[file.target]?.charger ?? mountCharger : mountCharger
        return PendingCharge(runs: runs.map { PendingCharge.Run(first: $0.first, count: $0.count) }, wanted: wanted,
                             charger: charger, file: PendingCharge.FileTarget(file: file, owner: owner, shrinks: shrinks,
                                                                              wholeOrNothing: wholeOrNothing), target: file.target)
    }

    /// Charged pages ready to hand out (those a file gave back are zero-filled on the way).
    public var chargedFreePages: Int { reserve.count + freed.count }

    /// Hands out up to `count` charged pages, appending them to `pages`; returns how many. Every
    /// page handed out reads as zeros: holes from the reserve first, then pages files gave back,
    /// each zero-filled here (one that cannot be is punched, or lost, and not handed out, so
    /// fewer than `count` may come even when that many were charged). Never charges, so it is
    /// quick under any lock.
    @discardableResult
    public func takeCharged(_ count: Int, into pages: inout [UInt32]) -> Int {
        var got = min(count, reserve.count)
        for _ in 0..<got { pages.append(reserve.removeLast()) }
        var failed: [UInt32] = []
        while got < count, let page = freed.popLast() {
            // zero() writes through the file, so the daemon does not fault the page into its mapping.
            if arena.zero(page) {
                pages.append(page)
                got += 1
            } else {
                failed.append(page)
            }
        }
        pagesInUse += got
        pools[activeTarget]?.pagesInUse += got
        punch(&failed)
        return got
    }

    /// Picks arena pages to charge for a caller short of `wanted` pages: at least `chargeBatch`
    /// (one round of charging serves 64 small writes; the extras wait in the reserve). Punched
    /// pages are reused first, in runs of consecutive pages (the stack holds ascending runs;
    /// each run is one charge), then never-used ones. The pages belong to the caller until they
    /// are given to `settle`; nil when the arena has no page left.
    public func pickForCharging(_ wanted: Int) -> PendingCharge? {
        let target = max(wanted, Self.chargeBatch)
        var runs: [PendingCharge.Run] = []
        var picked = 0
        while picked < target, let page = punched.last {
            var n = 1
            while picked + n < target, n < punched.count, punched[punched.count - 1 - n] == page &+ UInt32(n) { n += 1 }
            punched.removeLast(n)
            runs.append(PendingCharge.Run(first: Int(page), count: n))
            picked += n
        }
        let available = capacityPages + 1 - nextFresh
        if picked < target, available > 0 {
            let n = min(target - picked, available)
            runs.append(PendingCharge.Run(first: nextFresh, count: n))
            nextFresh += n
            picked += n
        }
        guard picked > 0 else { return nil }
        return PendingCharge(runs: runs, wanted: min(wanted, picked), charger: charger, file: nil, target: activeTarget)
    }

    /// Takes back picked pages: the first `charged` of them (in the order they were picked)
    /// join the reserve (zero: never used, or punched), the rest are holes again.
    public func settle(_ pending: PendingCharge, charged: Int) {
        let active = activeTarget
        activeTarget = pools.indices.contains(pending.target) && pools[pending.target] != nil ? pending.target : 0
        defer { activeTarget = active }
        var left = max(0, charged)
        var ready: [UInt32] = []
        var holes: [UInt32] = []
        for run in pending.runs {
            let taken = min(left, run.count)
            left -= taken
            if mapsChargedPages && mapped == nil && taken > 0 { arena.populate(first: UInt32(run.first), count: taken) }
            for p in run.first..<(run.first + taken) { ready.append(UInt32(p)) }
            for p in (run.first + taken)..<(run.first + run.count) { holes.append(UInt32(p)) }
        }
        // Both descending, so that taking from the end goes up.
        reserve.append(contentsOf: ready.reversed())
        punched.append(contentsOf: holes.sorted(by: >))
    }

    /// Gives pages back. Up to `reserveLimit` (with the reserve) stay charged for reuse, as they
    /// are: no system call. Past that they are punched out of the arena, which frees their memory
    /// and uncharges them. A punch costs a system call however many pages it takes, so a small
    /// one takes kept pages along (freed ones first, the highest, then unused ones), up to
    /// `reserveLimit / 2` in all: the next frees find room again (files freed in the order they
    /// were written give back consecutive pages: one punch serves 32 unlinks of small files).
    public func free<S: Sequence>(_ pages: S) where S.Element == UInt32 {
        var toPunch: [UInt32] = []
        for page in pages {
            pagesInUse -= 1
            pools[activeTarget]?.pagesInUse -= 1
            if reserve.count + freed.count < Self.reserveLimit {
                freed.append(page)
            } else {
                toPunch.append(page)
            }
        }
        guard !toPunch.isEmpty else { return }
        takeKept(Self.reserveLimit / 2 - toPunch.count, into: &toPunch)
        punch(&toPunch)
    }

    /// Moves up to `count` kept pages into `toPunch`: freed ones first (reusing them would cost
    /// a zero-fill; a charged hole costs nothing), the highest first, then unused ones (a charge
    /// run's leftover, which would otherwise keep its room for good and shrink every later punch).
    private func takeKept(_ count: Int, into toPunch: inout [UInt32]) {
        let fromFreed = min(freed.count, max(0, count))
        if fromFreed > 0 {
            freed.sort(by: >)
            toPunch.append(contentsOf: freed[..<fromFreed])
            freed.removeFirst(fromFreed)
        }
        let fromReserve = min(reserve.count, max(0, count - fromFreed))
        if fromReserve > 0 {
            toPunch.append(contentsOf: reserve[..<fromReserve])  // the highest: the reserve is descending
            reserve.removeFirst(fromReserve)
        }
    }

    /// Copies `length` bytes into the arena at `page` + `inner` (within consecutive pages).
    /// The pages are already charged; a failure (none is expected with noswap) is reported, not
    /// papered over by a copy through the mapping, whose fault could charge or kill.
    @inline(__always)
    func store(_ source: UnsafeRawPointer, length: Int, page: UInt32, inner: Int) throws(Errno) {
        try arena.write(source, length: length, at: Arena.offset(of: page) + Int64(inner))
    }

    /// Punches the reserve down to `reserveLimit`: charges that ran at once (each caller finding
    /// the reserve empty) may together have charged more than one batch.
    public func trimReserveToLimit() {
        let excess = reserve.count + freed.count - Self.reserveLimit
        guard excess > 0 else { return }
        var toPunch: [UInt32] = []
        takeKept(excess, into: &toPunch)
        punch(&toPunch)
    }

    /// Releases the whole reserve (used when the mount must hand every byte back).
    public func trimReserve() {
        let active = activeTarget
        defer { activeTarget = active }
        for index in pools.indices where pools[index] != nil {
            activeTarget = index
            var all = reserve + freed
            reserve.removeAll()
            freed.removeAll()
            punch(&all)
        }
    }

    /// Punches `pages` out of the arena in consecutive runs. Only pages whose punch succeeded
    /// become reusable; a run that fails is retried page by page, and a page that fails alone is
    /// lost rather than handed to another file with its old contents.
    private func punch(_ pages: inout [UInt32]) {
        guard !pages.isEmpty else { return }
        if deferPunches {
            deferred.append(contentsOf: pages)
            pages.removeAll()
            return
        }
        punchNow(&pages)
    }

    private func punchNow(_ pages: inout [UInt32]) {
        guard !pages.isEmpty else { return }
        pages.sort()
        var holes: [UInt32] = []
        holes.reserveCapacity(pages.count)
        var i = 0
        while i < pages.count {
            var j = i + 1
            while j < pages.count, pages[j] == pages[j - 1] &+ 1 { j += 1 }
            // A punch unmaps what it frees: a read maps each page again (`mapForReply`).
            if arena.punch(first: pages[i], count: j - i) {
                mapped?.set(first: Int(pages[i]), count: j - i, mapped: false)
                holes.append(contentsOf: pages[i..<j])
            } else {
                for page in pages[i..<j] {
                    if arena.punch(first: page, count: 1) {
                        mapped?.set(first: Int(page), count: 1, mapped: false)
                        holes.append(page)
                    } else {
                        pagesLost += 1
                    }
                }
            }
            i = j
        }
        // Descending, so that popping from the end reuses ascending runs.
        punched.append(contentsOf: holes.reversed())
    }
}

/// Arena pages picked for charging (`PageStore.pickForCharging`), charged without any lock of
/// the file system's held, then given back to `PageStore.settle`.
public struct PendingCharge: Sendable {
    /// Consecutive pages: one charge each.
    struct Run: Sendable {
        let first: Int
        let count: Int
    }
    /// Pages of a backing file rather than of the arena.
    public struct FileTarget: Sendable {
        public let file: BackingFile
        /// The inode (raw number) the pages are for, and its backing file's shrink count when
        /// they were picked: a shrink meanwhile may have freed some of them again.
        public let owner: UInt64
        public let shrinks: UInt64
        /// For an operation that stores all or nothing (fallocate, a truncate up under
        /// passthrough): a charge short of `wanted` is given back whole, as tmpfs undoes a
        /// fallocate that ran out of room, rather than left as pages the file did not get.
        public var wholeOrNothing = false
    }
    let runs: [Run]
    /// What the caller needs of them; near a limit the charge settles for this much.
    let wanted: Int
    let charger: PageCharger
    public let file: FileTarget?
    /// The store's target the pages are charged to (`PageStore.activeTarget` when picked).
    public var target: Int = 0

    /// The runs charged when `charge` reported `charged` pages (in the order they were picked).
    public func chargedRuns(_ charged: Int) -> [(first: Int, count: Int)] {
        var left = max(0, charged)
        var out: [(first: Int, count: Int)] = []
        for run in runs where left > 0 {
            let n = min(left, run.count)
            out.append((run.first, n))
            left -= n
        }
        return out
    }

    /// Charges the runs in order, and of the run the charger refuses near a limit its leading
    /// part (halving down to what is still wanted, then to one page); stops there. Returns the
    /// pages charged, counted from the first (give them to `settle`), and any error other than
    /// ENOSPC that stopped it (the helper died, the cgroup vanished).
    public func charge() -> (charged: Int, failure: Errno?) {
        var charged = 0
        for run in runs {
            let stillWanted = max(1, wanted - charged)
            var n = run.count
            while true {
                do {
                    let offset = Int64(run.first * PageSize.bytes), length = Int64(n * PageSize.bytes)
                    if let file {
                        try charger.charge(file: file.file.fileDescriptor, offset: offset, length: length)
                    } else {
                        try charger.charge(offset: offset, length: length)
                    }
                    break
                } catch where error == .noSpace {
                    if n == 1 { return (charged, nil) }
                    n = n > stillWanted ? stillWanted : n / 2
                } catch {
                    return (charged, error)
                }
            }
            charged += n
            if n < run.count { break }
        }
        return (charged, nil)
    }
}

