import CFuse
import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

final class PageStoreTests: XCTestCase {
    /// One page at a time (a 4 KiB random write each) must be charged in batches, whether the
    /// pages are fresh or were punched out by an earlier free.
    func testSinglePageAllocationsAreChargedInBatches() throws {
        var made: FakeCharger?
        let store = try PageStore(capacityPages: 1 << 16) { arena in
            let c = FakeCharger(arena: arena)
            made = c
            return c
        }
        let charger = try XCTUnwrap(made)
        var pages: [UInt32] = []
        for _ in 0..<256 { try store.allocate(1, into: &pages) }
        XCTAssertLessThanOrEqual(charger.calls, 256 / PageStore.chargeBatch + 1, "fresh pages")
        var ones = [UInt8](repeating: 0xff, count: PageSize.bytes)
        for page in pages { try store.store(&ones, length: ones.count, page: page, inner: 0) }
        store.free(pages)  // 64 stay in the reserve, the rest are punched
        XCTAssertEqual(store.pagesCharged, PageStore.reserveLimit)
        charger.calls = 0
        pages.removeAll()
        for _ in 0..<256 { try store.allocate(1, into: &pages) }
        XCTAssertEqual(Set(pages).count, 256, "no page handed out twice")
        XCTAssertLessThanOrEqual(charger.calls, (256 - PageStore.reserveLimit) / PageStore.chargeBatch + 1,
                                 "punched pages reused one charge per page")
        // Reused pages read back as zeros.
        for page in pages { XCTAssertEqual(store.address(of: page).load(as: UInt64.self), 0) }
    }

    // MARK: - Stale data never reaches another file (issue 11, case 4)

    /// Fills `pages` with a byte no fresh page holds.
    func fillStale(_ store: PageStore, _ pages: [UInt32]) throws {
        var stale = [UInt8](repeating: 0xAB, count: PageSize.bytes)
        for page in pages { try store.store(&stale, length: stale.count, page: page, inner: 0) }
    }

    /// Takes every page the store can still hand out.
    func allocateAll(_ store: PageStore) -> [UInt32] {
        var all: [UInt32] = []
        while (try? store.allocate(64, into: &all)) != nil {}
        return all
    }

    func assertZero(_ store: PageStore, _ pages: [UInt32], file: StaticString = #filePath, line: UInt = #line) {
        let dirty = pages.filter { memcmp(store.address(of: $0), Arena.zeros, PageSize.bytes) != 0 }
        XCTAssertEqual(dirty, [], "pages handed out with stale bytes", file: file, line: line)
    }

    /// Zeroing a freed page for its next file fails (a pwrite error): the page must be punched
    /// instead, and the next file that gets it reads zeros.
    func testPageThatCannotBeZeroedIsPunchedNotReused() throws {
        let store = try PageStore(capacityPages: 512) { DaemonCharger(arena: $0) }
        var pages: [UInt32] = []
        try store.allocate(8, into: &pages)
        try fillStale(store, pages)
        store.free(pages)
        XCTAssertEqual(store.pagesCharged, PageStore.chargeBatch, "freed pages stay charged for reuse")
        store.arena.syscalls.pwrite = { fd, source, count, offset in
            if source == Arena.zeros { errno = EIO; return -1 }
            return Glibc.pwrite(fd, source, count, off_t(offset))
        }
        var taken: [UInt32] = []
        XCTAssertEqual(store.takeCharged(PageStore.chargeBatch, into: &taken), PageStore.chargeBatch - 8,
                       "the 8 pages that could not be zeroed were not handed out")
        store.arena.syscalls = .kernel
        XCTAssertTrue(Set(taken).isDisjoint(with: pages))
        XCTAssertEqual(store.pagesLost, 0, "the punch worked")
        XCTAssertEqual(store.pagesCharged, PageStore.chargeBatch - 8, "the 8 pages were uncharged, not kept")
        store.free(taken)
        let all = allocateAll(store)
        XCTAssertEqual(all.count, 512)
        XCTAssertTrue(Set(all).isSuperset(of: pages), "punched pages are reused")
        assertZero(store, all)
    }

    /// Neither zeroing nor punching works: the page is never handed out again.
    func testPageThatCanBeNeitherZeroedNorPunchedIsNeverReused() throws {
        let store = try PageStore(capacityPages: 512) { DaemonCharger(arena: $0) }
        var pages: [UInt32] = []
        try store.allocate(8, into: &pages)
        try fillStale(store, pages)
        store.free(pages)
        store.arena.syscalls.pwrite = { _, _, _, _ in errno = EIO; return -1 }
        store.arena.syscalls.fallocate = { fd, mode, offset, length in
            if mode & Int32(CFUSE_FALLOC_PUNCH_HOLE) != 0 { errno = EIO; return -1 }
            return cfuse_fallocate(fd, mode, offset, length)
        }
        var taken: [UInt32] = []
        store.takeCharged(PageStore.chargeBatch, into: &taken)
        store.arena.syscalls = .kernel
        XCTAssertTrue(Set(taken).isDisjoint(with: pages))
        XCTAssertEqual(store.pagesLost, 8)
        store.free(taken)
        let all = allocateAll(store)
        XCTAssertEqual(all.count, 512 - 8, "every other page is still available")
        XCTAssertTrue(Set(all).isDisjoint(with: pages), "a page that could not be cleaned stays out")
        assertZero(store, all)
    }

    /// Over the reserve limit pages are punched; a punch that fails for one page of a run loses
    /// that page only.
    func testFailedPunchLosesOnlyThePagesItFailedFor() throws {
        let store = try PageStore(capacityPages: 1024) { DaemonCharger(arena: $0) }
        var pages: [UInt32] = []
        try store.allocate(256, into: &pages)
        try fillStale(store, pages)
        let bad = pages[200]
        let badOffset = Int64(bad) * Int64(PageSize.bytes)
        store.arena.syscalls.fallocate = { fd, mode, offset, length in
            if mode & Int32(CFUSE_FALLOC_PUNCH_HOLE) != 0, offset <= badOffset, badOffset < offset + length {
                errno = EIO
                return -1
            }
            return cfuse_fallocate(fd, mode, offset, length)
        }
        store.free(pages)  // 64 kept for reuse, the other 192 punched in one run
        store.arena.syscalls = .kernel
        XCTAssertEqual(store.pagesLost, 1)
        let all = allocateAll(store)
        XCTAssertEqual(all.count, 1024 - 1)
        XCTAssertFalse(all.contains(bad))
        assertZero(store, all)
    }

    /// A freed page goes back to another file as zeros: whether it is handed out again at once
    /// (kept charged, zero-filled on the way out) or after the reserve overflowed (punched).
    func testReusedPagesReadBackZeros() throws {
        let store = try PageStore(capacityPages: 4096) { DaemonCharger(arena: $0) }
        var pages: [UInt32] = []
        try store.allocate(PageStore.chargeBatch, into: &pages)  // the whole charged batch
        try fillStale(store, pages)
        store.free(pages)
        XCTAssertEqual(store.pagesCharged, PageStore.chargeBatch)
        var again: [UInt32] = []
        try store.allocate(PageStore.chargeBatch, into: &again)
        XCTAssertEqual(Set(again), Set(pages), "the freed pages are the ones reused (the reserve had no other)")
        assertZero(store, again)
        // One page at a time, as unlinks free them: past the reserve, batches are punched.
        try fillStale(store, again)
        store.free(again)
        var many: [UInt32] = []
        try store.allocate(1000, into: &many)
        try fillStale(store, many)
        for page in many { store.free([page]) }
        XCTAssertLessThanOrEqual(store.pagesCharged, PageStore.reserveLimit, "the charged slack stays bounded")
        XCTAssertEqual(store.pagesInUse, 0)
        let all = allocateAll(store)
        XCTAssertEqual(Set(all).count, all.count, "no page handed out twice")
        XCTAssertTrue(Set(all).isSuperset(of: many))
        assertZero(store, all)
    }

    /// Freeing pages one at a time past the reserve punches them in batches, not one call each.
    func testFreesPastTheReservePunchInBatches() throws {
        final class Counter: @unchecked Sendable { var punches = 0; var zeroes = 0 }
        let counter = Counter()
        let store = try PageStore(capacityPages: 4096) { DaemonCharger(arena: $0) }
        var pages: [UInt32] = []
        try store.allocate(1024, into: &pages)
        store.arena.syscalls.fallocate = { fd, mode, offset, length in
            if mode & Int32(CFUSE_FALLOC_PUNCH_HOLE) != 0 { counter.punches += 1 }
            return cfuse_fallocate(fd, mode, offset, length)
        }
        store.arena.syscalls.pwrite = { fd, source, count, offset in
            if source == Arena.zeros { counter.zeroes += 1 }
            return Glibc.pwrite(fd, source, count, off_t(offset))
        }
        for page in pages { store.free([page]) }
        XCTAssertEqual(counter.zeroes, 0, "nothing is zero-filled until it is handed out")
        XCTAssertLessThanOrEqual(counter.punches, 1024 / (PageStore.reserveLimit / 2), "one punch per half reserve")
        XCTAssertLessThanOrEqual(store.pagesCharged, PageStore.reserveLimit)
        store.arena.syscalls = .kernel
    }

    /// Charged pages left unused in the reserve (1000 small files: not a multiple of the charge
    /// batch) make room too, instead of shrinking every later punch.
    func testUnusedReservePagesDoNotShrinkPunches() throws {
        final class Counter: @unchecked Sendable { var punches = 0 }
        let counter = Counter()
        let store = try PageStore(capacityPages: 4096) { DaemonCharger(arena: $0) }
        var pages: [UInt32] = []
        for _ in 0..<1000 { try store.allocate(1, into: &pages) }
        XCTAssertEqual(store.chargedFreePages, 24)
        store.arena.syscalls.fallocate = { fd, mode, offset, length in
            if mode & Int32(CFUSE_FALLOC_PUNCH_HOLE) != 0 { counter.punches += 1 }
            return cfuse_fallocate(fd, mode, offset, length)
        }
        for page in pages { store.free([page]) }
        store.arena.syscalls = .kernel
        XCTAssertLessThanOrEqual(counter.punches, 1000 / (PageStore.reserveLimit / 2) + 2)
        XCTAssertLessThanOrEqual(store.pagesCharged, PageStore.reserveLimit)
        let all = allocateAll(store)
        XCTAssertEqual(all.count, 4096)
        assertZero(store, all)
    }

    /// A failed copy into the arena is an error for the write, not a copy through the mapping.
    func testFailedStoreIsReported() throws {
        let store = try PageStore(capacityPages: 64) { DaemonCharger(arena: $0) }
        var pages: [UInt32] = []
        try store.allocate(1, into: &pages)
        store.arena.syscalls.pwrite = { _, _, _, _ in errno = ENOMEM; return -1 }
        var bytes = [UInt8](repeating: 1, count: 100)
        XCTAssertThrowsError(try store.store(&bytes, length: bytes.count, page: pages[0], inner: 0)) {
            XCTAssertEqual($0 as? Errno, .noMemory)
        }
        store.arena.syscalls = .kernel
        XCTAssertEqual(store.address(of: pages[0]).load(as: UInt8.self), 0, "nothing was copied behind the error")
    }

    /// Through the file system: a write whose copy fails returns the error, and the pages it had
    /// allocated but not yet placed go back to the store (none is left counted in use).
    func testWriteWhoseStoreFailsLeaksNoPage() throws {
        final class Switch: @unchecked Sendable { var failing = false }
        let failing = Switch()
        let store = try PageStore(capacityPages: 1024) { DaemonCharger(arena: $0) }
        store.arena.syscalls.pwrite = { fd, source, count, offset in
            if failing.failing { errno = EIO; return -1 }
            return Glibc.pwrite(fd, source, count, off_t(offset))
        }
        let fs = FileSystem(config: FileSystemConfig(), store: store)
        let me = Caller(uid: 0, gid: 0)
        let ino = try fs.mknod(parent: FileSystem.rootIno, name: Array("f".utf8), mode: 0o100644, rdev: 0, caller: me).ino
        let page = [UInt8](repeating: 7, count: PageSize.bytes)
        _ = try page.withUnsafeBytes { try fs.write(ino, offset: Int64(PageSize.bytes), data: $0, caller: me, clearSetIDAsked: false) }
        // Pages 0 and 2 are new and not adjacent in the arena to page 1's: the copy of the first
        // run fails while page 2's is still unplaced.
        failing.failing = true
        let three = [UInt8](repeating: 9, count: 3 * PageSize.bytes)
        XCTAssertThrowsError(try three.withUnsafeBytes { try fs.write(ino, offset: 0, data: $0, caller: me, clearSetIDAsked: false) }) {
            XCTAssertEqual($0 as? Errno, .ioError)
        }
        failing.failing = false
        XCTAssertEqual(fs.storedBytes().used, Int64(2 * PageSize.bytes), "page 1, and page 0 placed before the failure")
    }
}
