import Glibc
import Synchronization
import SystemPackage

/// What one operation changed, named by the facade (`FileSystem`): the inodes it touched (each
/// recorded whole but for its page map, of which only the span changed since the last record
/// goes in), the directories whose entries it changed (only their link count and times: a name
/// made or removed changes nothing else of its directory), and the directory entries it touched
/// (each recorded as it is now: an inode and its cookie, or gone). Records are snapshots, not
/// steps, so a successor applies the last one and needs no rule per operation.
/// Up to four inodes, two directories and two entries are held inline (no allocation per
/// operation); more (a subtree's inodes) go into arrays.
struct StateChange {
    private var i0: InodeNumber = 0, i1: InodeNumber = 0, i2: InodeNumber = 0, i3: InodeNumber = 0
    private var inodeCount = 0
    private var moreInodes: [InodeNumber] = []
    private var p0: InodeNumber = 0, p1: InodeNumber = 0
    private var parentCount = 0
    /// A file only written to (its data, size, times, mode), when no whole record names it.
    private var written: InodeNumber = 0

    /// An entry as it is after the change, when the operation knows it (no lookup needed).
    struct Entry {
        let dir: InodeNumber
        let name: FileName
        let now: (ino: InodeNumber, cookie: UInt64)?
    }
    private var e0: Entry?, e1: Entry?
    private var moreEntries: [Entry] = []

    func holds(_ ino: InodeNumber) -> Bool {
        switch inodeCount {
        case 0: return false
        case 1: return i0 == ino
        case 2: return i0 == ino || i1 == ino
        case 3: return i0 == ino || i1 == ino || i2 == ino
        default: return i0 == ino || i1 == ino || i2 == ino || i3 == ino || moreInodes.contains(ino)
        }
    }

    mutating func inode(_ ino: InodeNumber?) {
        guard let ino, !holds(ino) else { return }
        switch inodeCount {
        case 0: i0 = ino
        case 1: i1 = ino
        case 2: i2 = ino
        case 3: i3 = ino
        default: moreInodes.append(ino)
        }
        inodeCount += 1
    }

    /// A directory a name was made in or removed from (recorded whole if also named by `inode`).
    mutating func parent(_ ino: InodeNumber) {
        if parentCount == 1 && p0 == ino { return }
        if parentCount == 0 { p0 = ino } else if parentCount == 1 { p1 = ino } else { return inode(ino) }
        parentCount += 1
    }

    /// A file whose data was written: recorded by what a write changes (`StateKeeping.encodeData`).
    mutating func data(_ ino: InodeNumber) { written = ino }

    var dataOnly: InodeNumber? { written == 0 || holds(written) ? nil : written }

    mutating func entry(_ dir: InodeNumber, _ name: FileName, now: (ino: InodeNumber, cookie: UInt64)? = nil) {
        let entry = Entry(dir: dir, name: name, now: now)
        if e0 == nil { e0 = entry } else if e1 == nil { e1 = entry } else { moreEntries.append(entry) }
    }

    func forEachInode<E: Error>(_ body: (InodeNumber) throws(E) -> Void) throws(E) {
        if inodeCount > 0 { try body(i0) }
        if inodeCount > 1 { try body(i1) }
        if inodeCount > 2 { try body(i2) }
        if inodeCount > 3 { try body(i3) }
        for ino in moreInodes { try body(ino) }
    }

    /// Directories recorded by their times and link count alone (not those recorded whole).
    func forEachParent(_ body: (InodeNumber) -> Void) {
        if parentCount > 0, !holds(p0) { body(p0) }
        if parentCount > 1, !holds(p1) { body(p1) }
    }

    func forEachEntry(_ body: (Entry) -> Void) {
        if let e0 { body(e0) }
        if let e1 { body(e1) }
        for e in moreEntries { body(e) }
    }
}

/// The state a mount keeps for a successor (docs/takeover.md): owned by the core, used under
/// the tree's lock (commits under the exclusive one, a checkpoint under the shared one, which
/// excludes commits). Present only when the mount asked for it: without it each operation pays
/// one nil check.
/// Its mutable properties are marked `@exclusivity(unchecked)`: each is used only under the
/// tree's lock, and the dynamic check on every access was measurable on each commit.
final class StateKeeping: @unchecked Sendable {
    let files: StateFiles
    let keeper: any DescriptorKeeper
    private let writer = StateWriter()
    /// Backing files no record names any more once the record being written is published.
    @exclusivity(unchecked) private var forgetAfterPublish: [UInt64] = []
    /// Ids of the backing files the keeper holds, by inode.
    @exclusivity(unchecked) var backingIDs: [InodeNumber: UInt64] = [:]
    @exclusivity(unchecked) var nextBackingID: UInt64 = 1
    /// The last answers (`appliedLimit` of them), by the request's original unique, in a ring:
    /// a resend comes for a request in flight at the crash, so the last few suffice. Keeping one
    /// is two stores (every change pays it); finding one is a scan of the ring, which only a
    /// resent request (bit 63, after a takeover) pays.
    /// Allocated once (plain stores: no uniqueness or exclusivity check of an array property).
    private let appliedUniques: UnsafeMutablePointer<UInt64> = {
        let p = UnsafeMutablePointer<UInt64>.allocate(capacity: StateKeeping.appliedLimit)
        p.initialize(repeating: 0, count: StateKeeping.appliedLimit)
        return p
    }()
    private let appliedAnswers: UnsafeMutablePointer<AppliedRequest> = {
        let p = UnsafeMutablePointer<AppliedRequest>.allocate(capacity: StateKeeping.appliedLimit)
        p.initialize(repeating: .done, count: StateKeeping.appliedLimit)
        return p
    }()
    @exclusivity(unchecked) private var appliedNext = 0
    static let appliedLimit = 1024
    /// A checkpoint is due once the journal holds this many bytes, or as many as the last
    /// checkpoint had if more: a checkpoint then costs at most as much writing as the journal it
    /// trims (at 1M files one is ~160 MiB and takes about a second).
    @exclusivity(unchecked) var checkpointBytes = 64 << 20
    @exclusivity(unchecked) private(set) var lastCheckpointBytes = 0
    let checkpointDue = Atomic(false)
    private let checkpointing = Atomic(false)
    /// Set when a record could not be written: the state no longer follows the tree, so no
    /// successor may take it over (the journal's header says so too; logged once).
    @exclusivity(unchecked) private(set) var failure: StateError?
    /// Checkpoints taken, and the last one's duration (tests, docs/takeover.md).
    private(set) var checkpoints = 0
    private(set) var lastCheckpointNanoseconds: UInt64 = 0
    /// The store's `targetsGeneration` the last published record or checkpoint holds the
    /// table of (-1: none yet).
    @exclusivity(unchecked) var recordedTargetsGeneration = -1

    /// Test hook: the next commit writes nothing and does nothing after (a server killed just
    /// before its publish; the test then drops the file system).
    @exclusivity(unchecked) var dropNextRecordForTest = false
    /// Test hook (MoveKillPoint): the server kills itself just before the next commit's publish
    /// (`.unpublished`) or just after it, before the punches it allows (`.published`).
    @exclusivity(unchecked) var killAtPublishForTest: MoveKillPoint?

    init(files: StateFiles, keeper: any DescriptorKeeper) {
        self.files = files
        self.keeper = keeper
    }

    deinit {
        appliedUniques.deallocate()
        appliedAnswers.deinitialize(count: Self.appliedLimit)
        appliedAnswers.deallocate()
    }

    func remember(_ unique: UInt64, _ answer: AppliedRequest) {
        guard unique != 0 else { return }
        appliedUniques[appliedNext] = unique
        appliedAnswers[appliedNext] = answer
        appliedNext = appliedNext + 1 == Self.appliedLimit ? 0 : appliedNext + 1
    }

    /// The kept answers, oldest first.
    func forEachApplied(_ body: (UInt64, AppliedRequest) -> Void) {
        for i in appliedNext..<Self.appliedLimit where appliedUniques[i] != 0 { body(appliedUniques[i], appliedAnswers[i]) }
        for i in 0..<appliedNext where appliedUniques[i] != 0 { body(appliedUniques[i], appliedAnswers[i]) }
    }

    /// The answer a resent request already got, nil when it was not applied (serve it).
    func answer(for request: RequestContext?) -> AppliedRequest? {
        guard let request, request.isResend else { return nil }
        // The newest first: a unique is kept once, but a scan from the newest is shortest for
        // the requests in flight at the crash.
        let unique = request.original
        var i = appliedNext
        for _ in 0..<Self.appliedLimit {
            i = i == 0 ? Self.appliedLimit - 1 : i - 1
            if appliedUniques[i] == unique { return appliedAnswers[i] }
        }
        return nil
    }

    /// Writes one transaction: `request`'s answer and the records of `change`, then publishes
    /// it. Called in the same hold of the exclusive lock as the change, so records follow the
    /// order of changes. The bytes go straight into the journal's mapping past its tail
    /// (unpublished, so ignored by a successor, until the tail's release store).
    func commit(_ core: FileSystemCore, _ request: RequestContext?, _ answer: AppliedRequest, _ change: StateChange) {
        guard failure == nil else { return }
        var e = files.beginTransaction()
        e.u64(request?.original ?? 0)
        if request == nil {
            e.u8(0)  // unique 0: no resend can ask for this answer
        } else if case .attributes(let a) = answer, change.holds(a.ino), core.inodes[a.ino]?.attributes == a {
            // The inode is recorded in this transaction: its attributes are the answer (a successor
            // takes them from the inode once the transaction is applied). 9 bytes, not 101.
            e.u8(5)
            e.u64(a.ino.rawValue)
        } else {
            answer.encode(into: &e)
        }
        if !forgetAfterPublish.isEmpty { forgetAfterPublish.removeAll(keepingCapacity: true) }
        // A target opened or given back (a directory's user.chargefs.memcg, memcg=auto's
        // hosts): the whole table, before the inodes that name its indexes.
        let targetsGeneration = core.store.targetsGeneration
        if targetsGeneration != recordedTargetsGeneration {
            e.u8(4)
            Self.writeTargets(core.store.targetKeys, into: &e)
        }
        do throws(StateError) {
            try change.forEachInode { (ino: InodeNumber) throws(StateError) in
                try encodeWhole(ino, core, into: &e)
            }
            if let ino = change.dataOnly {
                if let inode = core.inodes[ino], inode.xattrs == nil, inode.backing == nil {
                    encodeData(inode, into: &e)
                } else {
                    try encodeWhole(ino, core, into: &e)
                }
            }
            change.forEachParent { ino in
                guard let inode = core.inodes[ino] else {
                    e.u8(2)
                    e.u64(ino.rawValue)
                    return
                }
                let p = e.take(45)
                p.put(UInt8(5), at: 0)
                p.put(ino.rawValue, at: 1); p.put(inode.nlink, at: 9)
                p.put(Int64(inode.mtime.tv_sec), at: 13); p.put(Int64(inode.mtime.tv_nsec), at: 21)
                p.put(Int64(inode.ctime.tv_sec), at: 29); p.put(Int64(inode.ctime.tv_nsec), at: 37)
            }
            change.forEachEntry { entry in
                e.u8(3)
                e.u64(entry.dir.rawValue)
                e.blob(entry.name)
                let now = entry.now ?? core.inodes[entry.dir]?.directory?.entry(named: entry.name)
                let p = e.take(16)
                p.put(now?.ino.rawValue ?? 0, at: 0)
                p.put(now?.cookie ?? 0, at: 8)
            }
            if dropNextRecordForTest {
                dropNextRecordForTest = false
                return  // the server "died" before the publish: nothing after it runs either
            }
            if killAtPublishForTest == .unpublished { MoveKillPoint.killNow() }
            try files.commitTransaction(kind: 1, e)
            if killAtPublishForTest == .published { MoveKillPoint.killNow() }
        } catch {
            fail(error)
            core.store.deferPunches = false
            core.store.punchDeferred()
            return
        }
        recordedTargetsGeneration = targetsGeneration
        // The record no longer names the pages this change freed: they may go now.
        core.store.punchDeferred()
        // Only once the record no longer names them: a crash before leaves them kept.
        if !forgetAfterPublish.isEmpty { for id in forgetAfterPublish { keeper.forget(.backingFile(id)) } }
        if let request { remember(request.original, answer) }
        if files.tail >= max(checkpointBytes, lastCheckpointBytes) { checkpointDue.store(true, ordering: .relaxed) }
    }

    static func writeTargets(_ keys: [String?], into e: inout StateEncoder) {
        e.u32(UInt32(keys.count))
        for key in keys {
            if let key { e.u8(1); e.blob(Array(key.utf8)) } else { e.u8(0) }
        }
    }

    private func fail(_ error: StateError) {
        failure = error
        Log.line("state for takeover no longer kept: \(error)")
    }

    /// One inode, whole but for its pages: `pages` is the span of its page map to record
    /// (nil: none; a takeover's checkpoint gives the whole map).
    func encode(_ inode: Inode, pages: Range<Int>?, into e: inout StateEncoder) throws(StateError) {
        // The fixed fields in one step (109 bytes): the record's hot part.
        let p = e.take(109)
        p.put(inode.ino.rawValue, at: 0)
        p.put(inode.generation, at: 8); p.put(inode.mode, at: 12); p.put(inode.uid, at: 16); p.put(inode.gid, at: 20)
        p.put(inode.nlink, at: 24)
        p.put(inode.rdev, at: 28); p.put(inode.size, at: 36)
        p.put(Int64(inode.atime.tv_sec), at: 44); p.put(Int64(inode.atime.tv_nsec), at: 52)
        p.put(Int64(inode.mtime.tv_sec), at: 60); p.put(Int64(inode.mtime.tv_nsec), at: 68)
        p.put(Int64(inode.ctime.tv_sec), at: 76); p.put(Int64(inode.ctime.tv_nsec), at: 84)
        p.put(inode.openCount, at: 92); p.put(inode.passthroughOpens, at: 96)
        p.put(Int64(inode.chargeTarget), at: 100); p.put(UInt8(inode.ownsTarget ? 1 : 0), at: 108)
        switch inode.payload {
        case .none: e.u8(0)
        case .directory(let d): e.u8(1); e.u64(d.parent.rawValue)
        case .symlink(let target): e.u8(2); e.blob(target)
        }
        if let xattrs = inode.xattrs {
            e.u32(UInt32(xattrs.count))
            for (name, value) in xattrs { e.blob(name); e.blob(value) }
        } else {
            e.u32(.max)
        }
        // memcg=auto: the cgroups that use the file (its host is its target).
        e.u32(UInt32(inode.users.count))
        for user in inode.users { e.blob(Array(user.utf8)) }
        e.u32(UInt32(bitPattern: inode.passthroughID))
        e.u64(try backingID(of: inode))
        encodePages(inode, pages, into: &e)
    }

    /// The span `pages` of the inode's page map (nil: none): {1, from, to, count, (index, page)...}
    /// or {0}.
    private func encodePages(_ inode: Inode, _ pages: Range<Int>?, into e: inout StateEncoder) {
        guard let pages else { return e.u8(0) }
        e.u8(1)
        e.u64(UInt64(pages.lowerBound)); e.u64(UInt64(pages.upperBound))
        if pages.count <= 4 * PageMap.chunkSlots {
            // A small span (a write's pages): one pass, each page looked up once, written
            // straight after a count filled in at the end.
            let countAt = e.count
            e.u32(0)
            var n: UInt32 = 0
            for i in pages {
                let page = inode.pages.page(at: i)
                if page != 0 { e.u64(UInt64(i)); e.u32(page); n += 1 }
            }
            e.patch(n, at: countAt)
            return
        }
        // A large span (a checkpoint's whole map, a truncate's tail): the map's pages in it,
        // written as found (no array per inode), the count filled in after.
        let countAt = e.count
        e.u32(0)
        var n: UInt32 = 0
        if inode.pages.count > 0 {
            inode.pages.forEach { i, page in
                if pages.contains(i) { e.u64(UInt64(i)); e.u32(page); n += 1 }
            }
        }
        e.patch(n, at: countAt)
    }

    /// A write's record (kind 6): what a write changes beside the data, its mode (setuid and
    /// setgid cleared), size and times, and the span of its page map. Only for a file that had
    /// no xattrs before the write (a write may drop security.capability: `FileSystem.write`
    /// names such a file whole) and has no backing file: others get a whole one.
    /// An inode's whole record (kind 1), or that it is gone (kind 2: its backing file, if any,
    /// is let go once the transaction is published).
    private func encodeWhole(_ ino: InodeNumber, _ core: FileSystemCore, into e: inout StateEncoder) throws(StateError) {
        if let inode = core.inodes[ino] {
            e.u8(1)
            try encode(inode, pages: inode.pages.takeChanged(), into: &e)
            // Its ahead range, if any (kind 7, version 4): a whole record with none after it
            // says there is none. A successor that did not know it never gave those pages back.
            if let backing = inode.backing, backing.aheadEnd > 0 {
                files.raiseVersion()
                e.u8(7)
                e.u64(ino.rawValue)
                e.u64(UInt64(backing.aheadEnd))
            }
        } else {
            e.u8(2)
            e.u64(ino.rawValue)
            if !backingIDs.isEmpty, let id = backingIDs.removeValue(forKey: ino) { forgetAfterPublish.append(id) }
        }
    }

    private func encodeData(_ inode: Inode, into e: inout StateEncoder) {
        let p = e.take(45)
        p.put(UInt8(6), at: 0)
        p.put(inode.ino.rawValue, at: 1); p.put(inode.mode, at: 9); p.put(inode.size, at: 13)
        p.put(Int64(inode.mtime.tv_sec), at: 21); p.put(Int64(inode.mtime.tv_nsec), at: 29)
        p.put(Int64(inode.ctime.tv_sec), at: 37)
        e.i64(Int64(inode.ctime.tv_nsec))
        encodePages(inode, inode.pages.takeChanged(), into: &e)
    }

    /// The keeper's id of the inode's backing file (0: none), handing a new one to the keeper.
    private func backingID(of inode: Inode) throws(StateError) -> UInt64 {
        guard let backing = inode.backing else {
            // The file left its backing file (dropped): the keeper's copy goes after the publish.
            if !backingIDs.isEmpty, let id = backingIDs.removeValue(forKey: inode.ino) { forgetAfterPublish.append(id) }
            return 0
        }
        if backing.stateID == 0 {
            let id = nextBackingID
            try keeper.keep(backing.fileDescriptor, as: .backingFile(id))
            nextBackingID += 1
            backing.stateID = id
        }
        if let old = backingIDs.updateValue(backing.stateID, forKey: inode.ino), old != backing.stateID {
            forgetAfterPublish.append(old)
        }
        return backing.stateID
    }

    /// Writes the whole tree as a checkpoint and restarts the journal, if one is due and no
    /// other thread is taking it. Under the shared lock: readers go on, changes wait.
    func checkpointIfDue(_ core: FileSystemCore) {
        guard checkpointDue.load(ordering: .relaxed),
              checkpointing.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else { return }
        defer { checkpointing.store(false, ordering: .releasing) }
        guard checkpointDue.load(ordering: .relaxed), failure == nil else { return }
        let start = timespec.now
        do throws(StateError) {
            forgetAfterPublish.removeAll(keepingCapacity: true)
            lastCheckpointBytes = try files.writeCheckpoint { (e: inout StateEncoder) throws(StateError) in
                try encodeSnapshot(core, into: &e)
            }
            for id in forgetAfterPublish { keeper.forget(.backingFile(id)) }
        } catch {
            fail(error)
            return
        }
        let end = timespec.now
        lastCheckpointNanoseconds = UInt64((end.tv_sec - start.tv_sec) * 1_000_000_000 + (end.tv_nsec - start.tv_nsec))
        checkpoints += 1
        checkpointDue.store(false, ordering: .relaxed)
    }

    /// Every inode (with its whole page map and a directory's entries), the table's free
    /// numbers, the backing file ids and the last answers.
    func encodeSnapshot(_ core: FileSystemCore, into e: inout StateEncoder) throws(StateError) {
        e.u64(StateFiles.version)
        e.u64(UInt64(core.inodes.slotCount))
        let free = core.inodes.freeList
        e.u64(UInt64(free.count))
        for f in free { e.u64(f.ino.rawValue); e.u32(f.generation) }
        e.u64(nextBackingID)
        e.u64(UInt64(core.inodes.count))
        // In place: no array of every inode or of a directory's entries is built first.
        try core.inodes.forEach { (inode: Inode) throws(StateError) in
            // The whole map; its changed span stays (the next record repeats part of it:
            // harmless, and nothing here may change the tree under the shared lock).
            try encode(inode, pages: 0..<(Int.max >> 1), into: &e)
            if let d = inode.directory {
                e.u64(d.cookieCounter)
                e.u64(UInt64(d.liveCount))
                d.forEach(from: 0) { entry in
                    e.blob(entry.name); e.u64(entry.ino.rawValue); e.u64(entry.cookie)
                    return true
                }
            }
        }
        var kept = 0
        forEachApplied { _, _ in kept += 1 }
        e.u64(UInt64(kept))
        forEachApplied { unique, answer in
            e.u64(unique)
            answer.encode(into: &e)
        }
        Self.writeTargets(core.store.targetKeys, into: &e)
        recordedTargetsGeneration = core.store.targetsGeneration
        // Version 4: the ahead ranges, {count, (inode, end)...}.
        let ahead = core.filesAhead.compactMap { ino -> (InodeNumber, Int)? in
            guard let end = core.inodes[ino]?.backing?.aheadEnd, end > 0 else { return nil }
            return (ino, end)
        }
        e.u64(UInt64(ahead.count))
        for (ino, end) in ahead { e.u64(ino.rawValue); e.u64(UInt64(end)) }
    }
}

/// Rebuilds the tree from a checkpoint and the transactions after it (a takeover).
struct TreeRestorer {
    var inodes = InodeTable()
    var applied: [(UInt64, AppliedRequest)] = []
    var nextBackingID: UInt64 = 1
    var backingIDs: [InodeNumber: UInt64] = [:]
    /// Each charge target's cgroup by index, as last recorded ([""]: the mount's alone).
    var targetKeys: [String?] = [""]
    /// Backing files' ahead ranges by inode (`BackingFile.aheadEnd`), set on them by
    /// `resolveBackings`; none in a version-3 state.
    var aheadEnds: [InodeNumber: Int] = [:]
    /// The inodes recorded by the last transactions that removed a name (unlink, rmdir, rename),
    /// oldest first, about the last `recentRemovalLimit`: a request in flight at the crash is one
    /// of the last (`FileSystem.attributesToRefresh` says why they matter).
    private(set) var recentRemovals: [InodeNumber] = []
    static let recentRemovalLimit = 1024
    /// The inodes the transaction being applied records (kept between transactions: no
    /// allocation per transaction).
    private var touched: [InodeNumber] = []
    let keeper: any DescriptorKeeper
    /// Backing files opened so far, by id (one object per file, shared by its inode).
    private var backings: [UInt64: BackingFile] = [:]
    let backingCalls: PageFileCalls

    init(keeper: any DescriptorKeeper, backingCalls: PageFileCalls) {
        self.keeper = keeper
        self.backingCalls = backingCalls
    }

    mutating func applyCheckpoint(_ bytes: [UInt8]) throws(StateError) {
        let outcome: Result<Void, StateError> = bytes.withUnsafeBytes { raw in
            do throws(StateError) {
                try applyCheckpoint(raw)
                return .success(())
            } catch {
                return .failure(error)
            }
        }
        try outcome.get()
    }

    mutating func applyCheckpoint(_ raw: UnsafeRawBufferPointer) throws(StateError) {
        var r = StateReader(raw)
        let version = try r.u64()
        guard StateFiles.readableVersions.contains(version) else { throw StateError.version(version) }
        let slots = try r.u64()
        guard slots < 1 << 40 else { throw StateError.corrupt("an inode table of \(slots) slots") }
        inodes.reserveSlots(Int(slots))
        let freeCount = try r.u64()
        guard freeCount <= slots else { throw StateError.corrupt("\(freeCount) free numbers in \(slots) slots") }
        var free: [(ino: InodeNumber, generation: UInt32)] = []
        for _ in 0..<freeCount { free.append((InodeNumber(rawValue: try r.u64()), try r.u32())) }
        inodes.freeList = free
        nextBackingID = try r.u64()
        let count = try r.u64()
        guard count <= slots else { throw StateError.corrupt("\(count) inodes in \(slots) slots") }
        for _ in 0..<count {
            let inode = try upsert(&r)
            if let d = inode.directory {
                let cookies = try r.u64()
                let n = try r.u64()
                for _ in 0..<n {
                    let name = try r.blob(max: FileSystem.nameMax)
                    d.restore(name, ino: InodeNumber(rawValue: try r.u64()), cookie: try r.u64())
                }
                d.cookieCounter = cookies
            }
        }
        let answers = try r.u64()
        for _ in 0..<answers { applied.append((try r.u64(), try AppliedRequest.read(from: &r))) }
        targetKeys = try Self.readTargets(&r)
        if version >= 4 {
            let count = try r.u64()
            guard count <= slots else { throw StateError.corrupt("\(count) ahead ranges in \(slots) slots") }
            for _ in 0..<count { try readAhead(&r) }
        }
    }

    /// An ahead range: {inode, end}, of an inode already there.
    private mutating func readAhead(_ r: inout StateReader) throws(StateError) {
        let ino = InodeNumber(rawValue: try r.u64())
        let end = try r.u64()
        guard inodes[ino] != nil, end <= UInt64(Int.max >> 1) else { throw StateError.corrupt("ahead range \(end) of inode \(ino)") }
        aheadEnds[ino] = end == 0 ? nil : Int(end)
    }

    static func readTargets(_ r: inout StateReader) throws(StateError) -> [String?] {
        let count = try r.u32()
        guard count >= 1, count < 1 << 20 else { throw StateError.corrupt("\(count) charge targets") }
        var keys: [String?] = []
        for _ in 0..<count {
            keys.append(try r.u8() == 0 ? nil : String(decoding: try r.blob(max: 4096), as: UTF8.self))
        }
        return keys
    }

    mutating func apply(_ payload: UnsafeRawBufferPointer) throws(StateError) {
        var r = StateReader(payload)
        let unique = try r.u64()
        // Answer kind 5: the attributes of an inode this transaction records, as applied.
        var answerOf: InodeNumber? = nil
        var answer = AppliedRequest.done
        var probe = r
        if try probe.u8() == 5 {
            answerOf = InodeNumber(rawValue: try probe.u64())
            r = probe
        } else {
            answer = try AppliedRequest.read(from: &r)
        }
        touched.removeAll(keepingCapacity: true)
        var removedName = false
        while !r.atEnd {
            switch try r.u8() {
            case 1: touched.append(try upsert(&r).ino)
            case 2:
                let ino = InodeNumber(rawValue: try r.u64())
                inodes.remove(ino)
                backingIDs[ino] = nil
                if !aheadEnds.isEmpty { aheadEnds[ino] = nil }
            case 3:
                let dir = InodeNumber(rawValue: try r.u64())
                let name = try r.blob(max: FileSystem.nameMax)
                let ino = try r.u64(), cookie = try r.u64()
                guard let d = inodes[dir]?.directory else { throw StateError.corrupt("an entry in \(dir), not a directory") }
                if ino == 0 {
                    d.remove(name)
                    removedName = true
                } else {
                    d.restore(name, ino: InodeNumber(rawValue: ino), cookie: cookie)
                }
            case 4: targetKeys = try Self.readTargets(&r)
            case 7: try readAhead(&r)
            case 5:
                // A directory's link count and times (a name made or removed in it).
                let ino = InodeNumber(rawValue: try r.u64())
                let nlink = try r.u32()
                let mtime = timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))
                let ctime = timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))
                guard let inode = inodes[ino] else { throw StateError.corrupt("the times of inode \(ino), which is not there") }
                inode.nlink = nlink
                inode.mtime = mtime
                inode.ctime = ctime
            case 6:
                // A write: mode, size, times and the page span.
                let ino = InodeNumber(rawValue: try r.u64())
                let mode = try r.u32(), size = try r.i64()
                let mtime = timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))
                let ctime = timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))
                guard let inode = inodes[ino] else { throw StateError.corrupt("a write to inode \(ino), which is not there") }
                inode.mode = mode
                inode.size = size
                inode.mtime = mtime
                inode.ctime = ctime
                try Self.readPages(&r, into: inode)
            case let tag: throw StateError.corrupt("record kind \(tag)")
            }
        }
        if removedName, !touched.isEmpty {
            recentRemovals += touched
            if recentRemovals.count > 2 * Self.recentRemovalLimit {
                recentRemovals.removeFirst(recentRemovals.count - Self.recentRemovalLimit)
            }
        }
        if let answerOf {
            guard let inode = inodes[answerOf] else { throw StateError.corrupt("an answer naming inode \(answerOf), which is not there") }
            answer = .attributes(inode.attributes)
        }
        if unique != 0 { applied.append((unique, answer)) }
    }

    /// Reads one inode record and applies it (made, or updated in place).
    private mutating func upsert(_ r: inout StateReader) throws(StateError) -> Inode {
        let ino = InodeNumber(rawValue: try r.u64())
        guard ino.rawValue > 0, ino.rawValue < 1 << 40 else { throw StateError.corrupt("inode number \(ino)") }
        let generation = try r.u32(), mode = try r.u32(), uid = try r.u32(), gid = try r.u32(), nlink = try r.u32()
        let rdev = try r.u64(), size = try r.i64()
        // Three locals, not an array: no allocation per inode.
        let atime = timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))
        let mtime = timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))
        let ctime = timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))
        let inode: Inode
        if let existing = inodes[ino] {
            inode = existing
            inode.mode = mode; inode.uid = uid; inode.gid = gid
        } else {
            inode = Inode(ino: ino, mode: mode, uid: uid, gid: gid, now: atime)
            inodes.restore(inode)
        }
        // A whole record says the inode has no ahead range unless a kind 7 follows it.
        if !aheadEnds.isEmpty { aheadEnds[ino] = nil }
        inode.generation = generation
        inode.nlink = nlink
        inode.rdev = rdev
        inode.size = size
        inode.atime = atime; inode.mtime = mtime; inode.ctime = ctime
        inode.openCount = try r.u32()
        inode.passthroughOpens = try r.u32()
        let target = try r.i64()
        guard target >= 0, target < 1 << 20 else { throw StateError.corrupt("charge target \(target)") }
        inode.chargeTarget = Int(target)
        inode.ownsTarget = try r.u8() != 0
        switch try r.u8() {
        case 0: inode.payload = .none
        case 1:
            let parent = InodeNumber(rawValue: try r.u64())
            if let d = inode.directory { d.parent = parent } else { inode.payload = .directory(Directory(parent: parent)) }
        case 2: inode.payload = .symlink(try r.blob(max: 1 << 16))
        case let tag: throw StateError.corrupt("payload kind \(tag)")
        }
        let xattrCount = try r.u32()
        if xattrCount == .max {
            inode.xattrs = nil
        } else {
            var xattrs: [[UInt8]: [UInt8]] = [:]
            for _ in 0..<xattrCount { xattrs[try r.blob(max: 1 << 16)] = try r.blob(max: 1 << 17) }
            inode.xattrs = xattrs
        }
        let userCount = try r.u32()
        guard userCount < 1 << 16 else { throw StateError.corrupt("\(userCount) users of inode \(ino)") }
        var users: [String] = []
        for _ in 0..<userCount { users.append(String(decoding: try r.blob(max: 4096), as: UTF8.self)) }
        inode.users = users
        inode.passthroughID = Int32(bitPattern: try r.u32())
        let backingID = try r.u64()
        // The checkpoint's counter is older than the journal's records: an id a record names is
        // never handed out again (a reused one would replace a live file's copy in the keeper).
        if backingID >= nextBackingID { nextBackingID = backingID + 1 }
        if backingID == 0 {
            inode.backing = nil
            if !backingIDs.isEmpty { backingIDs[ino] = nil }
        } else if backingIDs[ino] != backingID {
            // Opened once the whole journal is applied (`resolveBackings`): a backing file
            // named here may have been freed by a later transaction, and the keeper then no
            // longer holds it.
            inode.backing = nil
            backingIDs[ino] = backingID
        }
        try Self.readPages(&r, into: inode)
        return inode
    }

    /// What `encodePages` wrote, applied to `inode`'s map.
    private static func readPages(_ r: inout StateReader, into inode: Inode) throws(StateError) {
        if try r.u8() == 1 {
            let lo = try r.u64(), hi = try r.u64()
            guard lo <= hi, hi <= UInt64(Int.max >> 1) else { throw StateError.corrupt("pages \(lo)..<\(hi)") }
            var dropped: [UInt32] = []
            inode.pages.remove(from: Int(lo), to: Int(hi), into: &dropped)
            let n = try r.u32()
            for _ in 0..<n {
                let index = try r.u64(), page = try r.u32()
                guard index >= lo, index < hi, page != 0 else { throw StateError.corrupt("page \(page) at \(index)") }
                inode.pages.set(page, at: Int(index))
            }
            _ = inode.pages.takeChanged()
        }
    }

    /// Gives every inode that is still there the backing file its last record named, from the
    /// keeper's copy (after the checkpoint and every transaction are applied).
    mutating func resolveBackings() throws(StateError) {
        for (ino, id) in backingIDs.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            guard let inode = inodes[ino] else { backingIDs[ino] = nil; continue }
            // Made by its inode's target's charger (a directory target's for a mapped file).
            let file = try backing(id, target: inode.chargeTarget)
            file.aheadEnd = aheadEnds[ino] ?? 0
            inode.backing = file
        }
    }

    private mutating func backing(_ id: UInt64, target: Int) throws(StateError) -> BackingFile {
        if let found = backings[id] { return found }
        guard let kept = keeper.descriptor(.backingFile(id)) else {
            throw StateError.corrupt("backing file \(id) is not held by the keeper")
        }
        let fd = fcntl(kept.rawValue, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else { throw StateError.system("dup", errno) }
        let file = BackingFile(FileDescriptor(rawValue: fd), target: target)
        file.syscalls = backingCalls
        file.stateID = id
        backings[id] = file
        return file
    }
}

/// When a server keeping state takes a checkpoint of its own, off the request path (a thread
/// samples the journal's tail a few times a second; nothing is added to a change): a successor
/// then reads a checkpoint and a short journal instead of replaying every change since the
/// mount. Without it the first server never took one before its journal reached 64 MiB (the
/// inline rule, `StateKeeping.checkpointBytes`), so the first takeover of a mount replayed its
/// whole history (10,000 files: 30,201 transactions, 48 ms of CPU against 29 from a checkpoint).
/// - quiet: the journal holds `quietBytes` or more since the last checkpoint and has not moved
///   for `quietSamples` samples (changes have stopped; nobody waits on the shared lock then).
/// - busy: it holds at least `busyBytes` and as much as the last checkpoint, with changes
///   going on: a successor's replay stays within about one checkpoint's worth (each checkpoint
///   costs as much writing as the journal it trims; changes wait for it, about 7-12 ms at
///   10,000 files, 0.27-0.29 s at 1M).
public struct IdleCheckpoints: Sendable {
    public var quietBytes = 256 << 10
    public var busyBytes = 4 << 20
    public var quietSamples = 2
    public var sampleNanoseconds = 200_000_000  // below 1 s
    private var lastTail = -1
    private var unchanged = 0

    public init() {}

    /// One sample of the journal: whether to take a checkpoint now.
    public mutating func due(tail: Int, lastCheckpointBytes: Int) -> Bool {
        unchanged = tail == lastTail ? unchanged + 1 : 0
        lastTail = tail
        let bytes = tail
        if bytes >= quietBytes && unchanged >= quietSamples { return true }
        return bytes >= max(busyBytes, lastCheckpointBytes)
    }
}

/// A takeover's findings, for the log and tests.
public struct TakeoverReport: Sendable, Equatable {
    /// The last transaction the checkpoint held (0: none).
    public let checkpointSeq: UInt64
    /// Transactions replayed after it.
    public let transactions: Int
    /// Bytes of a torn tail dropped (rolled back).
    public let droppedBytes: Int
    public let inodes: Int
    /// CLOCK_MONOTONIC µs at each step of the rebuild, for the successor's log line of phases:
    /// state read (checkpoint applied), journal applied, backing files resolved, page store
    /// made (the arena's pages mapped, the free ones punched), charge targets reopened.
    public var steps: [(name: String, at: UInt64)] = []

    public static func == (a: TakeoverReport, b: TakeoverReport) -> Bool {
        a.checkpointSeq == b.checkpointSeq && a.transactions == b.transactions && a.droppedBytes == b.droppedBytes
            && a.inodes == b.inodes
    }
}

extension FileSystemCore {
    /// Every inode below directory `top` (itself included), for records of a change that moved
    /// a whole subtree's pages.
    func subtree(of top: InodeNumber) -> [InodeNumber] {
        var out: [InodeNumber] = []
        var stack = [top]
        while let ino = stack.popLast() {
            out.append(ino)
            inodes[ino]?.directory?.forEach(from: 0) { entry in
                if inodes[entry.ino]?.isDirectory == true { stack.append(entry.ino) } else { out.append(entry.ino) }
                return true
            }
        }
        return out
    }
}
