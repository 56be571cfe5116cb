import CFuse
import Glibc
import SystemPackage

/// All file data of a mount, as 4 KiB pages of one memfd (the arena) mapped into the daemon.
///
/// Every page comes from `allocate` and goes back through `free`; those are the only places that
/// touch the arena's backing memory, so they are where a page is charged (through the
/// `PageCharger`, which decides which cgroup pays) and where the charge is given back (punching
/// the page out of the memfd). Pages are numbered from 1; 0 means "no page" in page maps.
///
/// Not thread-safe: the file system calls it under its own lock.
public final class PageStore {
    public static let pageSize = 4096
    /// Charged pages kept free for reuse, so that small writes do not each cost a charge round
    /// trip. This is the store's part of the slack between bytes stored and bytes charged.
    public static let reserveLimit = 64  // 256 KiB
    /// Pages are charged in runs of at least this many (256 KiB); the extras wait in the reserve.
    /// A run is charged only when the reserve is empty, so the reserve never holds more than
    /// `reserveLimit` pages either way, and one charge round trip serves 64 single-page writes.
    static let chargeBatch = reserveLimit

    public let charger: PageCharger
    let arena: FileDescriptor
    let base: UnsafeMutableRawPointer
    let capacityPages: Int

    /// Next never-used page number; pages below it were handed out at least once.
    private var nextFresh: Int = 1
    /// Freed pages already punched out of the arena (uncharged); reusing one charges it again.
    private var punched: [UInt32] = []
    /// Freed pages still charged, already zeroed.
    private var reserve: [UInt32] = []
    /// Pages that belong to files right now.
    public private(set) var pagesInUse = 0

    /// Pages charged to the charger's cgroup (in use plus the reserve).
    public var pagesCharged: Int { pagesInUse + reserve.count }

    /// A store with a charger made for its arena (a charger is built from the arena's fd).
    public init(capacityPages requested: Int = Int(UInt32.max) - 1,
                charger makeCharger: (FileDescriptor) throws -> PageCharger) throws {
        let capacity = max(2, min(requested, Int(UInt32.max) - 1))
        let fd = cfuse_memfd_create("chargefs-arena", UInt32(CFUSE_MFD_CLOEXEC))
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        let bytes = (capacity + 1) * Self.pageSize
        guard ftruncate(fd, off_t(bytes)) == 0 else {
            let err = Errno(rawValue: errno)
            close(fd)
            throw err
        }
        // MAP_NORESERVE: the mapping is address space only; memory exists once a page is charged.
        let mapped = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let err = Errno(rawValue: errno)
            close(fd)
            throw err
        }
        do {
            self.charger = try makeCharger(FileDescriptor(rawValue: fd))
        } catch {
            munmap(mapped, bytes)
            close(fd)
            throw error
        }
        self.arena = FileDescriptor(rawValue: fd)
        self.base = mapped
        self.capacityPages = capacity
    }

    deinit {
        munmap(base, (capacityPages + 1) * Self.pageSize)
        try? arena.close()
    }

    /// The arena memfd, for chargers that instantiate pages from another process.
    public var arenaDescriptor: FileDescriptor { arena }

    @inline(__always)
    public func address(of page: UInt32) -> UnsafeMutableRawPointer {
        base + Int(page) &* Self.pageSize
    }

    /// Hands out up to `count` zero-filled pages, appending them to `pages`. Returns how many it
    /// got: fewer than asked only when the charger refused (ENOSPC), so a caller can store what
    /// fits. Throws only when it got none.
    @discardableResult
    public func allocate(_ count: Int, into pages: inout [UInt32]) throws(Errno) -> Int {
        var got = 0
        while got < count, let page = reserve.popLast() {
            pages.append(page)  // zeroed when it entered the reserve
            got += 1
        }
        var failure: Errno?
        while got < count {
            do {
                got += try chargeMore(count - got, into: &pages)
            } catch {
                failure = error
                break
            }
        }
        pagesInUse += got
        if got == 0, let failure { throw failure }
        return got
    }

    /// Charges at least one page; extra pages of a batch go to the reserve. Punched pages are
    /// reused first, one consecutive run at a time (the stack holds ascending runs), batched like
    /// fresh pages: a 4 KiB write must not cost a charge round trip each.
    private func chargeMore(_ wanted: Int, into pages: inout [UInt32]) throws(Errno) -> Int {
        let batch = max(wanted, Self.chargeBatch)
        let first: Int, available: Int
        let reusing = !punched.isEmpty
        if let page = punched.last {
            var run = 1
            while run < batch, run < punched.count, punched[punched.count - 1 - run] == page &+ UInt32(run) {
                run += 1
            }
            (first, available) = (Int(page), run)
        } else {
            (first, available) = (nextFresh, capacityPages + 1 - nextFresh)
            guard available > 0 else { throw .noSpace }
        }
        var run = min(batch, available)
        while true {
            do {
                try chargeRun(first: first, count: run)
                break
            } catch where error == .noSpace && run > 1 {
                // Near the limit: settle for less, so a write can store the part that fits.
                run = run > wanted ? wanted : run / 2
            }
        }
        if reusing { punched.removeLast(run) } else { nextFresh += run }
        let used = min(run, wanted)
        for p in first..<(first + used) { pages.append(UInt32(p)) }
        for p in (first + used)..<(first + run) { reserve.append(UInt32(p)) }
        return used
    }

    private func chargeRun(first: Int, count: Int) throws(Errno) {
        try charger.charge(offset: Int64(first * Self.pageSize), length: Int64(count * Self.pageSize))
    }

    /// Gives pages back. Up to `reserveLimit` stay charged for reuse; the rest are punched out of
    /// the arena, which frees their memory and uncharges them.
    public func free<S: Sequence>(_ freed: S) where S.Element == UInt32 {
        var toPunch: [UInt32] = []
        for page in freed {
            pagesInUse -= 1
            if reserve.count < Self.reserveLimit {
                zero(page)
                reserve.append(page)
            } else {
                toPunch.append(page)
            }
        }
        punch(&toPunch)
    }

    /// Stale data must never reach another file: a page is zeroed before it can be reused.
    /// pwrite rather than memset, so the daemon does not fault the page into its own mapping.
    private func zero(_ page: UInt32) {
        _ = pwrite(arena.rawValue, FileSystemCore.zeroPage, Self.pageSize, off_t(Int(page) * Self.pageSize))
    }

    /// Copies `length` bytes into the arena at `page` + `inner` (within consecutive pages).
    /// pwrite into the memfd copies straight into the pages the charger instantiated, without a
    /// page fault per page as a copy through the mapping would take.
    @inline(__always)
    func store(_ source: UnsafeRawPointer, length: Int, page: UInt32, inner: Int) {
        var done = 0
        let offset = Int(page) * Self.pageSize + inner
        while done < length {
            let n = pwrite(arena.rawValue, source + done, length - done, off_t(offset + done))
            if n > 0 {
                done += n
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                // The pages are already instantiated, so only a bug gets here; copy through the
                // mapping rather than lose data.
                memcpy(address(of: page) + inner + done, source + done, length - done)
                return
            }
        }
    }

    /// Releases the whole reserve (used when the mount must hand every byte back).
    public func trimReserve() {
        var all = reserve
        reserve.removeAll()
        punch(&all)
    }

    private func punch(_ pages: inout [UInt32]) {
        guard !pages.isEmpty else { return }
        pages.sort()
        var i = 0
        while i < pages.count {
            var j = i + 1
            while j < pages.count, pages[j] == pages[j - 1] &+ 1 { j += 1 }
            let offset = Int64(Int(pages[i]) * Self.pageSize)
            let length = Int64((j - i) * Self.pageSize)
            _ = cfuse_fallocate(arena.rawValue, Int32(CFUSE_FALLOC_PUNCH_HOLE | CFUSE_FALLOC_KEEP_SIZE), offset, length)
            i = j
        }
        // Descending, so that popping from the end reuses ascending runs.
        punched.append(contentsOf: pages.reversed())
    }
}
