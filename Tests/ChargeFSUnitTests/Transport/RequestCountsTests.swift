import CFuse
@testable import ChargeFS
import XCTest

final class RequestCountsTests: XCTestCase {
    private func count(_ counts: RequestCounts, opcode: UInt32, length: Int = MemoryLayout<fuse_in_header>.size + 8) {
        var bytes = [UInt8](repeating: 0, count: max(length, MemoryLayout<fuse_in_header>.size))
        var header = fuse_in_header()
        header.opcode = opcode
        header.len = UInt32(length)
        withUnsafeBytes(of: header) { bytes.replaceSubrange(0..<$0.count, with: $0) }
        bytes.withUnsafeBytes { counts.count(request: $0.baseAddress, length: length) }
    }

    func testCountsByKindInOpcodeOrder() {
        let counts = RequestCounts()
        XCTAssertEqual(counts.text, "")
        for _ in 0..<3 { count(counts, opcode: FUSE_GETATTR.rawValue) }
        count(counts, opcode: FUSE_LOOKUP.rawValue)
        count(counts, opcode: 52)
        count(counts, opcode: 4096)  // CUSE_INIT: not a FUSE request
        XCTAssertEqual(counts.text, "LOOKUP=1\nGETATTR=3\nSTATX=1\nOTHER=1\n")
    }

    func testShortOrMissingInputIsNotCounted() {
        let counts = RequestCounts()
        count(counts, opcode: FUSE_WRITE.rawValue, length: MemoryLayout<fuse_in_header>.size - 1)
        counts.count(request: nil, length: 100)
        counts.count(request: nil, length: -1)
        XCTAssertEqual(counts.text, "")
    }
}
