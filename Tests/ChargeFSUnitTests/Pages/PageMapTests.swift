import TestSupport
import XCTest
@testable import ChargeFS

/// The sparse page table of one file: chunks of 512 slots (2 MiB of file) exist only where data is.
final class PageMapTests: XCTestCase {
    let slots = PageMap.chunkSlots

    func testEmptyMapIsAllHoles() {
        let map = PageMap()
        XCTAssertEqual(map.count, 0)
        XCTAssertEqual(map.page(at: 0), 0)
        XCTAssertEqual(map.page(at: 1 << 50), 0)
        XCTAssertNil(map.nextData(from: 0))
        XCTAssertEqual(map.nextHole(from: 12345), 12345)
    }

    func testSparseSetAndGetAcrossChunkBoundaries() {
        var map = PageMap()
        let placed: [(index: Int, page: UInt32)] = [
            (slots - 1, 7), (slots, 8), (2 * slots - 1, 9), (2 * slots, 10), (1 << 40, 11),
        ]
        for (index, page) in placed { map.set(page, at: index) }
        for (index, page) in placed { XCTAssertEqual(map.page(at: index), page, "index \(index)") }
        XCTAssertEqual(map.count, placed.count)
        XCTAssertEqual(map.chunks.count, 4, "one chunk per 2 MiB of file that holds data, none between")
        for hole in [0, slots - 2, slots + 1, 2 * slots + 1, (1 << 40) - 1, (1 << 40) + 1] {
            XCTAssertEqual(map.page(at: hole), 0, "index \(hole)")
        }
    }

    func testRemoveReturnsPagesInFileOrderAndDropsEmptyChunks() {
        var map = PageMap()
        for (i, index) in [3, slots - 1, slots, slots + 5, 2 * slots, 5 * slots].enumerated() {
            map.set(UInt32(100 + i), at: index)
        }
        var freed: [UInt32] = []
        map.remove(from: slots - 1, to: 2 * slots + 1, into: &freed)  // across three chunks
        XCTAssertEqual(freed, [101, 102, 103, 104])
        XCTAssertEqual(map.count, 2)
        XCTAssertEqual(map.page(at: 3), 100, "the part of a chunk before the range stays")
        XCTAssertEqual(map.page(at: 5 * slots), 105)
        XCTAssertEqual(map.chunks.count, 2, "chunks 1 and 2 emptied and dropped")
        freed.removeAll()
        map.remove(from: 4, to: 4, into: &freed)  // empty range
        map.remove(from: 10, to: 5, into: &freed)  // reversed range
        XCTAssertEqual(freed, [])
        XCTAssertEqual(map.count, 2)
    }

    /// Truncation removes to the end of the map; a range far wider than the map visits only the
    /// chunks that exist (a file truncated from 2^62 bytes must not walk 2^53 chunk keys).
    func testTruncateFromAnywhereToTheEnd() {
        var map = PageMap()
        for index in [0, 1, slots, 1 << 45, 1 << 52] { map.set(UInt32(index % 1000 + 1), at: index) }
        var freed: [UInt32] = []
        map.remove(from: 1, to: Int.max >> 1, into: &freed)
        XCTAssertEqual(freed.count, 4)
        XCTAssertEqual(map.count, 1)
        XCTAssertEqual(map.page(at: 0), 1)
        XCTAssertNil(map.nextData(from: 1))
        map.remove(from: 0, to: Int.max >> 1, into: &freed)
        XCTAssertEqual(map.count, 0)
        XCTAssertTrue(map.chunks.isEmpty)
        // A hole can be filled again after it was emptied.
        map.set(42, at: slots)
        XCTAssertEqual(map.page(at: slots), 42)
        XCTAssertEqual(map.count, 1)
    }

    /// nextData walks data in file order whatever order it was stored in; nextHole finds the gaps.
    func testIterationIsInFileOrder() {
        var random = SplitMix64(seed: 11)
        var indices = Set<Int>()
        while indices.count < 300 { indices.insert(Int(random.next() % UInt64(8 * slots))) }
        var map = PageMap()
        for (n, index) in indices.shuffled(using: &random).enumerated() { map.set(UInt32(n + 1), at: index) }
        var seen: [Int] = []
        var cursor = 0
        while let next = map.nextData(from: cursor) {
            seen.append(next)
            cursor = next + 1
        }
        XCTAssertEqual(seen, indices.sorted())
        for index in 0..<(8 * slots) {
            let hole = map.nextHole(from: index)
            XCTAssertFalse(indices.contains(hole), "nextHole(\(index)) = \(hole) holds data")
            XCTAssertTrue((index..<hole).allSatisfy(indices.contains), "a hole skipped before \(hole)")
        }
    }

    func testNextHoleSkipsFullChunks() {
        var map = PageMap()
        for index in slots..<(3 * slots) { map.set(UInt32(index), at: index) }  // chunks 1 and 2 full
        XCTAssertEqual(map.nextHole(from: slots), 3 * slots)
        XCTAssertEqual(map.nextHole(from: slots - 1), slots - 1)
        XCTAssertEqual(map.nextData(from: 0), slots)
        XCTAssertEqual(map.nextData(from: 3 * slots - 1), 3 * slots - 1)
        XCTAssertNil(map.nextData(from: 3 * slots))
        XCTAssertEqual(map.count, 2 * slots)
    }

    /// With a limit the walk stops there: the limit when no hole is below it, else the hole.
    func testNextHoleStopsAtItsLimit() {
        var map = PageMap()
        for index in 0..<(4 * slots) where index != 3 * slots + 7 { map.set(UInt32(index + 1), at: index) }
        XCTAssertEqual(map.nextHole(from: 5, before: 6), 6)
        XCTAssertEqual(map.nextHole(from: 0, before: 3 * slots), 3 * slots)
        XCTAssertEqual(map.nextHole(from: slots + 3, before: 3 * slots + 7), 3 * slots + 7)
        XCTAssertEqual(map.nextHole(from: slots + 3, before: 3 * slots + 8), 3 * slots + 7)
        XCTAssertEqual(map.nextHole(from: 0, before: Int.max), 3 * slots + 7)
        XCTAssertEqual(map.nextHole(from: 3 * slots + 8, before: 5 * slots), 4 * slots)
        XCTAssertEqual(map.nextHole(from: 9 * slots, before: 10 * slots), 9 * slots)
        // The random map of testIterationIsInFileOrder, every limit: min(first hole, limit).
        var random = SplitMix64(seed: 12)
        var sparse = PageMap()
        for _ in 0..<400 {
            let index = Int(random.next() % UInt64(4 * slots))
            if sparse.page(at: index) == 0 { sparse.set(1, at: index) }
        }
        for from in stride(from: 0, to: 4 * slots, by: 37) {
            for limit in stride(from: from + 1, to: 4 * slots + 1, by: 53) {
                XCTAssertEqual(sparse.nextHole(from: from, before: limit), min(sparse.nextHole(from: from), limit),
                               "nextHole(\(from), before: \(limit))")
            }
        }
    }
}
