import CFuse
import Glibc
import SystemPackage

/// File contents: read, write, truncate, fallocate, SEEK_DATA/SEEK_HOLE.
extension FileSystemCore {
    static let pageSize = PageStore.pageSize
    /// tmpfs's s_maxbytes (MAX_LFS_FILESIZE).
    static let maxFileSize = Int64.max

    static let physicalPages = Int(cfuse_physical_memory()) / PageStore.pageSize

    /// Shared page of zeros that holes are read from, so reading a hole allocates nothing.
    nonisolated(unsafe) static let zeroPage: UnsafeMutableRawPointer = {
        let page = UnsafeMutableRawPointer.allocate(byteCount: PageStore.pageSize, alignment: PageStore.pageSize)
        memset(page, 0, PageStore.pageSize)
        return page
    }()

    /// Splits the byte range [from, to) at page boundaries and calls `body` with each piece's
    /// page index, offset inside the page and length, until it returns false.
    @inline(__always)
    func forEachPageSpan(from: Int64, to: Int64, _ body: (_ index: Int, _ inner: Int, _ length: Int) -> Bool) {
        let pageSize = Int64(Self.pageSize)
        var position = from
        while position < to {
            let inner = Int(position % pageSize)
            let length = Int(min(pageSize - Int64(inner), to - position))
            guard body(Int(position / pageSize), inner, length) else { return }
            position += Int64(length)
        }
    }

    func regularFile(_ ino: UInt64) throws(Errno) -> Inode {
        let inode = try inode(ino)
        guard inode.isRegular else { throw inode.isDirectory ? .isDirectory : .invalidArgument }
        return inode
    }

    /// Runs under the shared lock: changes nothing (atime is the caller's business).
    func read(_ ino: UInt64, offset: Int64, count: Int, _ body: (UnsafeBufferPointer<iovec>) -> Void) throws(Errno) {
        let inode = try regularFile(ino)
        if offset < 0 { throw .invalidArgument }
        guard offset < inode.size, count > 0 else {
            return body(UnsafeBufferPointer(start: nil, count: 0))
        }
        let end = offset + min(Int64(count), inode.size - offset)
        let pageSize = Int64(Self.pageSize)
        // On the stack for small reads (the common 4 KiB case): no allocation per request.
        let capacity = Int((end - offset) / pageSize) + 2
        withUnsafeTemporaryAllocation(of: iovec.self, capacity: capacity) { vectors in
            var count = 0
            forEachPageSpan(from: offset, to: end) { index, inner, length in
                let page = inode.pages.page(at: index)
                let source = page == 0 ? Self.zeroPage + inner : store.address(of: page) + inner
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
            body(UnsafeBufferPointer(rebasing: vectors[0..<count]))
        }
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

    func write(_ ino: UInt64, offset: Int64, data: UnsafeRawBufferPointer) throws(Errno) -> Int {
        let inode = try regularFile(ino)
        if offset < 0 { throw .invalidArgument }
        guard data.count > 0 else { return 0 }
        let (end, overflow) = offset.addingReportingOverflow(Int64(data.count))
        if overflow || end > Self.maxFileSize { throw .fileTooLarge }
        let pageSize = Int64(Self.pageSize)
        let firstIndex = Int(offset / pageSize)
        let lastIndex = Int((end - 1) / pageSize)

        // Pages are instantiated (and charged) before any byte is copied; a write that only
        // partly fits stores the leading part, as tmpfs does.
        var missing = 0
        for index in firstIndex...lastIndex where inode.pages.page(at: index) == 0 { missing += 1 }
        var fresh: [UInt32] = []
        if missing > 0 {
            let allowed = maxPages.map { max(0, $0 - store.pagesInUse) } ?? missing
            if allowed == 0 { throw .noSpace }
            fresh.reserveCapacity(min(missing, allowed))
            try store.allocate(min(missing, allowed), into: &fresh)
        }
        var freshIterator = fresh.makeIterator()
        var written = 0
        // Copy in runs of consecutive arena pages: one pwrite each.
        var runPage: UInt32 = 0
        var runInner = 0
        var runLength = 0
        var storeFailure: Errno?
        forEachPageSpan(from: offset, to: end) { index, inner, length in
            var page = inode.pages.page(at: index)
            if page == 0 {
                guard let next = freshIterator.next() else { return false }
                page = next
                inode.pages.set(page, at: index)
            }
            if runLength > 0 && inner == 0 && page == runPage &+ UInt32((runInner + runLength) / Self.pageSize) {
                runLength += length
            } else {
                if runLength > 0 {
                    do throws(Errno) {
                        try store.store(data.baseAddress! + (written - runLength), length: runLength, page: runPage, inner: runInner)
                    } catch {
                        storeFailure = error
                        return false
                    }
                }
                runPage = page
                runInner = inner
                runLength = length
            }
            written += length
            return true
        }
        if let storeFailure {
            store.free(freshIterator)  // allocated for pages the write did not reach
            throw storeFailure
        }
        if runLength > 0 {
            try store.store(data.baseAddress! + (written - runLength), length: runLength, page: runPage, inner: runInner)
        }
        if written == 0 { throw .noSpace }
        let stored = offset + Int64(written)
        if stored > inode.size { inode.size = stored }
        let now = timespec.now
        inode.mtime = now
        inode.ctime = now
        return written
    }

    /// Sets the size; shrinking frees whole pages past the end and zeroes the rest of the last one,
    /// so growing again later reads zeros there.
    func truncate(_ inode: Inode, to size: Int64) {
        let pageSize = Int64(Self.pageSize)
        if size < inode.size {
            let keepPages = Int((size + pageSize - 1) / pageSize)
            var freed: [UInt32] = []
            // To the end of the map: pages fallocated with KEEP_SIZE lie past the old size.
            inode.pages.remove(from: keepPages, to: Int.max >> 1, into: &freed)
            store.free(freed)
            let inner = Int(size % pageSize)
            if inner != 0 {
                let page = inode.pages.page(at: Int(size / pageSize))
                if page != 0 { memset(store.address(of: page) + inner, 0, Self.pageSize - inner) }
            }
        }
        inode.size = size
    }

    func fallocate(_ ino: UInt64, mode: Int32, offset: Int64, length: Int64) throws(Errno) {
        let keepSize = mode & Int32(CFUSE_FALLOC_KEEP_SIZE) != 0
        let punch = mode & Int32(CFUSE_FALLOC_PUNCH_HOLE) != 0
        if mode & ~Int32(CFUSE_FALLOC_KEEP_SIZE | CFUSE_FALLOC_PUNCH_HOLE) != 0 || (punch && !keepSize) {
            throw .notSupported
        }
        let inode = try regularFile(ino)
        if offset < 0 || length <= 0 { throw .invalidArgument }
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > Self.maxFileSize { throw .fileTooLarge }
        let pageSize = Int64(Self.pageSize)
        let now = timespec.now
        if punch {
            // Whole pages inside the range go, even past EOF (KEEP_SIZE allocations live there).
            let punchEnd = end
            let firstFull = Int((offset + pageSize - 1) / pageSize)
            let lastFull = Int(punchEnd / pageSize)  // exclusive
            zero(inode, from: offset, to: min(punchEnd, Int64(firstFull) * pageSize))
            if firstFull < lastFull {
                var freed: [UInt32] = []
                inode.pages.remove(from: firstFull, to: lastFull, into: &freed)
                store.free(freed)
                zero(inode, from: Int64(lastFull) * pageSize, to: punchEnd)
            } else if Int64(firstFull) * pageSize < punchEnd {
                zero(inode, from: Int64(firstFull) * pageSize, to: punchEnd)
            }
            inode.mtime = now
            inode.ctime = now
            return
        }
        // Allocate every hole in the range, all or nothing.
        let firstIndex = Int(offset / pageSize)
        let lastIndex = Int((end - 1) / pageSize)
        // Refuse what can never fit before walking the range: it may span 2^50 pages.
        let atLeastMissing = (lastIndex - firstIndex + 1) - inode.pages.count
        let available = maxPages.map { $0 - store.pagesInUse } ?? Self.physicalPages
        if atLeastMissing > available { throw .noSpace }
        var holes: [Int] = []
        var index = inode.pages.nextHole(from: firstIndex)
        while index <= lastIndex {
            holes.append(index)
            index = inode.pages.nextHole(from: index + 1)
        }
        if !holes.isEmpty {
            if let max = maxPages, store.pagesInUse + holes.count > max { throw .noSpace }
            var fresh: [UInt32] = []
            fresh.reserveCapacity(holes.count)
            let got = try store.allocate(holes.count, into: &fresh)
            if got < holes.count {
                store.free(fresh)
                throw .noSpace
            }
            for (slot, page) in zip(holes, fresh) { inode.pages.set(page, at: slot) }
        }
        if !keepSize && end > inode.size { inode.size = end }
        inode.ctime = now
        if !keepSize { inode.mtime = now }
    }

    /// Writes zeros over [from, to) where pages exist (holes already read as zero).
    private func zero(_ inode: Inode, from: Int64, to: Int64) {
        forEachPageSpan(from: from, to: to) { index, inner, length in
            let page = inode.pages.page(at: index)
            if page != 0 { memset(store.address(of: page) + inner, 0, length) }
            return true
        }
    }

    func seek(_ ino: UInt64, offset: Int64, whence: Int32) throws(Errno) -> Int64 {
        let inode = try regularFile(ino)
        if offset < 0 || offset >= inode.size { throw .noSuchAddressOrDevice }
        let pageSize = Int64(Self.pageSize)
        let index = Int(offset / pageSize)
        switch whence {
        case Int32(CFUSE_SEEK_DATA):
            if inode.pages.page(at: index) != 0 { return offset }
            guard let next = inode.pages.nextData(from: index) else { throw .noSuchAddressOrDevice }
            let position = Int64(next) * pageSize
            if position >= inode.size { throw .noSuchAddressOrDevice }
            return position
        case Int32(CFUSE_SEEK_HOLE):
            if inode.pages.page(at: index) == 0 { return offset }
            return min(inode.size, Int64(inode.pages.nextHole(from: index)) * pageSize)
        default:
            throw .invalidArgument
        }
    }
}
