import Glibc
import Synchronization
import SystemPackage

/// The file system as callers see it: one method per operation, taking plain values and
/// returning attributes or an errno, so it runs the same in-process (tests) and behind FUSE.
///
/// This type only locks; what each operation means lives in `FileSystemCore`.
///
/// Locks, in the one order they may nest:
/// 1. The tree lock (`core`), a reader-writer lock: reads of data and attributes share it;
///    anything that changes the tree, a count or the page store holds it alone. The page store
///    has no lock of its own: it is the tree's (only a `PendingCharge` runs outside it).
/// 2. The charger's channel to its helper (`CgroupCharger`), taken by each charge: with no tree
///    lock held on the charge path below but in its last round; under it also for a truncate
///    up of a file read through passthrough, for the status attribute's headroom, and for a move between targets
///    (`FileSystemCore+Targets`: a directory's target set or removed, a rename into another
///    target), which charges the new target's pages with the tree held so that nothing changes
///    the moving files meanwhile.
/// The Bridge's passthrough table and the transport's locks are never taken with either held.
///
/// The charge path, whole (tmpfs's order: charge, insert, account; undo each on failure):
/// 1. Pick (Pages, under the tree lock): an operation short of charged pages stops before it
///    changes anything and returns `.charge(PendingCharge)`: arena pages from
///    `PageStore.pickForCharging` (punched ones first, then never-used ones), or a backing
///    file's holes (`storeBacked`, `allocateBacked`).
/// 2. Charge (Charging, no lock held): `PendingCharge.charge` has the `PageCharger` instantiate
///    the ranges: `DaemonCharger` itself, `CgroupCharger` through its helper in the target's
///    leaf cgroup, which refuses (ENOSPC) before the target or an ancestor would reach its
///    limit; near the limit a run is halved down to what is still wanted.
/// 3. Settle and run again (here, `charging`, under the tree lock again): the charged pages join
///    the reserve (or the backing file's map) and the operation runs again in the same lock hold
///    and takes them; what was refused is a hole again; in the last round the operation stores
///    what is charged (a short write, or ENOSPC), and charges with the tree lock held so that no
///    other writer takes the reserve's pages between its charge and its run.
/// 4. Give back (Pages): freed pages wait in the reserve up to `reserveLimit`, then are punched
///    out of the arena in batches, which uncharges them.
public final class FileSystem: Sendable {
    public static let rootIno = InodeNumber.root
    public static let nameMax = 255
    public static let xattrSizeMax = 65536
    public static let xattrNameMax = 255
    /// The root's read-only status attribute (getfattr -n user.chargefs.status MOUNTPOINT).
    public static let statusXattr: FileName = Array("user.chargefs.status".utf8)
    /// The root's read-only count of requests by kind: reserved here (no one may set it; empty
    /// in-process), answered by the transport, which sees the requests.
    public static let requestsXattr: FileName = Array("user.chargefs.requests".utf8)
    /// A directory's charge target (setfattr/getfattr -n user.chargefs.memcg DIR; see
    /// FileSystemCore+Targets).
    public static let memcgXattr: FileName = Array("user.chargefs.memcg".utf8)
    /// memcg=auto: the root's read-only table of who owns, shares and hosts what
    /// (getfattr -n user.chargefs.shares MOUNTPOINT; see FileSystemCore+Shares).
    public static let sharesXattr: FileName = Array("user.chargefs.shares".utf8)
    /// Room kept below a limit by the shared-charge check, as the charger keeps it.
    static let sharedCheckMargin: Int64 = 256 * 1024

    private let core: ReadWriteLock<FileSystemCore>
    public let config: FileSystemConfig
    /// `config.caching` as the mount resolved it at INIT; read without the lock on every open.
    private let resolvedCaching: Atomic<UInt8>
    /// Whether the kernel took FUSE passthrough at INIT.
    private let kernelPassthrough = Atomic(false)

    /// The state kept for a successor, nil unless asked for (docs/takeover.md). The same object
    /// as the core's, held here too so that a due checkpoint is seen without the lock.
    private let keeping: StateKeeping?
    /// memcg=auto: the cgroup a calling process counts as, and a cgroup's counters up to the
    /// scope; both read the kernel's files, so they are asked with no lock held. nil otherwise.
    private let callerCgroup: (@Sendable (Int32) -> String)?
    private let sharedLevels: (@Sendable (String) -> [(cgroup: String, used: Int64, limit: Int64?)])?

    public init(config: FileSystemConfig, store: sending PageStore) {
        self.config = config
        callerCgroup = store.callerCgroupLookup
        sharedLevels = store.sharedLevelsLookup
        core = ReadWriteLock(FileSystemCore(config: config, store: store))
        resolvedCaching = Atomic(Self.code(config.caching))
        keeping = nil
        takeover = nil
        attributesToRefresh = []
    }

    /// A file system that keeps its metadata in `state` for a successor (`init(takingOver:)`),
    /// and hands `keeper` the descriptors a successor needs: the arena and its tmpfs, the state
    /// files, and each backing file as it is made. Starts with a checkpoint of the empty tree.
    public init(config: FileSystemConfig, store: sending PageStore, state: StateFiles, keeper: any DescriptorKeeper) throws(StateError) {
        self.config = config
        callerCgroup = store.callerCgroupLookup
        sharedLevels = store.sharedLevelsLookup
        try keeper.keep(store.arena.fileDescriptor, as: .arena)
        if let root = store.arena.tmpfsRoot { try keeper.keep(root, as: .arenaRoot) }
        try keeper.keep(state.journal, as: .journal)
        for (i, fd) in state.checkpoints.enumerated() { try keeper.keep(fd, as: .checkpoint(i)) }
        let c = FileSystemCore(config: config, store: store)
        let k = StateKeeping(files: state, keeper: keeper)
        c.keeping = k
        c.store.deferPunches = true
        c.store.mapsChargedPages = true
        k.checkpointDue.store(true, ordering: .relaxed)
        k.checkpointIfDue(c)
        if let failure = k.failure { throw failure }
        core = ReadWriteLock(c)
        resolvedCaching = Atomic(Self.code(config.caching))
        keeping = k
        takeover = nil
        attributesToRefresh = []
    }

    /// Takes over a tree a dead server kept in `state` (same process or not): its checkpoint,
    /// then each journal transaction after it, up to the first torn one (dropped). `store`
    /// makes the page store on that server's arena (`Arena(adopting:)`,
    /// `PageStore(adopting:...)`) from the arena pages the files hold and the count of their
    /// pages in backing files; the other pages are punched, so what is charged is what the
    /// files hold. Keeps state on from here, in the same files.
    public init(takingOver state: StateFiles, keeper: any DescriptorKeeper, config: FileSystemConfig,
                store makeStore: (_ inUse: [UInt32], _ backingPages: Int) -> PageStore) throws(StateError) {
        var steps: [(name: String, at: UInt64)] = []
        var restorer = TreeRestorer(keeper: keeper, backingCalls: .kernel)
        var checkpointSeq: UInt64 = 0
        if let seq = try state.withActiveCheckpoint({ (seq, bytes) throws(StateError) -> UInt64 in
            try restorer.applyCheckpoint(bytes)
            return seq
        }) {
            checkpointSeq = seq
        }
        steps.append(("checkpoint applied", MonotonicClock.microseconds()))
        let (transactions, dropped) = state.transactions(after: checkpointSeq)
        for t in transactions { try restorer.apply(t.payload) }
        steps.append(("journal applied", MonotonicClock.microseconds()))
        try restorer.resolveBackings()
        guard restorer.inodes[.root]?.directory != nil else { throw .corrupt("no root directory") }
        // Backing files the keeper still holds that no inode names: the dead server dropped
        // them in a record it published (a file moved out of its backing file into a directory's
        // target, removed, shrunk into the arena) and died before it told the keeper, which it
        // does only after the publish. Held on, their pages stayed charged to their target until
        // unmount (targets.sh kill_unback_published: the 256 MiB file charged twice).
        let named = Set(restorer.backingIDs.values)
        let unnamed = keeper.backingFileIDs.filter { !named.contains($0) }
        for id in unnamed { keeper.forget(.backingFile(id)) }
        if !unnamed.isEmpty { Log.line("takeover: let go of \(unnamed.count) backing file(s) no inode names any more") }
        var inUse: [UInt32] = []
        var backingPages = 0
        // Pages by charge target (a directory's own, memcg=auto's hosts): recounted from the
        // maps, as the mount's own target's are.
        // One pass in place (`forEach`: no array of every inode; at 1M files this step took
        // 115-183 ms with `all`, a dictionary update per inode and a Set of the pages).
        var perTarget: [Int: Int] = [:]
        var ownPages = 0
        let keys = restorer.targetKeys
        try restorer.inodes.forEach { (inode: Inode) throws(StateError) in
            guard inode.chargeTarget == 0 || (keys.indices.contains(inode.chargeTarget) && keys[inode.chargeTarget] != nil) else {
                throw .corrupt("inode \(inode.ino) is charged to target \(inode.chargeTarget), which the state does not name")
            }
            let count = inode.pages.count
            guard count > 0 else { return }
            if inode.chargeTarget == 0 { ownPages += count } else { perTarget[inode.chargeTarget, default: 0] += count }
            if inode.backing != nil {
                backingPages += count
            } else {
                inode.pages.forEach { _, page in inUse.append(page) }
            }
        }
        if ownPages > 0 { perTarget[0] = ownPages }
        if let highest = inUse.max() {
            var held = [Bool](repeating: false, count: Int(highest) + 1)
            for page in inUse {
                guard !held[Int(page)] else { throw .corrupt("a page held by two files") }
                held[Int(page)] = true
            }
        }
        steps.append(("pages listed", MonotonicClock.microseconds()))
        let store = makeStore(inUse, backingPages)
        steps.append(("page store made", MonotonicClock.microseconds()))
        guard inUse.allSatisfy({ Int($0) <= store.capacityPages }) else { throw .corrupt("a page past the arena's end") }
        if let (key, error) = store.adoptTargets(keys, pagesInUse: perTarget) {
            throw .unsupported("charge target \(key) cannot be opened again (\(error)): its files' pages stay charged to it")
        }
        steps.append(("targets reopened", MonotonicClock.microseconds()))
        let c = FileSystemCore(config: config, store: store, restoring: restorer.inodes)
        let k = StateKeeping(files: state, keeper: keeper)
        k.nextBackingID = restorer.nextBackingID
        k.backingIDs = restorer.backingIDs
        for (unique, answer) in restorer.applied { k.remember(unique, answer) }
        c.keeping = k
        store.deferPunches = true
        store.mapsChargedPages = true
        // An ahead range of a file no one has open has no last close left to give it back (a
        // release is recorded with its trim, so only a record torn between them leaves one).
        var trimmed = StateChange(), anyTrimmed = false
        for ino in c.filesAhead.sorted(by: { $0.rawValue < $1.rawValue }) {
            guard let inode = c.inodes[ino], inode.openCount == 0 else { continue }
            c.trimAhead(inode)
            trimmed.inode(ino)
            anyTrimmed = true
        }
        if anyTrimmed { k.commit(c, nil, .done, trimmed) }
        self.config = config
        callerCgroup = store.callerCgroupLookup
        sharedLevels = store.sharedLevelsLookup
        core = ReadWriteLock(c)
        resolvedCaching = Atomic(Self.code(config.caching))
        keeping = k
        var refresh: [InodeNumber] = []
        var seen = Set<InodeNumber>()
        for ino in restorer.recentRemovals.reversed() where seen.insert(ino).inserted {
            if let inode = restorer.inodes[ino], !inode.isDirectory, inode.nlink > 0 { refresh.append(ino) }
        }
        attributesToRefresh = refresh
        steps.append(("tree made", MonotonicClock.microseconds()))
        takeover = TakeoverReport(checkpointSeq: checkpointSeq, transactions: transactions.count, droppedBytes: dropped,
                                  inodes: restorer.inodes.count, steps: steps)
    }

    /// Whether state is kept for a successor: the Bridge then reads each request's unique and
    /// passes it (`RequestContext`); otherwise it passes nil and pays this one check.
    @inline(__always)
    public var keepsState: Bool { keeping != nil }

    /// What a takeover found (nil when this file system was not taken over).
    public let takeover: TakeoverReport?

    /// A takeover's files that still have a name and lost one in one of the last changes before
    /// the crash: their attribute version must be bumped in the kernel (FUSE_NOTIFY_INVAL_INODE)
    /// before the successor answers anything (docs/takeover.md, "Kill loops"). If that removal
    /// is resent, the kernel ends it with a decrement of its cached link count of its own
    /// (fuse_entry_unlinked), and a reply that already carried the count after the removal (a
    /// READDIRPLUS of another directory, sent while no server served and answered first) would
    /// make it 0: ln of a remaining name then fails with ENOENT until the attributes are fetched
    /// again. After the bump the kernel ignores attributes from requests sent before it. Empty
    /// when not taken over.
    public let attributesToRefresh: [InodeNumber]

    /// Checkpoints taken so far and the last one's duration in nanoseconds (0, 0 without state).
    public var checkpointFigures: (count: Int, lastNanoseconds: UInt64) {
        core.withReadLock { c in (c.keeping?.checkpoints ?? 0, c.keeping?.lastCheckpointNanoseconds ?? 0) }
    }

    /// Sets the journal size at which a checkpoint is due (tests).
    public func setCheckpointBytes(_ bytes: Int) {
        core.withWriteLock { c in c.keeping?.checkpointBytes = bytes }
    }

    /// Test hook: the next change is applied but its record is never published (a kill just
    /// before the publish); drop the file system right after.
    func dropNextRecordForTest() {
        core.withWriteLock { c in c.keeping?.dropNextRecordForTest = true }
    }

    /// Takes a checkpoint now (tests; an upgrade).
    public func checkpointNow() {
        keeping?.checkpointDue.store(true, ordering: .relaxed)
        core.withReadLock { c in c.keeping?.checkpointIfDue(c) }
    }

    /// The journal's bytes since the last checkpoint and that checkpoint's size (nil without
    /// state), for `IdleCheckpoints`. Under the shared lock: a checkpoint sets both.
    public var journalFigures: (tail: Int, lastCheckpointBytes: Int)? {
        core.withReadLock { c in c.keeping.map { ($0.files.tail, $0.lastCheckpointBytes) } }
    }

    /// Watches the journal on the caller's thread (a server gives it one of its own) and takes a
    /// checkpoint when `policy` says so; returns if no state is kept or once `stop` says so
    /// (tests: a server runs it until it exits).
    public func watchForIdleCheckpoints(_ policy: IdleCheckpoints = IdleCheckpoints(), stop: () -> Bool = { false }) {
        var policy = policy
        while !stop(), let figures = journalFigures {
            if policy.due(tail: figures.tail, lastCheckpointBytes: figures.lastCheckpointBytes) { checkpointNow() }
            var pause = timespec(tv_sec: 0, tv_nsec: policy.sampleNanoseconds)
            nanosleep(&pause, nil)
        }
    }

    /// Records a change when state is kept (one nil check otherwise), in the caller's hold of
    /// the exclusive lock.
    @inline(__always)
    private func record(_ c: FileSystemCore, _ request: RequestContext?, _ answer: @autoclosure () -> AppliedRequest,
                        _ build: (inout StateChange) -> Void) {
        guard let k = c.keeping else { return }
        var change = StateChange()
        build(&change)
        k.commit(c, request, answer(), change)
    }

    private static let cachingCodes: [FileCaching] = [.automatic, .direct, .page]
    private static func code(_ caching: FileCaching) -> UInt8 { UInt8(cachingCodes.firstIndex(of: caching) ?? 0) }

    /// How file data reaches readers and writers: `config.caching`, or what it resolved to.
    public var caching: FileCaching { Self.cachingCodes[Int(resolvedCaching.load(ordering: .relaxed))] }

    /// What `cache=` came to (the default depends on the kernel); set once, at INIT.
    public func resolveCaching(_ caching: FileCaching) {
        resolvedCaching.store(Self.code(caching), ordering: .relaxed)
    }

    @inline(__always)
    private func exclusive<T>(_ body: (FileSystemCore) throws(Errno) -> T) throws(Errno) -> T {
        let result = try core.withWriteLock(body)
        if let keeping { checkpointIfDue(keeping) }
        return result
    }

    /// A checkpoint due is taken by the next caller of `exclusive` once it let go of the lock,
    /// under the shared lock (readers go on; changes wait for it).
    private func checkpointIfDue(_ keeping: StateKeeping) {
        guard keeping.checkpointDue.load(ordering: .relaxed) else { return }
        core.withReadLock { c in keeping.checkpointIfDue(c) }
    }

    @inline(__always)
    private func shared<T>(_ body: (FileSystemCore) throws(Errno) -> T) throws(Errno) -> T {
        try core.withReadLock(body)
    }

    public func lookup(parent: InodeNumber, name: FileName) throws(Errno) -> Attributes {
        try exclusive { c throws(Errno) in try c.lookup(parent: parent, name: name) }
    }
    public func forget(_ ino: InodeNumber, count: UInt64) {
        core.withWriteLock { c in
            c.forget(ino, count: count)
            // Only an eviction is kept: lookup counts are set high after a takeover anyway.
            if c.keeping != nil, c.inodes[ino] == nil { record(c, nil, .done) { $0.inode(ino) } }
        }
    }
    public func getattr(_ ino: InodeNumber) throws(Errno) -> Attributes {
        try shared { c throws(Errno) in try c.inode(ino).attributes }
    }
    /// `clearSetIDAsked`: the kernel asked this truncate or chown to clear setuid/setgid.
    public func setattr(_ ino: InodeNumber, _ changes: AttributeChanges, caller: Caller,
                        clearSetIDAsked: Bool, request: RequestContext? = nil) throws(Errno) -> Attributes {
        let (attributes, due) = try exclusive { c throws(Errno) -> (Attributes, ([Range<Int>], PageStore)?) in
            if case .attributes(let a)? = c.keeping?.answer(for: request) { return (a, nil) }
            let sizeBefore = changes.size == nil ? nil : c.inodes[ino]?.size
            let attributes = try c.setattr(ino, changes, caller: caller, clearSetIDAsked: clearSetIDAsked)
            // A truncate up past the threshold (as before writing through mmap) moves the file
            // now, holding what it held below the threshold, not at its first read-only open.
            let due = sizeBefore.flatMap { before in c.inodes[ino].flatMap { c.dueForBackingFile($0, sizeBefore: before) } }
            record(c, request, .attributes(attributes)) { $0.inode(ino) }
            return (attributes, due.map { ($0, c.store) })
        }
        if let (runs, _) = due, passthroughEnabled { makeBacking(ino, runs: runs, forOpen: false) }
        return attributes
    }
    public func readlink(_ ino: InodeNumber) throws(Errno) -> [UInt8] {
        try shared { c throws(Errno) in try c.readlink(ino) }
    }
    /// A new name: made, or, for a resent request already applied, the answer it got.
    private func creating(parent: InodeNumber, name: FileName, request: RequestContext?,
                          _ make: (FileSystemCore) throws(Errno) -> Attributes) throws(Errno) -> Attributes {
        try exclusive { c throws(Errno) in
            if case .attributes(let a)? = c.keeping?.answer(for: request) { return a }
            let a = try make(c)
            record(c, request, .attributes(a)) { change in
                change.parent(parent)
                change.inode(a.ino)
                // The entry just made is the directory's newest: no second lookup of the name.
                if let newest = c.inodes[parent]?.directory?.newest, newest.ino == a.ino, newest.name == name {
                    change.entry(parent, name, now: (newest.ino, newest.cookie))
                } else {
                    change.entry(parent, name)
                }
            }
            return a
        }
    }
    public func mknod(parent: InodeNumber, name: FileName, mode: FileMode, rdev: UInt64, caller: Caller,
                      request: RequestContext? = nil) throws(Errno) -> Attributes {
        try creating(parent: parent, name: name, request: request) { c throws(Errno) in
            try c.create(parent: parent, name: name, mode: mode, rdev: rdev, target: nil, caller: caller)
        }
    }
    public func mkdir(parent: InodeNumber, name: FileName, mode: FileMode, caller: Caller,
                      request: RequestContext? = nil) throws(Errno) -> Attributes {
        try creating(parent: parent, name: name, request: request) { c throws(Errno) in
            try c.mkdir(parent: parent, name: name, mode: mode, caller: caller)
        }
    }
    public func symlink(target: [UInt8], parent: InodeNumber, name: FileName, caller: Caller,
                        request: RequestContext? = nil) throws(Errno) -> Attributes {
        try creating(parent: parent, name: name, request: request) { c throws(Errno) in
            try c.symlink(target: target, parent: parent, name: name, caller: caller)
        }
    }
    public func link(_ ino: InodeNumber, newParent: InodeNumber, newName: FileName,
                     request: RequestContext? = nil) throws(Errno) -> Attributes {
        try creating(parent: newParent, name: newName, request: request) { c throws(Errno) in
            try c.link(ino, newParent: newParent, newName: newName)
        }
    }
    public func unlink(parent: InodeNumber, name: FileName, request: RequestContext? = nil) throws(Errno) {
        try removing(parent: parent, name: name, directory: false, request: request)
    }
    public func rmdir(parent: InodeNumber, name: FileName, request: RequestContext? = nil) throws(Errno) {
        try removing(parent: parent, name: name, directory: true, request: request)
    }
    private func removing(parent: InodeNumber, name: FileName, directory: Bool, request: RequestContext?) throws(Errno) {
        try exclusive { c throws(Errno) in
            if c.keeping?.answer(for: request) != nil { return }
            let victim = try c.remove(parent: parent, name: name, directory: directory)
            record(c, request, .done) { $0.parent(parent); $0.inode(victim); $0.entry(parent, name, now: (0, 0)) }
        }
    }
    public func rename(parent: InodeNumber, name: FileName, newParent: InodeNumber, newName: FileName, flags: RenameFlags,
                       request: RequestContext? = nil) throws(Errno) {
        try exclusive { c throws(Errno) in
            if c.keeping?.answer(for: request) != nil { return }
            guard c.keeping != nil else {
                return try c.rename(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags)
            }
            let moving = c.inodes[parent]?.directory?.lookup(name)
            let existing = c.inodes[newParent]?.directory?.lookup(newName)
            let targetBefore = moving.flatMap { c.inodes[$0]?.chargeTarget }
            try c.rename(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags)
            record(c, request, .done) { change in
                // A moved directory's own record carries its new parent; the two parents change
                // only their link counts and times.
                change.parent(parent)
                change.parent(newParent)
                change.inode(moving)
                change.inode(existing)
                change.entry(parent, name)
                change.entry(newParent, newName)
                // Into another target: every file below moved its pages (FileSystemCore+Targets).
                if let moving, targetBefore != c.inodes[moving]?.chargeTarget { c.subtree(of: moving).forEach { change.inode($0) } }
            }
        }
    }
    /// Opens an existing inode; handles O_TRUNC (the kernel passes it with atomic_o_trunc), and
    /// says whether truncating cleared setuid/setgid (the kernel's cached mode is then stale).
    /// `passthrough` is the file the kernel may read for this open itself (FUSE passthrough; see
    /// FileSystemCore+Backing for when): give it to the kernel, then call
    /// `release(_:passthrough: true)` at the close, or `passthroughRefused` if the kernel would
    /// not take it.
    public func open(_ ino: InodeNumber, flags: OpenFlags, caller: Caller, clearSetIDAsked: Bool,
                     request: RequestContext? = nil) throws(Errno) -> OpenOutcome {
        let enabled = passthroughEnabled
        let cgroup = callerCgroup?(caller.pid)
        let (modeChanged, step, target) = try exclusive { c throws(Errno) -> (Bool, FileSystemCore.PassthroughStep, Int) in
            if case .opened(let modeChanged)? = c.keeping?.answer(for: request) {
                return (modeChanged, FileSystemCore.PassthroughStep.none, 0)
            }
            let modeChanged = try c.open(ino, flags: flags, caller: caller, clearSetIDAsked: clearSetIDAsked)
            if let cgroup, let inode = c.inodes[ino] { c.noteUser(inode, cgroup: cgroup) }
            let step = c.passthroughStep(ino, flags: flags, enabled: enabled)
            record(c, request, .opened(modeChanged: modeChanged)) { $0.inode(ino) }
            return (modeChanged, step, c.inodes[ino]?.chargeTarget ?? 0)
        }
        switch step {
        case .none:
            return OpenOutcome(modeChanged: modeChanged, passthrough: nil, writes: flags.mayWrite)
        case .granted(let file):
            return OpenOutcome(modeChanged: modeChanged, passthrough: PassthroughFile(backing: file), writes: flags.mayWrite)
        case .needsBacking(let runs):
            return OpenOutcome(modeChanged: modeChanged,
                               passthrough: makeBacking(ino, runs: runs, target: target, forOpen: true).map(PassthroughFile.init),
                               writes: false)
        }
    }

    /// Makes and charges a backing file for the pages of `runs` with no lock held (a frozen
    /// target stalls only this open or change), by the charger of `target` (the file's), then
    /// moves the file's data into it. nil (an ordinary open; the file stays in the arena) when
    /// anything is short, or the file moved to another target meanwhile.
    @discardableResult
    private func makeBacking(_ ino: InodeNumber, runs: [Range<Int>], target: Int = 0, forOpen: Bool) -> BackingFile? {
        guard let maker = core.withReadLock({ $0.store.backingMaker(target: target) }),
              let file = try? PageStore.makeBackingFile(root: maker.root, charger: maker.charger, target: target, calls: maker.calls)
        else { return nil }
        let pages = runs.reduce(0) { $0 + $1.count }
        if pages > 0 {
            let pending = PendingCharge(runs: runs.map { PendingCharge.Run(first: $0.lowerBound, count: $0.count) }, wanted: pages,
                                        charger: maker.charger,
                                        file: PendingCharge.FileTarget(file: file, owner: ino.rawValue, shrinks: 0), target: target)
            let (charged, failure) = pending.charge()
            guard failure == nil, charged == pages else { return nil }  // dropping the file uncharges it
        }
        let step = core.withWriteLock { c in
            let step = c.adoptBacking(ino, file, charged: runs, forOpen: forOpen)
            record(c, nil, .done) { $0.inode(ino) }
            return step
        }
        if case .granted(let granted) = step { return granted }
        return nil
    }

    /// The kernel's backing id a passthrough open of `ino` names (registered by the Bridge),
    /// kept for a successor: the id belongs to the connection and outlives this server. Only
    /// with state kept (one check otherwise); recorded when it changes, at the first such open.
    public func notePassthroughID(_ ino: InodeNumber, _ id: Int32) {
        guard keeping != nil else { return }
        core.withWriteLock { c in
            guard let inode = c.inodes[ino], inode.passthroughOpens > 0, inode.passthroughID != id else { return }
            inode.passthroughID = id
            record(c, nil, .done) { $0.inode(ino) }
        }
    }

    /// The kernel's backing ids live passthrough opens name, by inode, with the number of such
    /// opens (what a successor's registry takes over; empty without kept state).
    public var passthroughRegistrations: [InodeNumber: (id: Int32, opens: UInt32)] {
        core.withReadLock { c in
            guard c.keeping != nil else { return [:] }
            var out: [InodeNumber: (id: Int32, opens: UInt32)] = [:]
            c.inodes.forEach { inode in if inode.passthroughID != 0 { out[inode.ino] = (inode.passthroughID, inode.passthroughOpens) } }
            return out
        }
    }

    /// The kernel would not serve an open through its backing file: it is an ordinary open.
    public func passthroughRefused(_ ino: InodeNumber) {
        core.withWriteLock { c in
            c.passthroughEnded(ino)
            record(c, nil, .done) { $0.inode(ino) }
        }
    }

    /// Whether opens may pass through: the kernel took FUSE passthrough at INIT and file data
    /// is not kept in FUSE's page cache (a cached open and a passthrough open of one inode
    /// exclude each other in the kernel: the second would fail with EIO).
    public var passthroughEnabled: Bool {
        kernelPassthrough.load(ordering: .relaxed) && caching == .direct
    }

    /// Set once, at INIT: whether the kernel took FUSE passthrough.
    public func noteKernelPassthrough(_ available: Bool) {
        kernelPassthrough.store(available, ordering: .relaxed)
    }
    /// Creates a regular file and opens it (create(2) with O_CREAT).
    public func create(parent: InodeNumber, name: FileName, mode: FileMode, caller: Caller,
                       request: RequestContext? = nil) throws(Errno) -> Attributes {
        let cgroup = callerCgroup?(caller.pid)
        return try creating(parent: parent, name: name, request: request) { c throws(Errno) in
            let attributes = try c.createAndOpen(parent: parent, name: name, mode: mode, caller: caller)
            if let cgroup, let inode = c.inodes[attributes.ino] { c.noteUser(inode, cgroup: cgroup) }
            return attributes
        }
    }
    /// The last close of one open (or create) handle; whether that was the file's last open
    /// (for a resent release already applied, what the first one answered).
    @discardableResult
    public func release(_ ino: InodeNumber, passthrough: Bool = false, request: RequestContext? = nil) -> Bool {
        core.withWriteLock { c in
            // A resend already applied says what the first answer said (the kept answer).
            if case .released(let last)? = c.keeping?.answer(for: request) { return last }
            if passthrough { c.passthroughEnded(ino) }
            let last = c.release(ino)
            record(c, request, .released(last: last)) { $0.inode(ino) }
            return last
        }
    }
    /// Reads into the caller's hands: `body` sees the bytes as iovecs pointing into the store
    /// (and a shared zero page for holes), while the lock is held, so no page can be freed or
    /// reused under it. An empty list means end of file.
    public func read(_ ino: InodeNumber, offset: Int64, count: Int, noatime: Bool,
                     _ body: (UnsafeBufferPointer<iovec>) -> Void) throws(Errno) {
        // relatime moves atime rarely (after a change, or daily): then the read runs under the
        // exclusive lock and atime moves before the reply, so a stat right after sees it.
        // A copy (a backing file's data) is answered after the lock is released.
        let step = try shared { (c: FileSystemCore) throws(Errno) -> CopiedRead?? in
            if !noatime && c.atimeIsStale(ino) { return .none }
            return .some(try c.read(ino, offset: offset, count: count, body))
        }
        let copy: CopiedRead?
        if let step {
            copy = step
        } else {
            copy = try exclusive { (c: FileSystemCore) throws(Errno) -> CopiedRead? in
                c.touchAtime(ino)
                record(c, nil, .done) { $0.inode(ino) }
                return try c.read(ino, offset: offset, count: count, body)
            }
        }
        copy?.send(body)
    }
    /// Writes. `clearSetIDAsked`: the kernel flagged the write (its caller lacks CAP_FSETID).
    /// `wholeOrNothing`: a writeback of mapped pages, which must store every byte or none (the
    /// kernel ignores a short count there; see `FileSystemCore.write`).
    public func write(_ ino: InodeNumber, offset: Int64, data: UnsafeRawBufferPointer, caller: Caller,
                      clearSetIDAsked: Bool, wholeOrNothing: Bool = false, request: RequestContext? = nil) throws(Errno) -> WriteResult {
        if keeping != nil, request?.isResend == true,
           case .written(let count, let modeChanged)? = core.withReadLock({ c in c.keeping?.answer(for: request) }) {
            return WriteResult(written: count, modeChanged: modeChanged)
        }
        // A write may drop security.capability: a file that had xattrs before it gets a whole
        // record (the write's narrow one leaves xattrs out, and the successor would keep the
        // capability). Set by the round that stores (an earlier round stores nothing).
        var hadXattrs = false
        let result = try charging(by: caller, commit: { c, result in
            record(c, request, .written(count: result.written, modeChanged: result.modeChanged)) { change in
                if hadXattrs { change.inode(ino) } else { change.data(ino) }
            }
        }) { c, supply throws(Errno) in
            if c.keeping != nil { hadXattrs = c.inodes[ino]?.xattrs != nil }
            return try c.write(ino, offset: offset, data: data, caller: caller, clearSetIDAsked: clearSetIDAsked,
                               wholeOrNothing: wholeOrNothing, supply: supply)
        }
        // Past the passthrough threshold: the file moves into a backing file now, while it is
        // small (about 1 MiB to copy), rather than at its first read-only open.
        if let runs = result.dueForBackingFile, passthroughEnabled {
            makeBacking(ino, runs: runs, forOpen: false)
        }
        return result
    }
    /// A fallocate that takes a small file past the threshold moves it first (what it holds),
    /// so that the allocation lands in the backing file and no open has to move it later.
    /// `caller`: under memcg=auto, whose shares the allocation is checked against (as a write's).
    public func fallocate(_ ino: InodeNumber, mode: FallocateMode, offset: Int64, length: Int64, caller: Caller? = nil,
                          request: RequestContext? = nil) throws(Errno) {
        if keeping != nil, request?.isResend == true, core.withReadLock({ c in c.keeping?.answer(for: request) }) != nil { return }
        if passthroughEnabled, !mode.contains(.punchHole), offset >= 0, length > 0, offset <= Int64.max - length,
           let runs = core.withReadLock({ c in c.dueForBackingFile(ino, allocatingTo: offset + length) }) {
            makeBacking(ino, runs: runs, forOpen: false)
        }
        try charging(by: caller, commit: { c, _ in record(c, request, .done) { $0.inode(ino) } }) { c, supply throws(Errno) in
            try c.fallocate(ino, mode: mode, offset: offset, length: length, supply: supply)
        }
    }

    /// Rounds of charging with no lock held before the last round, which holds the tree lock
    /// through its charge: only an operation whose need keeps growing between rounds (other
    /// writers took the reserve's pages, or its file changed meanwhile) gets that far.
    static let chargeRounds = 8

    /// Runs an operation that may need pages charged first (steps 1 to 3 of the charge path in
    /// this type's comment). The charge runs with no lock held:
    /// a target that is frozen (docker pause, cgroup.freeze) or slow stalls only the operations
    /// that need its new pages; stat, reads, deletes and writes into existing pages go on. The
    /// pages charged join the reserve and the operation runs again in the same lock hold.
    /// Between rounds other writers may take the reserve's pages, so an operation that never
    /// met a refusal can stay short round after round (fallocates of 1-8 MB by fsstress beside
    /// fsx: ENOSPC 4-16 times in 1,485, with no limit near). Its last round charges and runs in
    /// one hold of the tree lock, so that it is short only where the charger refused, as tmpfs
    /// is; a target frozen just then holds the whole mount until it thaws, where the other
    /// rounds hold only their own caller.
    /// `caller`: under memcg=auto, whose shares the charge is checked against first
    /// (`admitsShared`); a refusal stores what is already charged, as a charger's refusal does.
    /// `commit` records the change (kept state) in the same hold as the operation's last round.
    private func charging<T>(by caller: Caller? = nil, commit: (FileSystemCore, T) -> Void,
                             _ operation: (FileSystemCore, PageSupply) throws(Errno) -> NeedingPages<T>) throws(Errno) -> T {
        func run(_ c: FileSystemCore, _ supply: PageSupply) throws(Errno) -> NeedingPages<T> {
            let outcome = try operation(c, supply)
            if case .done(let result) = outcome { commit(c, result) }
            return outcome
        }
        /// Charges `pending`; `held`: the tree, when the caller holds its lock (the last round).
        /// A refusal of part of it (or a failure) means the run stores what fits.
        func charge(_ pending: PendingCharge, held: FileSystemCore? = nil) -> (charged: Int, failure: Errno?, supply: PageSupply) {
            let admitted = caller.map { admitsShared($0, bytes: Int64(pending.wanted * PageSize.bytes), held: held) } ?? true
            let (charged, failure): (Int, Errno?) = admitted ? pending.charge() : (0, nil)
            return (charged, failure, charged < pending.wanted || failure != nil ? .useWhatIsCharged : .askForMore)
        }
        /// Settles `pending` and runs again, all in the caller's hold of the tree lock. What the
        /// run does not take beyond one batch then goes back (other callers' charges may have
        /// landed in the reserve meanwhile), unless the caller runs again in the same hold.
        func settleAndRun(_ c: FileSystemCore, _ pending: PendingCharge, _ charged: Int, _ failure: Errno?,
                          _ supply: PageSupply, trim: Bool = true) throws(Errno) -> NeedingPages<T> {
            c.settle(pending, charged: charged)
            defer { if trim { c.store.trimReserveToLimit() } }
            if let failure, charged == 0 { throw failure }
            return try run(c, supply)
        }
        var outcome = try exclusive { c throws(Errno) in try run(c, .askForMore) }
        for _ in 1..<Self.chargeRounds {
            guard case .charge(let pending) = outcome else { break }
            let (charged, failure, supply) = charge(pending)
            outcome = try exclusive { c throws(Errno) in try settleAndRun(c, pending, charged, failure, supply) }
        }
        switch outcome {
        case .done(let result): return result
        case .charge(let pending):
            outcome = try exclusive { c throws(Errno) in
                defer { c.store.trimReserveToLimit() }
                let (charged, failure, supply) = charge(pending, held: c)
                let again = try settleAndRun(c, pending, charged, failure, supply, trim: false)
                guard case .charge(let more) = again else { return again }
                let (moreCharged, moreFailure, _) = charge(more, held: c)
                return try settleAndRun(c, more, moreCharged, moreFailure, .useWhatIsCharged, trim: false)
            }
        }
        if case .done(let result) = outcome { return result }
        throw .noSpace  // not reached: the last run never asks for a charge
    }
    /// memcg=auto: whether `bytes` more fit for `caller`'s cgroup X with its shares counted: at
    /// X and each ancestor up to the scope that carries shared bytes, usage + shared + bytes
    /// must stay within the limit less the margin. Costs nothing while X shares nothing; then
    /// a read of X's counters per charge (one per 256 KiB written at most).
    private func admitsShared(_ caller: Caller, bytes: Int64, held: FileSystemCore? = nil) -> Bool {
        guard let callerCgroup, let sharedLevels else { return true }
        let cgroup = callerCgroup(caller.pid)
        let shared = held.map { $0.sharedBytes(from: cgroup) } ?? core.withReadLock { c in c.sharedBytes(from: cgroup) }
        if shared.isEmpty { return true }
        for level in sharedLevels(cgroup) {
            guard let limit = level.limit, let carried = shared[level.cgroup] else { continue }
            if level.used + carried + bytes > limit - Self.sharedCheckMargin { return false }
        }
        return true
    }
    /// SEEK_DATA and SEEK_HOLE.
    public func seek(_ ino: InodeNumber, offset: Int64, whence: SeekWhence) throws(Errno) -> Int64 {
        try shared { c throws(Errno) in try c.seek(ino, offset: offset, whence: whence) }
    }
    /// Lists from `offset`; `body` returns false when its buffer is full (the entry it was given
    /// is then not counted). With `plus`, each listed entry but "." and ".." counts as a lookup.
    public func readdir(_ ino: InodeNumber, offset: Int64, plus: Bool, _ body: (DirectoryEntry) -> Bool) throws(Errno) {
        try exclusive { c throws(Errno) in
            let atime = c.keeping == nil || offset != 0 ? nil : c.inodes[ino]?.atime
            try c.readdir(ino, offset: offset, plus: plus, body)
            if let atime, c.inodes[ino]?.atime != atime { record(c, nil, .done) { $0.inode(ino) } }
        }
    }
    public func usage() -> FileSystemUsage {
        core.withReadLock { c in c.usage() }
    }
    public func setxattr(_ ino: InodeNumber, name: FileName, value: [UInt8], flags: XattrFlags, caller: Caller = .root,
                         request: RequestContext? = nil) throws(Errno) {
        try exclusive { c throws(Errno) in
            if c.keeping?.answer(for: request) != nil { return }
            try c.setxattr(ino, name: name, value: value, flags: flags, caller: caller)
            record(c, request, .done) { change in
                change.inode(ino)
                if name == Self.memcgXattr { c.subtree(of: ino).forEach { change.inode($0) } }
            }
        }
    }
    public func getxattr(_ ino: InodeNumber, name: FileName) throws(Errno) -> [UInt8] {
        if ino == Self.rootIno && name == Self.requestsXattr { return [] }
        let caching = caching, passthrough = passthroughEnabled
        return try shared { c throws(Errno) in try c.getxattr(ino, name: name, caching: caching, passthrough: passthrough) }
    }
    /// Names, each NUL-terminated, as listxattr returns them.
    public func listxattr(_ ino: InodeNumber) throws(Errno) -> [UInt8] {
        try shared { c throws(Errno) in try c.listxattr(ino) }
    }
    public func removexattr(_ ino: InodeNumber, name: FileName, caller: Caller = .root, request: RequestContext? = nil) throws(Errno) {
        try exclusive { c throws(Errno) in
            if c.keeping?.answer(for: request) != nil { return }
            try c.removexattr(ino, name: name, caller: caller)
            record(c, request, .done) { change in
                change.inode(ino)
                if name == Self.memcgXattr { c.subtree(of: ino).forEach { change.inode($0) } }
            }
        }
    }
    /// Bytes of data held by files, and bytes charged (data plus the store's reserve).
    public func storedBytes() -> (used: Int64, charged: Int64) {
        core.withReadLock { c in c.storedBytes() }
    }
    /// The pages files hold in charge target `index` (0: the mount's), and its cgroup ("" when
    /// it is the daemon's own, or was given back).
    public func chargeTarget(_ index: Int) -> (pagesInUse: Int, cgroup: String) {
        core.withReadLock { c in (c.store.pagesInUse(target: index), c.store.targetKey(index)) }
    }
    /// Frees everything (unmount): every page goes back to the store and is uncharged.
    public func destroy() {
        core.withWriteLock { c in c.destroy() }
    }
    /// Stops the charger (helper process, leaf cgroup), last thing before the daemon exits.
    public func stopCharging() {
        core.withWriteLock { c in c.store.shutdownCharger() }
    }
}
