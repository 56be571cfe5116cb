import CFuse
import Glibc
import XCTest
@testable import ChargeFS

/// Takeover mounts map an arena page when a reply first reads it (`PageStore.mapForReply`), not
/// when it is charged: a write maps nothing, a read maps its pages once, a punch unmaps them and
/// clears their bits, so that the next read maps them again.
final class MappedPagesTests: XCTestCase {
    func testBitsAcrossWords() throws {
        let bits = try XCTUnwrap(MappedPages(capacityPages: 1000))
        XCTAssertFalse(bits.allMapped(first: 60, count: 10))
        bits.set(first: 60, count: 10, mapped: true)
        XCTAssertTrue(bits.allMapped(first: 60, count: 10))
        XCTAssertTrue(bits.allMapped(first: 63, count: 2))
        XCTAssertFalse(bits.allMapped(first: 59, count: 2))
        XCTAssertFalse(bits.allMapped(first: 69, count: 2))
        bits.set(first: 0, count: 200, mapped: true)
        XCTAssertTrue(bits.allMapped(first: 0, count: 200))
        bits.set(first: 64, count: 1, mapped: false)
        XCTAssertFalse(bits.allMapped(first: 0, count: 200))
        XCTAssertTrue(bits.allMapped(first: 65, count: 135))
    }

    /// Pages of `store`'s arena with a page-table entry in this process (pagemap bit 63).
    private func present(_ store: PageStore, _ pages: [UInt32]) throws -> Int {
        let fd = open("/proc/self/pagemap", O_RDONLY)
        guard fd >= 0 else { throw XCTSkip("no /proc/self/pagemap") }
        defer { close(fd) }
        var n = 0
        for page in pages {
            var entry: UInt64 = 0
            let at = off_t(UInt(bitPattern: store.address(of: page)) / UInt(PageSize.bytes) * 8)
            XCTAssertEqual(pread(fd, &entry, 8, at), 8)
            if entry >> 63 != 0 { n += 1 }
        }
        return n
    }

    func testWriteMapsNothingReadMapsOncePunchUnmaps() throws {
        let store = try PageStore(capacityPages: 1 << 12) { arena in FakeCharger(arena: arena) }
        store.mapsChargedPages = true
        var pages: [UInt32] = []
        try store.allocate(64, into: &pages)
        var data = [UInt8](repeating: 0x5a, count: PageSize.bytes)
        for page in pages { try store.store(&data, length: data.count, page: page, inner: 0) }
        XCTAssertEqual(try present(store, pages), 0, "a charge and a write map nothing")
        let sorted = pages.sorted()
        XCTAssertEqual(sorted.last.map { Int($0) }, Int(sorted[0]) + 63, "one run")
        store.mapForReply(iovec(iov_base: store.address(of: sorted[0]), iov_len: 64 * PageSize.bytes))
        XCTAssertEqual(try present(store, pages), 64, "the read mapped the pages it replies from")
        store.free(pages)
        store.trimReserve()  // every page punched: unmapped, and their bits cleared
        XCTAssertEqual(try present(store, pages), 0)
        var again: [UInt32] = []
        try store.allocate(64, into: &again)
        for page in again { try store.store(&data, length: data.count, page: page, inner: 0) }
        for page in again { store.mapForReply(iovec(iov_base: store.address(of: page), iov_len: PageSize.bytes)) }
        XCTAssertEqual(try present(store, again), 64, "pages punched and handed out again are mapped again")
    }
}
