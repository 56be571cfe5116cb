import CFuse
import XCTest

final class FuseKillPrivTests: XCTestCase {
    /// FuseKillPriv reads and patches the flags of INIT's request and reply at byte 12, which must
    /// match the kernel's headers (the first four fields of every protocol version).
    func testInitFlagsOffsetMatchesKernelHeaders() {
        XCTAssertEqual(MemoryLayout<fuse_init_in>.offset(of: \.flags), 12)
        XCTAssertEqual(MemoryLayout<fuse_init_out>.offset(of: \.flags), 12)
    }
}
