import CFuse
import Glibc
import SystemPackage
import XCTest
@testable import ChargeFS

/// Counts charge calls (and does them, in this process).
final class CountingCharger: PageCharger, @unchecked Sendable {
    private let inner: DaemonCharger
    var calls = 0
    init(arena: FileDescriptor) { inner = DaemonCharger(arena: arena) }
    func charge(offset: Int64, length: Int64) throws(Errno) {
        calls += 1
        try inner.charge(offset: offset, length: length)
    }
    var summary: String { "counting" }
    func shutdown() {}
}

final class PageStoreTests: XCTestCase {
    /// One page at a time (a 4 KiB random write each) must be charged in batches, whether the
    /// pages are fresh or were punched out by an earlier free.
    func testSinglePageAllocationsAreChargedInBatches() throws {
        var made: CountingCharger?
        let store = try PageStore(capacityPages: 1 << 16) { arena in
            let c = CountingCharger(arena: arena)
            made = c
            return c
        }
        let charger = try XCTUnwrap(made)
        var pages: [UInt32] = []
        for _ in 0..<256 { try store.allocate(1, into: &pages) }
        XCTAssertLessThanOrEqual(charger.calls, 256 / PageStore.chargeBatch + 1, "fresh pages")
        var ones = [UInt8](repeating: 0xff, count: PageStore.pageSize)
        for page in pages { store.store(&ones, length: ones.count, page: page, inner: 0) }
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
}
