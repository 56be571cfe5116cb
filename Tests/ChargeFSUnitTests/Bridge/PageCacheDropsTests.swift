import Dispatch
import XCTest
@testable import ChargeFS

/// The marks of files whose mapped pages were written back (PageCacheDrops): a mark is taken
/// once, per inode, whichever shard holds it; the kernel side is passthrough.sh
/// mmap_cache_dropped.
final class PageCacheDropsTests: XCTestCase {
    func testAMarkIsTakenOnceAndOnlyForItsInode() {
        let drops = PageCacheDrops()
        XCTAssertFalse(drops.take(7), "nothing marked")
        drops.noteWriteback(7)
        drops.noteWriteback(7)
        XCTAssertEqual(drops.markedCount, 1, "two writebacks of one file: one mark")
        XCTAssertFalse(drops.take(8), "another inode (maybe of the same shard) is not marked")
        XCTAssertTrue(drops.take(7))
        XCTAssertFalse(drops.take(7), "taken once")
        XCTAssertEqual(drops.markedCount, 0)
    }

    /// Inodes spread over every shard, marked and taken from 8 threads at once: each mark taken
    /// exactly once, none left.
    func testConcurrentMarksAndTakesLoseNothing() {
        let drops = PageCacheDrops()
        let perThread = 20_000, threads = 8
        let taken = (0..<threads).map { _ in Box() }
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for i in 0..<perThread {
                let ino = InodeNumber(rawValue: UInt64(t * perThread + i + 2))
                if i % 3 == 0 { drops.noteWriteback(ino) }
                if drops.take(ino) { taken[t].count += 1 }
                XCTAssertFalse(drops.take(ino))
            }
        }
        XCTAssertEqual(taken.reduce(0) { $0 + $1.count }, threads * ((perThread + 2) / 3))
        XCTAssertEqual(drops.markedCount, 0)
    }

    private final class Box: @unchecked Sendable { var count = 0 }
}
