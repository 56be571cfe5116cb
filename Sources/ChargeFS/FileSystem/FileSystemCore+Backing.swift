import Glibc
import SystemPackage

/// Large files with a backing file of their own (FUSE passthrough): when a file gets one, and
/// its data operations while it has one.
///
/// The rules (README, "Passthrough reads"):
/// - A regular file of at least `passthroughMinBytes`, opened read-only with no other open of it
///   left (the kernel refuses passthrough for an inode with a cached open, and any other open
///   could be a cached mapping), whose data has no hole, passes through; then so does every
///   open of it until the last such one closes. It gets a backing file once: it is made and
///   charged outside the lock (the target may be frozen), then the arena pages are copied in and
///   freed. Without room for the copy, or with no backing file to be had, the open is an
///   ordinary one: degrade, never fail.
/// - While passthrough opens exist, no hole appears below the file's size: a write past the end
///   charges the gap too, a truncate up charges the new pages, a punch zeroes instead of freeing.
///   A hole would let a reader's page fault allocate a page charged to the reader. A mapping
///   kept after its open closed (mmap, then close) maps the backing file still: a punch after
///   the last passthrough open closed frees pages, and that mapping's fault on the hole is
///   charged to the mapper, as on tmpfs (and as every fault of a cached FUSE mapping is).
/// - Writes always come through here: every page of a backing file is charged (to the target)
///   before a byte lands in it.
extension FileSystemCore {
    /// What an open can do about passthrough.
    enum PassthroughStep {
        case none
        /// The file qualifies but has no backing file yet: make one of `pages` pages.
        case needsBacking(runs: [Range<Int>])
        /// Counted as a passthrough open of this backing file.
        case granted(BackingFile)
    }

    /// Whether every page below the size exists. Asked at each read-only open of a large file:
    /// as many pages as the size needs and none past the end settles it without a walk (a look
    /// at each 2 MiB chunk); only pages past the end (KEEP_SIZE, an append's batch) need the walk.
    private func isDense(_ inode: Inode) -> Bool {
        let n = PageSize.covering(inode.size)
        let held = inode.pages.count
        if held < n { return false }
        if held == n && inode.pages.nextData(from: n) == nil { return true }
        return n == 0 || inode.pages.nextHole(from: 0, before: n) >= n
    }

    /// The runs of pages to charge for moving the file into a backing file now, when a change
    /// takes it from below the threshold to at least it (`reaching`: its size, or the end of an
    /// allocation): a fallocate (before it allocates), a truncate up (before mmap stores), or a
    /// write, in order or not. Holes stay holes, so the move copies at most what a file below the
    /// threshold holds (about 1 MiB), and no read-only open of it has to copy anything later.
    /// A write of `written` bytes that leaves holes moves the file only when it is at least a
    /// charge batch: each write into a backing file's hole is a charge round trip of its own,
    /// where the arena serves 64 small writes with one (fio's 4 KiB random writes stay there).
    func dueForBackingFile(_ inode: Inode, sizeBefore: Int64, reaching: Int64? = nil, written: Int? = nil) -> [Range<Int>]? {
        // Only the mount's own target's large files move at a change (a directory's target keeps
        // its files in the arena, but for those mapped or executed: FileSystemCore+Mapped).
        guard inode.isRegular, inode.backing == nil, inode.chargeTarget == 0, staysWithItsHost(inode), let min = config.passthroughMinBytes,
              sizeBefore < min,
              (reaching ?? inode.size) >= min, store.canMakeBackingFiles,
              // What a file below the threshold holds, plus the write that took it past (a file
              // with more, KEEP_SIZE pages past its end, moves at an open as before).
              inode.pages.count <= 2 * PageSize.covering(min) + PageStore.chargeBatch else { return nil }
        if let written, written < PageStore.chargeBatch * PageSize.bytes, !isDense(inode) { return nil }
        return heldRuns(inode)
    }

    /// The file's pages, as runs of indexes, those past its end (KEEP_SIZE allocations) too: a
    /// dense file's at a glance, others by a walk (only files that hold little get that far).
    private func heldRuns(_ inode: Inode) -> [Range<Int>] {
        let n = PageSize.covering(inode.size)
        if inode.pages.count == n, inode.pages.nextData(from: n) == nil { return n == 0 ? [] : [0..<n] }
        var runs: [Range<Int>] = []
        var next = inode.pages.nextData(from: 0)
        while let first = next {
            let end = inode.pages.nextHole(from: first)
            runs.append(first..<end)
            next = inode.pages.nextData(from: end)
        }
        return runs
    }

    /// `dueForBackingFile` for a fallocate about to run: before it allocates, so the allocation
    /// goes straight into the backing file (fio's and databases' preallocation).
    func dueForBackingFile(_ ino: InodeNumber, allocatingTo end: Int64) -> [Range<Int>]? {
        guard let inode = inodes[ino] else { return nil }
        return dueForBackingFile(inode, sizeBefore: inode.size, reaching: end)
    }

    /// Whether this open (already counted in `openCount`) goes through the backing file. Once
    /// an inode has passthrough opens the kernel takes no other kind (EINVAL, which the caller
    /// would see as EIO): every open of it passes through then, a writer's with direct I/O on
    /// top, which sends its reads and writes to the daemon still (FOPEN_DIRECT_IO overrides
    /// FOPEN_PASSTHROUGH for read and write; its mappings map the backing file, hole-free).
    func passthroughStep(_ ino: InodeNumber, flags: OpenFlags, enabled: Bool) -> PassthroughStep {
        guard let inode = inodes[ino], inode.isRegular else { return .none }
        if inode.passthroughOpens > 0, let backing = inode.backing {
            inode.passthroughOpens += 1
            return .granted(backing)
        }
        // A small file passes through too when the open looks like a map or an exec
        // (FileSystemCore+Mapped): its mappings then map the target's pages.
        guard enabled, let min = config.passthroughMinBytes, !flags.mayWrite, !flags.truncates,
              (inode.size >= min && inode.chargeTarget == 0 && staysWithItsHost(inode)) || wantsMappedPassthrough(inode, flags: flags),
              inode.openCount == 1,
              isDense(inode) else { return .none }
        if let backing = inode.backing {
            inode.passthroughOpens += 1
            return .granted(backing)
        }
        guard store.canMakeBackingFiles else { return .none }
        return .needsBacking(runs: heldRuns(inode))
    }

    /// Moves the file's data into `file` (made and charged for the pages of `charged`) and, with
    /// `forOpen`, counts the open that asked as a passthrough one; `.none` when the file changed
    /// meanwhile so that it no longer qualifies, or its pages are not those charged (the caller
    /// drops `file`, which gives its charge back).
    func adoptBacking(_ ino: InodeNumber, _ file: BackingFile, charged: [Range<Int>], forOpen: Bool) -> PassthroughStep {
        // The file must still be charged where its backing file was made (a move meanwhile).
        guard let inode = inodes[ino], inode.isRegular, inode.backing == nil, inode.chargeTarget == file.target,
              !forOpen || (inode.openCount == 1 && inode.passthroughOpens == 0 && isDense(inode)),
              heldRuns(inode) == charged else { return .none }
        let n = PageSize.covering(inode.size)
        // Copy in runs of consecutive arena pages: one pwrite each, none past the size (the
        // backing file never shrinks here: that would free its pages past the end).
        var index = inode.pages.nextData(from: 0) ?? n
        while index < n {
            let first = inode.pages.page(at: index)
            guard first != 0 else { index = inode.pages.nextData(from: index) ?? n; continue }
            var run = 1
            while index + run < n, inode.pages.page(at: index + run) == first &+ UInt32(run) { run += 1 }
            let offset = Int64(index) * Int64(PageSize.bytes)
            do throws(Errno) {
                try file.write(store.address(of: first), length: Int(min(Int64(run * PageSize.bytes), inode.size - offset)), at: offset)
            } catch {
                return .none
            }
            index += run
        }
        do throws(Errno) { try file.setSize(inode.size) } catch { return .none }
        // Pages past the end (KEEP_SIZE allocations) were charged in the backing file as zeros.
        var freed: [UInt32] = []
        freed.reserveCapacity(inode.pages.count)
        inode.pages.remove(from: 0, to: Int.max >> 1, into: &freed)
        store.activeTarget = inode.chargeTarget
        store.free(freed)
        var moved = 0
        for run in charged {
            for i in run { inode.pages.set(PageMap.inBackingFile, at: i) }
            moved += run.count
        }
        store.noteBackingPages(moved, of: file)
        inode.backing = file
        backingFiles += 1
        if forOpen { inode.passthroughOpens += 1 }
        return .granted(file)
    }

    /// Gives back the pages charged ahead of appends that the file did not grow into (at its
    /// last close, and before a change that would make them the file's where tmpfs would have
    /// holes or nothing: see `storeBacked`, `truncateBacked`, `allocateBacked`).
    func trimAhead(_ inode: Inode) {
        guard let backing = inode.backing, backing.aheadEnd > 0 else { return }
        giveBackAhead(inode, backing, from: PageSize.covering(inode.size), to: backing.aheadEnd)
        endAhead(inode, backing)
    }

    /// Punches the ahead pages of [from, to) out of the backing file (their memory and charge).
    /// A punch the kernel refuses leaves the pages where they are, past the end: they stay in
    /// the file's map (as a KEEP_SIZE allocation's would), so stored and charged bytes still
    /// count them, and the file may grow into them later.
    private func giveBackAhead(_ inode: Inode, _ backing: BackingFile, from: Int, to: Int) {
        guard to > from, (inode.pages.nextData(from: from) ?? Int.max) < to,
              backing.punch(offset: Int64(from) * Int64(PageSize.bytes), length: Int64(to - from) * Int64(PageSize.bytes)) else { return }
        var marks: [UInt32] = []
        inode.pages.remove(from: from, to: to, into: &marks)
        store.noteBackingPages(-marks.count, of: backing)
        backing.shrinks += 1
    }

    /// The file has no ahead range any more (pages left past its end, if any, are its own).
    func endAhead(_ inode: Inode, _ backing: BackingFile) {
        backing.aheadEnd = 0
        if !filesAhead.isEmpty { filesAhead.remove(inode.ino) }
    }

    /// Pages charged ahead that no file holds as its own, over every file with an ahead range:
    /// left out of statfs's used blocks, as st_blocks leaves them out (`Inode.pagesAhead`).
    var pagesAhead: Int {
        filesAhead.reduce(0) { $0 + (inodes[$1]?.pagesAhead ?? 0) }
    }

    /// A passthrough open closed, or the kernel refused to serve one (it is an ordinary open then).
    func passthroughEnded(_ ino: InodeNumber) {
        guard let inode = inodes[ino], inode.passthroughOpens > 0 else { return }
        inode.passthroughOpens -= 1
        // The registry closes the registration with the last of them.
        if inode.passthroughOpens == 0 {
            inode.passthroughID = 0
            // memcg=auto: a share's move that waited for this (FileSystemCore+Shares).
            if sharesCharges { settleHost(inode) }
        }
    }

    /// Frees a backing file with all its pages (the file's last close after its unlink).
    func dropBacking(of inode: Inode) {
        let held = inode.pages.count
        var marks: [UInt32] = []
        inode.pages.remove(from: 0, to: Int.max >> 1, into: &marks)
        if let backing = inode.backing { store.noteBackingPages(-held, of: backing) }
        inode.backing?.shrinks += 1
        if let backing = inode.backing { endAhead(inode, backing) }
        inode.backing = nil  // closed: its pages go now, or with the last mapping of it
        backingFiles -= 1
    }

    // MARK: - Data

    /// One buffer filled by pread: holes read as zeros without a page being allocated. A copy,
    /// so the caller answers with it after the tree's lock is released. The buffer is the
    /// thread's dump-excluded scratch (file data stays out of a core dump, and no allocation per
    /// read); the heap only when that cannot be mapped.
    func readBacked(_ backing: BackingFile, from offset: Int64, count: Int) throws(Errno) -> CopiedRead {
        let scratch = DumpExcluded.scratch(byteCount: count)
        let buffer = scratch ?? UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 16)
        do throws(Errno) {
            return CopiedRead(buffer: buffer, count: try backing.read(into: buffer, length: count, at: offset),
                              owned: scratch == nil)
        } catch {
            if scratch == nil { buffer.deallocate() }
            throw error
        }
    }

    /// Page indexes in [from, last] that are holes, as runs; ENOSPC when more of them than
    /// `limit` (checked before walking: a truncate up may span 2^40 pages).
    private func holeRuns(_ inode: Inode, from: Int, through last: Int, limit: Int) throws(Errno) -> [(first: Int, count: Int)] {
        var runs: [(first: Int, count: Int)] = []
        guard from <= last else { return runs }
        if (last - from + 1) - inode.pages.count > limit { throw .noSpace }
        var index = inode.pages.nextHole(from: from, before: last + 1)
        while index <= last {
            if let tail = runs.last, tail.first + tail.count == index {
                runs[runs.count - 1].count += 1
            } else {
                runs.append((index, 1))
            }
            index = inode.pages.nextHole(from: index + 1, before: last + 1)
        }
        return runs
    }

    /// Pages size= still allows.
    private var pagesAllowed: Int { maxPages.map { max(0, $0 - store.pagesInUse) } ?? Self.physicalPages }

    /// The leading `count` pages of `runs`.
    private func leading(_ runs: [(first: Int, count: Int)], _ count: Int) -> [(first: Int, count: Int)] {
        var left = count
        var out: [(first: Int, count: Int)] = []
        for run in runs where left > 0 {
            out.append((run.first, min(run.count, left)))
            left -= min(run.count, left)
        }
        return out
    }

    private func charge(_ inode: Inode, _ backing: BackingFile, _ runs: [(first: Int, count: Int)]) -> PendingCharge? {
        let missing = runs.reduce(0) { $0 + $1.count }
        guard missing > 0 else { return nil }
        return store.pendingCharge(of: backing, runs: runs, wanted: missing, owner: inode.ino.rawValue, shrinks: backing.shrinks,
                                   wholeOrNothing: true)
    }

    /// A write into a file with a backing file: its missing pages (and, with passthrough opens,
    /// the gap between the old end and the write) are charged first; then one pwrite. Near a
    /// limit the leading part that has pages is written, as in the arena.
    func storeBacked(_ source: UnsafeRawPointer, count: Int, in inode: Inode, _ backing: BackingFile, at offset: Int64,
                     wholeOrNothing: Bool, supply: PageSupply) throws(Errno) -> NeedingPages<Int> {
        let pageSize = Int64(PageSize.bytes)
        let end = offset + Int64(count)
        let firstIndex = Int(offset / pageSize)
        let lastIndex = Int((end - 1) / pageSize)
        let gapFrom = inode.passthroughOpens > 0 && offset > inode.size ? Int(inode.size / pageSize) : firstIndex
        // A write past the end that leaves a gap: ahead pages in the gap would end up below the
        // size, the file's own, where tmpfs has holes. They go back first (with passthrough
        // opens the gap is filled anyway: they serve as its pages).
        if backing.aheadEnd > 0, inode.passthroughOpens == 0 {
            let end = PageSize.covering(inode.size)
            if firstIndex > end { giveBackAhead(inode, backing, from: end, to: min(firstIndex, backing.aheadEnd)) }
            if firstIndex >= backing.aheadEnd { endAhead(inode, backing) }
        }
        let holes = try holeRuns(inode, from: gapFrom, through: lastIndex, limit: Int.max)
        let missing = holes.reduce(0) { $0 + $1.count }
        if wholeOrNothing && missing > pagesAllowed { throw .noSpace }
        if supply == .askForMore, missing > 0 {
            var runs = leading(holes, pagesAllowed)
            // An append charges a batch ahead (as the arena's reserve does), so that small
            // appends do not each cost a charge round trip; what the file has not grown into by
            // its last close is given back (`trimAhead`).
            // Not past pages of the file's own beyond its end (a KEEP_SIZE allocation before a
            // gap): the range runs from the end, so it would take them for ahead pages (given
            // back by the next round's gap, or at the close).
            let aheadFrom = lastIndex + 1
            let end = PageSize.covering(inode.size)
            if aheadFrom >= end, pagesAllowed >= missing + PageStore.chargeBatch,
               inode.pages.nextData(from: aheadFrom) == nil,
               firstIndex <= end || (inode.pages.nextData(from: end) ?? Int.max) >= firstIndex {
                if let tail = runs.last, tail.first + tail.count == aheadFrom {
                    runs[runs.count - 1].count += PageStore.chargeBatch
                } else {
                    runs.append((aheadFrom, PageStore.chargeBatch))
                }
                backing.aheadEnd = max(backing.aheadEnd, aheadFrom + PageStore.chargeBatch)
                filesAhead.insert(inode.ino)
            }
            let pending = store.pendingCharge(of: backing, runs: runs, wanted: min(missing, pagesAllowed),
                                              owner: inode.ino.rawValue, shrinks: backing.shrinks)
            return .charge(pending)
        }
        // What is still a hole now was refused: write up to the first one (none at all when the
        // gap that must be filled first is one).
        let firstHole = inode.pages.nextHole(from: gapFrom, before: lastIndex + 1)
        if firstHole <= lastIndex && (wholeOrNothing || firstHole < firstIndex) { throw .noSpace }
        let writable = firstHole > lastIndex ? count : Int(Int64(firstHole) * pageSize - offset)
        if writable <= 0 { throw .noSpace }
        try backing.write(source, length: writable, at: offset)
        return .done(noteStored(inode, offset: offset, count: writable))
    }

    /// Takes the pages of a charge back under the lock: they are the file's now, unless the file
    /// freed pages meanwhile (then which of them exist is unknown: those not in the map go).
    func settle(_ pending: PendingCharge, charged: Int) {
        guard let target = pending.file else { return store.settle(pending, charged: charged) }
        let runs = pending.chargedRuns(charged)
        guard let inode = inodes[InodeNumber(target.owner)], inode.backing === target.file else { return }
        let unchanged = target.file.shrinks == target.shrinks
        // Short for an all-or-nothing operation: what it charged goes back (pages another
        // operation took into the map meanwhile are theirs, and stay).
        let undo = target.wholeOrNothing && charged < pending.wanted
        var added = 0, punched = false
        for run in runs {
            for index in run.first..<(run.first + run.count) where inode.pages.page(at: index) == 0 {
                // A page the kernel would not punch stays the file's: a charged page of zeros.
                if (unchanged && !undo) || !target.file.punch(offset: Int64(index) * Int64(PageSize.bytes), length: Int64(PageSize.bytes)) {
                    inode.pages.set(PageMap.inBackingFile, at: index)
                    added += 1
                } else {
                    punched = true
                }
            }
        }
        // Pages were freed: a charge picked before now cannot tell which of its pages exist.
        if undo && punched { target.file.shrinks += 1 }
        store.noteBackingPages(added, of: target.file)
    }

    /// The backing file follows the size. Shrinking frees its pages past the end (and zeroes the
    /// rest of the last page, as tmpfs does); growing with passthrough opens charges the new pages.
    func truncateBacked(_ inode: Inode, _ backing: BackingFile, to size: Int64) throws(Errno) {
        let pageSize = Int64(PageSize.bytes)
        // Growing over ahead pages would make them the file's, where tmpfs's truncate leaves a
        // hole; shrinking frees them with the rest past the end (below).
        if size > inode.size { trimAhead(inode) }
        if size > inode.size, inode.passthroughOpens > 0 {
            let holes = try holeRuns(inode, from: Int(inode.size / pageSize), through: PageSize.covering(size) - 1, limit: pagesAllowed)
            // Charged here, under the lock: only a truncate up of a file being read through
            // passthrough waits for the target.
            if let pending = charge(inode, backing, holes) {
                let (charged, failure) = pending.charge()
                settle(pending, charged: charged)
                if let failure { throw failure }
                if charged < pending.wanted { throw .noSpace }
            }
        }
        try backing.setSize(size)
        if size < inode.size {
            var marks: [UInt32] = []
            inode.pages.remove(from: PageSize.covering(size), to: Int.max >> 1, into: &marks)
            store.noteBackingPages(-marks.count, of: backing)
            backing.shrinks += 1
            endAhead(inode, backing)
        }
        inode.size = size
    }

    /// Whole pages inside the range are freed, unless passthrough opens exist: then zeroed.
    func punchBacked(_ inode: Inode, _ backing: BackingFile, from offset: Int64, to end: Int64) throws(Errno) {
        let pageSize = Int64(PageSize.bytes)
        let firstFull = PageSize.covering(offset)
        let lastFull = Int(end / pageSize)  // exclusive
        guard inode.passthroughOpens == 0, firstFull < lastFull else {
            return try zero(inode, from: offset, to: end)
        }
        try zero(inode, from: offset, to: Int64(firstFull) * pageSize)
        if (inode.pages.nextData(from: firstFull) ?? Int.max) < lastFull {
            if backing.punch(offset: Int64(firstFull) * pageSize, length: Int64(lastFull - firstFull) * pageSize) {
                var marks: [UInt32] = []
                inode.pages.remove(from: firstFull, to: lastFull, into: &marks)
                store.noteBackingPages(-marks.count, of: backing)
                backing.shrinks += 1
            } else {
                // Refused: the pages stay (and stay counted), and must read as zeros now.
                try zero(inode, from: Int64(firstFull) * pageSize, to: Int64(lastFull) * pageSize)
            }
        }
        try zero(inode, from: Int64(lastFull) * pageSize, to: end)
    }

    /// fallocate's allocation: every hole in the range, all or nothing.
    func allocateBacked(_ inode: Inode, _ backing: BackingFile, from offset: Int64, to end: Int64,
                        supply: PageSupply) throws(Errno) -> PendingCharge? {
        let pageSize = Int64(PageSize.bytes)
        let firstIndex = Int(offset / pageSize), lastIndex = Int((end - 1) / pageSize)
        // An allocation that reaches past the end: ahead pages there go back first (charged
        // again below where the range needs them), so that pages past the end are the caller's
        // allocation alone, as on tmpfs (ending the range instead made the whole batch the
        // file's, kept for good); one below the end leaves the range alone.
        if backing.aheadEnd > 0, lastIndex >= PageSize.covering(inode.size) { trimAhead(inode) }
        let holes = try holeRuns(inode, from: firstIndex, through: lastIndex, limit: pagesAllowed)
        if holes.reduce(0, { $0 + $1.count }) > pagesAllowed { throw .noSpace }
        if supply == .askForMore, let pending = charge(inode, backing, holes) { return pending }
        if inode.pages.nextHole(from: firstIndex, before: lastIndex + 1) <= lastIndex { throw .noSpace }
        return nil
    }
}
