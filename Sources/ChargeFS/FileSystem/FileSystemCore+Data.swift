import CFuse
import Glibc
import SystemPackage

/// File contents: read, write, truncate, fallocate, SEEK_DATA/SEEK_HOLE.
extension FileSystemCore {
    /// tmpfs's s_maxbytes (MAX_LFS_FILESIZE).
    static let maxFileSize = Int64.max

    static let physicalPages = Int(cfuse_physical_memory()) / PageSize.bytes

    /// Splits the byte range [from, to) at page boundaries and calls `body` with each piece's
    /// page index, offset inside the page and length, until it returns false.
    @inline(__always)
    func forEachPageSpan(from: Int64, to: Int64, _ body: (_ index: Int, _ inner: Int, _ length: Int) -> Bool) {
        let pageSize = Int64(PageSize.bytes)
        var position = from
        while position < to {
            let inner = Int(position % pageSize)
            let length = Int(min(pageSize - Int64(inner), to - position))
            guard body(Int(position / pageSize), inner, length) else { return }
            position += Int64(length)
        }
    }

    func regularFile(_ ino: InodeNumber) throws(Errno) -> Inode {
        let inode = try inode(ino)
        guard inode.isRegular else { throw inode.isDirectory ? .isDirectory : .invalidArgument }
        return inode
    }

    /// Runs under the shared lock: changes nothing (atime is the caller's business). Arena data
    /// goes to `body` as iovecs into the arena, under the lock (zero-copy: once it is released a
    /// writer may free and reuse those pages); a backing file's data comes back as a copy, which
    /// the caller hands to `body` after releasing the lock. nil when `body` was called.
    func read(_ ino: InodeNumber, offset: Int64, count: Int, _ body: (UnsafeBufferPointer<iovec>) -> Void) throws(Errno) -> CopiedRead? {
        let inode = try regularFile(ino)
        if offset < 0 { throw .invalidArgument }
        guard offset < inode.size, count > 0 else {
            body(UnsafeBufferPointer(start: nil, count: 0))
            return nil
        }
        let end = offset + min(Int64(count), inode.size - offset)
        if let backing = inode.backing {
            return try readBacked(backing, from: offset, count: Int(end - offset))
        }
        let pageSize = Int64(PageSize.bytes)
        // On the stack for small reads (the common 4 KiB case): no allocation per request.
        let capacity = Int((end - offset) / pageSize) + 2
        withUnsafeTemporaryAllocation(of: iovec.self, capacity: capacity) { vectors in
            var count = 0
            forEachPageSpan(from: offset, to: end) { index, inner, length in
                let page = inode.pages.page(at: index)
                let source = page == 0 ? UnsafeMutableRawPointer(mutating: Arena.zeros) + inner : store.address(of: page) + inner
                // Consecutive arena pages (the usual case for data written in order) make one vector.
                if count > 0, let lastBase = vectors[count - 1].iov_base, page != 0,
                   lastBase + vectors[count - 1].iov_len == source {
                    vectors[count - 1].iov_len += length
                } else {
                    vectors[count] = iovec(iov_base: source, iov_len: length)
                    count += 1
                }
                return true
            }
            // -o takeover: no reply from a page this process has not mapped (PageStore.mapsChargedPages).
            if store.mapsChargedPages { for v in vectors[0..<count] { store.mapForReply(v) } }
            body(UnsafeBufferPointer(rebasing: vectors[0..<count]))
        }
        return nil
    }

    /// Clears setuid/setgid as the VFS does when a file is written, truncated or chowned
    /// (should_remove_suid, setattr_should_drop_sgid). `kernelAsked`: the kernel flagged the
    /// request (with FUSE_HANDLE_KILLPRIV_V2: a caller without CAP_FSETID, or any chown); then
    /// setuid goes, and setgid with group-exec. Setgid without group-exec goes when the caller is
    /// outside the file's group and not root, a rule FUSE's kernel side never applies itself.
    /// Returns true when the mode changed.
    func clearSetID(_ inode: Inode, _ caller: Caller, kernelAsked: Bool) -> Bool {
        let mode = inode.mode
        guard mode & (ModeBits.setuid | ModeBits.setgid) != 0, !inode.isDirectory else { return false }
        var clear: UInt32 = 0
        if kernelAsked {
            clear |= ModeBits.setuid
            if mode & ModeBits.groupExecute != 0 { clear |= ModeBits.setgid }
        }
        if mode & (ModeBits.setgid | ModeBits.groupExecute) == ModeBits.setgid,
           caller.uid != 0, !caller.isMember(inode.gid) {
            clear |= ModeBits.setgid
        }
        guard mode & clear != 0 else { return false }
        inode.mode = mode & ~clear
        return true
    }

    /// Stores `data`, then drops what a write drops: file capabilities, and setuid/setgid by
    /// `clearSetID`'s rules.
    func write(_ ino: InodeNumber, offset: Int64, data: UnsafeRawBufferPointer, caller: Caller, clearSetIDAsked: Bool,
               wholeOrNothing: Bool, supply: PageSupply) throws(Errno) -> NeedingPages<WriteResult> {
        let inode = try regularFile(ino)
        store.activeTarget = inode.chargeTarget
        let sizeBefore = inode.size
        let written: Int
        switch try storeData(data, in: inode, at: offset, wholeOrNothing: wholeOrNothing, supply: supply) {
        case .done(let n): written = n
        case .charge(let pending): return .charge(pending)
        }
        // A written file loses its capabilities, as on tmpfs. The kernel removes them itself
        // before a cached write, but a direct-I/O write reaches us without that.
        removeFileCapabilities(inode)
        var result = WriteResult(written: written, modeChanged: clearSetID(inode, caller, kernelAsked: clearSetIDAsked))
        result.dueForBackingFile = dueForBackingFile(inode, sizeBefore: sizeBefore, written: written)
        return .done(result)
    }

    /// Copies `data` into the file's pages, allocating (and charging) missing ones first. A write
    /// that only partly fits stores the leading part that does, as tmpfs does, unless
    /// `wholeOrNothing`: a writeback of mapped pages, where older kernels (6.1) take a short count
    /// as success and silently drop the rest, so that must fail whole with ENOSPC.
    private func storeData(_ data: UnsafeRawBufferPointer, in inode: Inode, at offset: Int64, wholeOrNothing: Bool,
                           supply: PageSupply) throws(Errno) -> NeedingPages<Int> {
        if offset < 0 { throw .invalidArgument }
        guard data.count > 0, let source = data.baseAddress else { return .done(0) }
        let (end, overflow) = offset.addingReportingOverflow(Int64(data.count))
        if overflow || end > Self.maxFileSize { throw .fileTooLarge }
        if let backing = inode.backing {
            return try storeBacked(source, count: data.count, in: inode, backing, at: offset, wholeOrNothing: wholeOrNothing, supply: supply)
        }
        let pageSize = Int64(PageSize.bytes)
        let firstIndex = Int(offset / pageSize)
        let lastIndex = Int((end - 1) / pageSize)

        // Pages are charged before any byte is copied, outside the tree's lock (the caller asks
        // the store and comes back). When none can be had, the leading part that lands on pages
        // the file already has is still written.
        var missing = 0
        for index in firstIndex...lastIndex where inode.pages.page(at: index) == 0 { missing += 1 }
        var fresh: [UInt32] = []
        if missing > 0 {
            switch try takeFresh(missing, wholeOrNothing: wholeOrNothing, supply: supply) {
            case .charge(let pending): return .charge(pending)
            case .done(let pages): fresh = pages
            }
        }
        let written = try copy(source, into: inode, from: offset, to: end, fresh: fresh)
        if written == 0 { throw .noSpace }
        return .done(noteStored(inode, offset: offset, count: written))
    }

    /// Charged pages for `missing` holes, as many as size= allows (all or none with
    /// `wholeOrNothing`), or the charge to run first.
    private func takeFresh(_ missing: Int, wholeOrNothing: Bool, supply: PageSupply) throws(Errno) -> NeedingPages<[UInt32]> {
        let allowed = maxPages.map { max(0, $0 - store.pagesInUse) } ?? missing
        if wholeOrNothing && allowed < missing { throw .noSpace }
        let needed = min(missing, allowed)
        if let pending = chargeNeeded(needed, supply) { return .charge(pending) }
        var fresh: [UInt32] = []
        fresh.reserveCapacity(needed)
        store.takeCharged(needed, into: &fresh)
        if wholeOrNothing && fresh.count < missing {
            store.free(fresh)
            throw .noSpace
        }
        return .done(fresh)
    }

    /// Copies [offset, end) of the write into the file's pages, placing `fresh` ones in its holes
    /// in order, up to the first hole no fresh page is left for; returns the bytes copied. Runs
    /// of consecutive arena pages are one pwrite each. Fresh pages the copy did not reach go
    /// back to the store.
    private func copy(_ source: UnsafeRawPointer, into inode: Inode, from offset: Int64, to end: Int64,
                      fresh: [UInt32]) throws(Errno) -> Int {
        var freshIterator = fresh.makeIterator()
        var written = 0
        var runPage: UInt32 = 0
        var runInner = 0
        var runLength = 0
        var storeFailure: Errno?
        var unplaced: [UInt32] = []
        forEachPageSpan(from: offset, to: end) { index, inner, length in
            var page = inode.pages.page(at: index)
            let isFresh = page == 0
            if isFresh {
                guard let next = freshIterator.next() else { return false }
                page = next
            }
            if runLength > 0 && inner == 0 && page == runPage &+ UInt32((runInner + runLength) / PageSize.bytes) {
                runLength += length
            } else {
                if runLength > 0 {
                    do throws(Errno) {
                        try store.store(source + (written - runLength), length: runLength, page: runPage, inner: runInner)
                    } catch {
                        storeFailure = error
                        if isFresh { unplaced.append(page) }
                        return false
                    }
                }
                runPage = page
                runInner = inner
                runLength = length
            }
            // Placed only once the copy before it went through.
            if isFresh { inode.pages.set(page, at: index) }
            written += length
            return true
        }
        let untouched = Array(freshIterator)
        if let storeFailure {
            store.free(unplaced + untouched)  // taken for pages the write did not reach
            throw storeFailure
        }
        if runLength > 0 {
            try store.store(source + (written - runLength), length: runLength, page: runPage, inner: runInner)
        }
        return written
    }

    /// What a write that stored `count` bytes at `offset` does to the file beside its data:
    /// the size grows to cover them, mtime and ctime move. Returns `count`.
    func noteStored(_ inode: Inode, offset: Int64, count: Int) -> Int {
        let stored = offset + Int64(count)
        if stored > inode.size { inode.size = stored }
        let now = timespec.now
        inode.mtime = now
        inode.ctime = now
        return count
    }

    /// The charge to run before `needed` pages can be taken from the reserve, if it is short and
    /// the caller may still ask; nil when the reserve must do (or the arena has no page left).
    private func chargeNeeded(_ needed: Int, _ supply: PageSupply) -> PendingCharge? {
        guard supply == .askForMore, store.chargedFreePages < needed else { return nil }
        return store.pickForCharging(needed - store.chargedFreePages)
    }

    /// Sets the size; shrinking frees whole pages past the end and zeroes the rest of the last one,
    /// so growing again later reads zeros there.
    func truncate(_ inode: Inode, to size: Int64) throws(Errno) {
        store.activeTarget = inode.chargeTarget
        if let backing = inode.backing {
            return try truncateBacked(inode, backing, to: size)
        }
        let pageSize = Int64(PageSize.bytes)
        if size < inode.size {
            let keepPages = PageSize.covering(size)
            var freed: [UInt32] = []
            // To the end of the map: pages fallocated with KEEP_SIZE lie past the old size.
            inode.pages.remove(from: keepPages, to: Int.max >> 1, into: &freed)
            store.free(freed)
            let inner = Int(size % pageSize)
            if inner != 0 {
                let page = inode.pages.page(at: Int(size / pageSize))
                if page != 0 { memset(store.address(of: page) + inner, 0, PageSize.bytes - inner) }
            }
        }
        inode.size = size
    }

    func fallocate(_ ino: InodeNumber, mode: FallocateMode, offset: Int64, length: Int64,
                   supply: PageSupply) throws(Errno) -> NeedingPages<Void> {
        store.activeTarget = try regularFile(ino).chargeTarget
        let keepSize = mode.contains(.keepSize)
        let punch = mode.contains(.punchHole)
        if !mode.subtracting([.keepSize, .punchHole]).isEmpty || (punch && !keepSize) {
            throw .notSupported
        }
        let inode = try regularFile(ino)
        if offset < 0 || length <= 0 { throw .invalidArgument }
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > Self.maxFileSize { throw .fileTooLarge }
        let now = timespec.now
        if punch {
            if let backing = inode.backing {
                try punchBacked(inode, backing, from: offset, to: end)
            } else {
                try punchArena(inode, from: offset, to: end)
            }
            inode.mtime = now
            inode.ctime = now
            return .done(())
        }
        if let backing = inode.backing {
            if let pending = try allocateBacked(inode, backing, from: offset, to: end, supply: supply) { return .charge(pending) }
            if !keepSize && end > inode.size { try backing.setSize(end) }
        } else if let pending = try allocateArena(inode, from: offset, to: end, supply: supply) {
            return .charge(pending)
        }
        if !keepSize && end > inode.size { inode.size = end }
        inode.ctime = now
        if !keepSize { inode.mtime = now }
        return .done(())
    }

    /// fallocate's punch in the arena: whole pages inside the range go, even past EOF (KEEP_SIZE
    /// allocations live there); the partial pages at its ends are zeroed.
    private func punchArena(_ inode: Inode, from offset: Int64, to end: Int64) throws(Errno) {
        let pageSize = Int64(PageSize.bytes)
        let firstFull = PageSize.covering(offset)
        let lastFull = Int(end / pageSize)  // exclusive
        try zero(inode, from: offset, to: min(end, Int64(firstFull) * pageSize))
        if firstFull < lastFull {
            var freed: [UInt32] = []
            inode.pages.remove(from: firstFull, to: lastFull, into: &freed)
            store.free(freed)
            try zero(inode, from: Int64(lastFull) * pageSize, to: end)
        } else if Int64(firstFull) * pageSize < end {
            try zero(inode, from: Int64(firstFull) * pageSize, to: end)
        }
    }

    /// fallocate's allocation in the arena: every hole in the range, all or nothing; the charge
    /// to run first when the reserve is short.
    private func allocateArena(_ inode: Inode, from offset: Int64, to end: Int64, supply: PageSupply) throws(Errno) -> PendingCharge? {
        let pageSize = Int64(PageSize.bytes)
        let firstIndex = Int(offset / pageSize)
        let lastIndex = Int((end - 1) / pageSize)
        // Refuse what can never fit before walking the range: it may span 2^50 pages.
        let atLeastMissing = (lastIndex - firstIndex + 1) - inode.pages.count
        let available = maxPages.map { $0 - store.pagesInUse } ?? Self.physicalPages
        if atLeastMissing > available { throw .noSpace }
        var holes: [Int] = []
        var index = inode.pages.nextHole(from: firstIndex, before: lastIndex + 1)
        while index <= lastIndex {
            holes.append(index)
            index = inode.pages.nextHole(from: index + 1, before: lastIndex + 1)
        }
        guard !holes.isEmpty else { return nil }
        if let max = maxPages, store.pagesInUse + holes.count > max { throw .noSpace }
        if let pending = chargeNeeded(holes.count, supply) { return pending }
        var fresh: [UInt32] = []
        fresh.reserveCapacity(holes.count)
        if store.takeCharged(holes.count, into: &fresh) < holes.count {
            store.free(fresh)
            throw .noSpace
        }
        for (slot, page) in zip(holes, fresh) { inode.pages.set(page, at: slot) }
        return nil
    }

    /// Writes zeros over [from, to) where pages exist (holes already read as zero). Only a
    /// backing file's pwrite can fail: then the error, since old bytes would otherwise stay.
    func zero(_ inode: Inode, from: Int64, to: Int64) throws(Errno) {
        // A backing file's bytes past the end are zeros already (fresh pages, or zeroed by the
        // truncate that left them there), and a pwrite there would move its size.
        let to = inode.backing == nil ? to : min(to, inode.size)
        var failure: Errno?
        forEachPageSpan(from: from, to: to) { index, inner, length in
            let page = inode.pages.page(at: index)
            guard page != 0 else { return true }
            guard let backing = inode.backing else {
                memset(store.address(of: page) + inner, 0, length)
                return true
            }
            // Through the file: the daemon maps no backing file.
            do throws(Errno) {
                try backing.write(Arena.zeros, length: length, at: Int64(index) * Int64(PageSize.bytes) + Int64(inner))
                return true
            } catch {
                failure = error
                return false
            }
        }
        if let failure { throw failure }
    }

    func seek(_ ino: InodeNumber, offset: Int64, whence: SeekWhence) throws(Errno) -> Int64 {
        let inode = try regularFile(ino)
        if offset < 0 || offset >= inode.size { throw .noSuchAddressOrDevice }
        let pageSize = Int64(PageSize.bytes)
        let index = Int(offset / pageSize)
        switch whence {
        case .data:
            if inode.pages.page(at: index) != 0 { return offset }
            guard let next = inode.pages.nextData(from: index) else { throw .noSuchAddressOrDevice }
            let position = Int64(next) * pageSize
            if position >= inode.size { throw .noSuchAddressOrDevice }
            return position
        case .hole:
            if inode.pages.page(at: index) == 0 { return offset }
            return min(inode.size, Int64(inode.pages.nextHole(from: index)) * pageSize)
        }
    }
}
