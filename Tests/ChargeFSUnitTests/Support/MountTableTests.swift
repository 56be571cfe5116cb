import XCTest
@testable import ChargeFS

/// The one mountinfo parser and the one control-character filter.
final class MountTableTests: XCTestCase {
    func testParsesFieldsOptionalFieldsAndEscapes() {
        let text = """
        36 35 98:0 / /mnt/a\\040b rw,noatime master:1 shared:2 - fuse.chargefsd chargefs rw,user_id=0
        37 35 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
        garbage line
        38 35 0:32 /sub /x rw - tmpfs tmp\\134dir rw
        """
        let entries = MountTable.parse(text)
        XCTAssertEqual(entries.count, 3, "a malformed line is skipped")
        XCTAssertEqual(entries[0], MountTable.Entry(mountPoint: "/mnt/a b", fileSystemType: "fuse.chargefsd", source: "chargefs", root: "/"))
        XCTAssertEqual(entries[1].fileSystemType, "cgroup", "no optional fields")
        XCTAssertEqual(entries[2].source, "tmp\\dir")
        XCTAssertEqual(entries[2].root, "/sub")
        XCTAssertTrue(MountTable.current().contains { $0.mountPoint == "/" }, "this process's table has a root")
    }

    func testPrintableHidesControlCharacters() {
        XCTAssertEqual(printable("a\nb\u{1b}[2Jc\u{7f}é"), "a?b?[2Jc?é")
    }
}
