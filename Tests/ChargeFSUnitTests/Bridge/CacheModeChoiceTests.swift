import XCTest
@testable import ChargeFS

/// cache= automatic is direct on every kernel (a page-cache copy charged to a writer inside the
/// target lets the kernel OOM-kill it before 6.9); shared maps of direct-I/O files only from 6.9.
final class CacheModeChoiceTests: XCTestCase {
    func testAutomaticIsDirectEverywhere() {
        XCTAssertEqual(CacheModeChoice.resolve(.automatic), .direct)
        XCTAssertEqual(CacheModeChoice.resolve(.page), .page, "an explicit choice stands")
        XCTAssertEqual(CacheModeChoice.resolve(.direct), .direct)
    }

    func testSharedMapsOfDirectIOFrom69() {
        XCTAssertTrue(CacheModeChoice.mapsDirectIOShared(kernelRelease: "6.18.0-1-amd64"))
        XCTAssertTrue(CacheModeChoice.mapsDirectIOShared(kernelRelease: "6.9.0"))
        XCTAssertTrue(CacheModeChoice.mapsDirectIOShared(kernelRelease: "7.0.1"))
        XCTAssertFalse(CacheModeChoice.mapsDirectIOShared(kernelRelease: "6.8.12-generic"), "6.6-6.8 may lack the VM_MAYSHARE fix")
        XCTAssertFalse(CacheModeChoice.mapsDirectIOShared(kernelRelease: "6.1.0-57-amd64"))
        XCTAssertFalse(CacheModeChoice.mapsDirectIOShared(kernelRelease: "garbage"))
    }
}
