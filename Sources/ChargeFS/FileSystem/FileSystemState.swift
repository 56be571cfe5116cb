import Glibc
import Synchronization
import SystemPackage

/// What one operation changed, named by the facade (`FileSystem`): the inodes it touched (each
/// recorded whole but for its page map, of which only the span changed since the last record
/// goes in) and the directory entries it touched (each recorded as it is now: an inode and its
/// cookie, or gone). Records are snapshots, not steps, so a successor applies the last one and
/// needs no rule per operation.
struct StateChange {
    var inodes: [InodeNumber] = []
    var entries: [(InodeNumber, FileName)] = []

    mutating func inode(_ ino: InodeNumber?) {
        if let ino, !inodes.contains(ino) { inodes.append(ino) }
    }

    mutating func entry(_ dir: InodeNumber, _ name: FileName) { entries.append((dir, name)) }
}

/// The state a mount keeps for a successor (docs/takeover.md): owned by the core, used under
/// the tree's lock (commits under the exclusive one, a checkpoint under the shared one, which
/// excludes commits). Present only when the mount asked for it: without it each operation pays
/// one nil check.
final class StateKeeping: @unchecked Sendable {
    let files: StateFiles
    let keeper: any DescriptorKeeper
    private let writer = StateWriter()
    /// Backing files no record names any more once the record being written is published.
    private var forgetAfterPublish: [UInt64] = []
    /// Ids of the backing files the keeper holds, by inode.
    var backingIDs: [InodeNumber: UInt64] = [:]
    var nextBackingID: UInt64 = 1
    /// The last answers, by the request's original unique (`appliedLimit` of them): a resend
    /// comes for a request in flight at the crash, so the last few suffice.
    private(set) var applied: [UInt64: AppliedRequest] = [:]
    private(set) var appliedOrder: [UInt64] = []
    static let appliedLimit = 1024
    /// A checkpoint is due once the journal holds this many bytes, or as many as the last
    /// checkpoint had if more: a checkpoint then costs at most as much writing as the journal it
    /// trims (at 1M files one is ~160 MiB and takes about a second).
    var checkpointBytes = 64 << 20
    private(set) var lastCheckpointBytes = 0
    let checkpointDue = Atomic(false)
    private let checkpointing = Atomic(false)
    /// Set when a record could not be written: the state no longer follows the tree, so no
    /// successor may take it over (the journal's header says so too; logged once).
    private(set) var failure: StateError?
    /// Checkpoints taken, and the last one's duration (tests, docs/takeover.md).
    private(set) var checkpoints = 0
    private(set) var lastCheckpointNanoseconds: UInt64 = 0

    /// Test hook: the next commit writes nothing and does nothing after (a server killed just
    /// before its publish; the test then drops the file system).
    var dropNextRecordForTest = false

    init(files: StateFiles, keeper: any DescriptorKeeper) {
        self.files = files
        self.keeper = keeper
    }

    func remember(_ unique: UInt64, _ answer: AppliedRequest) {
        if applied.updateValue(answer, forKey: unique) == nil {
            appliedOrder.append(unique)
            if appliedOrder.count > Self.appliedLimit * 2 {
                for old in appliedOrder.prefix(appliedOrder.count - Self.appliedLimit) { applied[old] = nil }
                appliedOrder.removeFirst(appliedOrder.count - Self.appliedLimit)
            }
        }
    }

    /// The answer a resent request already got, nil when it was not applied (serve it).
    func answer(for request: RequestContext?) -> AppliedRequest? {
        guard let request, request.isResend else { return nil }
        return applied[request.original]
    }

    /// Writes one transaction: `request`'s answer and the records of `change`, then publishes
    /// it. Called in the same hold of the exclusive lock as the change, so records follow the
    /// order of changes.
    func commit(_ core: FileSystemCore, _ request: RequestContext?, _ answer: AppliedRequest, _ change: StateChange) {
        guard failure == nil else { return }
        writer.reset()
        writer.u64(request?.original ?? 0)
        answer.write(to: writer)
        forgetAfterPublish.removeAll(keepingCapacity: true)
        do throws(StateError) {
            for ino in change.inodes {
                if let inode = core.inodes[ino] {
                    writer.u8(1)
                    try encode(inode, pages: inode.pages.takeChanged(), into: writer)
                } else {
                    writer.u8(2)
                    writer.u64(ino.rawValue)
                    if let id = backingIDs.removeValue(forKey: ino) { forgetAfterPublish.append(id) }
                }
            }
            for (dir, name) in change.entries {
                writer.u8(3)
                writer.u64(dir.rawValue)
                writer.blob(name)
                let entry = core.inodes[dir]?.directory?.entry(named: name)
                writer.u64(entry?.ino.rawValue ?? 0)
                writer.u64(entry?.cookie ?? 0)
            }
            if dropNextRecordForTest {
                dropNextRecordForTest = false
                return  // the server "died" before the publish: nothing after it runs either
            }
            try files.append(kind: 1, writer.bytes)
        } catch {
            fail(error)
            core.store.deferPunches = false
            core.store.punchDeferred()
            return
        }
        // The record no longer names the pages this change freed: they may go now.
        core.store.punchDeferred()
        // Only once the record no longer names them: a crash before leaves them kept.
        for id in forgetAfterPublish { keeper.forget(.backingFile(id)) }
        if let request { remember(request.original, answer) }
        if files.tail >= max(checkpointBytes, lastCheckpointBytes) { checkpointDue.store(true, ordering: .relaxed) }
    }

    private func fail(_ error: StateError) {
        failure = error
        Log.line("state for takeover no longer kept: \(error)")
    }

    /// One inode, whole but for its pages: `pages` is the span of its page map to record
    /// (nil: none; a takeover's checkpoint gives the whole map).
    func encode(_ inode: Inode, pages: Range<Int>?, into w: StateWriter) throws(StateError) {
        // The fixed fields in one step (112 bytes): the record's hot part.
        w.fixed(112) { f in
            f.put(inode.ino.rawValue)
            f.put(inode.generation); f.put(inode.mode); f.put(inode.uid); f.put(inode.gid); f.put(inode.nlink)
            f.put(inode.rdev); f.put(inode.size)
            f.put(Int64(inode.atime.tv_sec)); f.put(Int64(inode.atime.tv_nsec))
            f.put(Int64(inode.mtime.tv_sec)); f.put(Int64(inode.mtime.tv_nsec))
            f.put(Int64(inode.ctime.tv_sec)); f.put(Int64(inode.ctime.tv_nsec))
            f.put(inode.openCount); f.put(inode.passthroughOpens)
            f.put(Int64(inode.chargeTarget)); f.put(UInt8(inode.ownsTarget ? 1 : 0))
        }
        switch inode.payload {
        case .none: w.u8(0)
        case .directory(let d): w.u8(1); w.u64(d.parent.rawValue)
        case .symlink(let target): w.u8(2); w.blob(target)
        }
        if let xattrs = inode.xattrs {
            w.u32(UInt32(xattrs.count))
            for (name, value) in xattrs { w.blob(name); w.blob(value) }
        } else {
            w.u32(.max)
        }
        w.u64(try backingID(of: inode))
        guard let pages else { return w.u8(0) }
        w.u8(1)
        w.u64(UInt64(pages.lowerBound)); w.u64(UInt64(pages.upperBound))
        if pages.count <= 4 * PageMap.chunkSlots {
            // A small span (a write's pages): counted, then written, with no array between.
            var n: UInt32 = 0
            for i in pages where inode.pages.page(at: i) != 0 { n += 1 }
            w.u32(n)
            for i in pages {
                let p = inode.pages.page(at: i)
                if p != 0 { w.u64(UInt64(i)); w.u32(p) }
            }
            return
        }
        var held: [(Int, UInt32)] = []
        inode.pages.forEach { i, p in if pages.contains(i) { held.append((i, p)) } }
        w.u32(UInt32(held.count))
        for (i, p) in held { w.u64(UInt64(i)); w.u32(p) }
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
            let snapshot = try snapshot(core)
            defer { withExtendedLifetime(snapshot) {} }  // its bytes are read through a pointer
            try files.checkpoint(snapshot.bytes)
            lastCheckpointBytes = snapshot.count
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
    func snapshot(_ core: FileSystemCore) throws(StateError) -> StateWriter {
        let w = StateWriter(capacity: max(4096, core.inodes.count * 160))
        w.u64(StateFiles.version)
        w.u64(UInt64(core.inodes.slotCount))
        let free = core.inodes.freeList
        w.u64(UInt64(free.count))
        for f in free { w.u64(f.ino.rawValue); w.u32(f.generation) }
        w.u64(nextBackingID)
        w.u64(UInt64(core.inodes.count))
        for inode in core.inodes.all {
            // The whole map; its changed span stays (the next record repeats part of it: harmless,
            // and nothing here may change the tree under the shared lock).
            try encode(inode, pages: 0..<(Int.max >> 1), into: w)
            if let d = inode.directory {
                w.u64(d.cookieCounter)
                let entries = d.liveEntries
                w.u64(UInt64(entries.count))
                for e in entries { w.blob(e.name); w.u64(e.ino.rawValue); w.u64(e.cookie) }
            }
        }
        w.u64(UInt64(appliedOrder.count))
        for unique in appliedOrder {
            w.u64(unique)
            (applied[unique] ?? .done).write(to: w)
        }
        return w
    }
}

/// Rebuilds the tree from a checkpoint and the transactions after it (a takeover).
struct TreeRestorer {
    var inodes = InodeTable()
    var applied: [(UInt64, AppliedRequest)] = []
    var nextBackingID: UInt64 = 1
    var backingIDs: [InodeNumber: UInt64] = [:]
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

    private mutating func applyCheckpoint(_ raw: UnsafeRawBufferPointer) throws(StateError) {
        var r = StateReader(raw)
        let version = try r.u64()
        guard version == StateFiles.version else { throw StateError.version(version) }
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
    }

    mutating func apply(_ payload: UnsafeRawBufferPointer) throws(StateError) {
        var r = StateReader(payload)
        let unique = try r.u64()
        let answer = try AppliedRequest.read(from: &r)
        if unique != 0 { applied.append((unique, answer)) }
        while !r.atEnd {
            switch try r.u8() {
            case 1: _ = try upsert(&r)
            case 2:
                let ino = InodeNumber(rawValue: try r.u64())
                inodes.remove(ino)
                backingIDs[ino] = nil
            case 3:
                let dir = InodeNumber(rawValue: try r.u64())
                let name = try r.blob(max: FileSystem.nameMax)
                let ino = try r.u64(), cookie = try r.u64()
                guard let d = inodes[dir]?.directory else { throw StateError.corrupt("an entry in \(dir), not a directory") }
                if ino == 0 { d.remove(name) } else { d.restore(name, ino: InodeNumber(rawValue: ino), cookie: cookie) }
            case let tag: throw StateError.corrupt("record kind \(tag)")
            }
        }
    }

    /// Reads one inode record and applies it (made, or updated in place).
    private mutating func upsert(_ r: inout StateReader) throws(StateError) -> Inode {
        let ino = InodeNumber(rawValue: try r.u64())
        guard ino.rawValue > 0, ino.rawValue < 1 << 40 else { throw StateError.corrupt("inode number \(ino)") }
        let generation = try r.u32(), mode = try r.u32(), uid = try r.u32(), gid = try r.u32(), nlink = try r.u32()
        let rdev = try r.u64(), size = try r.i64()
        var times: [timespec] = []
        for _ in 0..<3 { times.append(timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))) }
        let inode: Inode
        if let existing = inodes[ino] {
            inode = existing
            inode.mode = mode; inode.uid = uid; inode.gid = gid
        } else {
            inode = Inode(ino: ino, mode: mode, uid: uid, gid: gid, now: times[0])
            inodes.restore(inode)
        }
        inode.generation = generation
        inode.nlink = nlink
        inode.rdev = rdev
        inode.size = size
        inode.atime = times[0]; inode.mtime = times[1]; inode.ctime = times[2]
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
        let backingID = try r.u64()
        if backingID == 0 {
            inode.backing = nil
            backingIDs[ino] = nil
        } else if inode.backing?.stateID != backingID {
            inode.backing = try backing(backingID)
            backingIDs[ino] = backingID
        }
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
        return inode
    }

    private mutating func backing(_ id: UInt64) throws(StateError) -> BackingFile {
        if let found = backings[id] { return found }
        guard let kept = keeper.descriptor(.backingFile(id)) else {
            throw StateError.corrupt("backing file \(id) is not held by the keeper")
        }
        let fd = fcntl(kept.rawValue, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else { throw StateError.system("dup", errno) }
        let file = BackingFile(FileDescriptor(rawValue: fd))
        file.syscalls = backingCalls
        file.stateID = id
        backings[id] = file
        return file
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
