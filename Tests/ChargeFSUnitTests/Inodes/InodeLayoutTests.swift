import Glibc
import XCTest
@testable import ChargeFS

/// Every file costs one `Inode` on the heap, so its size is the daemon's memory per file (the
/// benchmark's "daemon RSS per 100,000 empty files"). Fields added for takeover and per-directory
/// targets had taken it from a 176-byte heap block to 192; rare ones now live in the inode's
/// `Rare` box or share 32 bits, and this keeps it at 176.
final class InodeLayoutTests: XCTestCase {
    /// glibc's malloc_usable_size (malloc.h, which the Glibc module does not export).
    @_silgen_name("malloc_usable_size")
    static func mallocUsableSize(_ pointer: UnsafeMutableRawPointer?) -> Int

    func testAnInodeTakesA176ByteHeapBlock() {
        let inode = Inode(ino: InodeNumber(rawValue: 2), mode: 0o100644, uid: 0, gid: 0, now: timespec())
        let usable = Self.mallocUsableSize(Unmanaged.passUnretained(inode).toOpaque())
        XCTAssertLessThanOrEqual(usable, 168, "glibc's block for the object: 8 bytes of header, then this")
        XCTAssertEqual(MemoryLayout<PageMap>.size, 20, "the map leaves 4 bytes for passthroughOpens")
    }

    /// The bits that share a word keep their own values.
    func testTargetAndItsOwnershipShareAWord() {
        let inode = Inode(ino: InodeNumber(rawValue: 3), mode: 0o040755, uid: 0, gid: 0, now: timespec())
        inode.chargeTarget = 5
        inode.ownsTarget = true
        XCTAssertEqual(inode.chargeTarget, 5)
        XCTAssertTrue(inode.ownsTarget)
        inode.chargeTarget = (1 << 20) - 1
        XCTAssertTrue(inode.ownsTarget)
        inode.ownsTarget = false
        XCTAssertEqual(inode.chargeTarget, (1 << 20) - 1)
        XCTAssertFalse(inode.ownsTarget)
        inode.passthroughID = 7
        XCTAssertEqual(inode.passthroughID, 7)
        inode.passthroughID = 0
        XCTAssertEqual(inode.passthroughID, 0)
    }
}
