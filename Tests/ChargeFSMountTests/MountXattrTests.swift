// Extended attributes: user./trusted./security., flags, ENODATA, ERANGE, listing.

import Foundation
import Glibc
import XCTest

final class MountXattrTests: MountTestCase {
    func testSetGetListRemove() throws {
        let f = p("f")
        try FS.create(f)
        let value: [UInt8] = [0, 1, 2, 0xff, 0, 42]    // binary, embedded NULs
        XCTAssertErrno(0, Sys.setxattr(f, "user.bin", value))
        XCTAssertErrno(0, Sys.setxattr(f, "user.empty", []))
        XCTAssertErrno(0, Sys.setxattr(f, "trusted.t", Array("tv".utf8)))
        XCTAssertErrno(0, Sys.setxattr(f, "security.s", Array("sv".utf8)))
        // Size query, exact read, too-small buffer.
        XCTAssertEqual(Sys.getxattr(f, "user.bin", size: 0).0, 6)
        let (n, got) = Sys.getxattr(f, "user.bin", size: 100)
        XCTAssertEqual(n, 6)
        XCTAssertEqual(got, value)
        let small = Sys.getxattr(f, "user.bin", size: 3)
        XCTAssertEqual(small.0, -1)
        XCTAssertEqual(errnoName(errno), "ERANGE")
        XCTAssertEqual(Sys.getxattr(f, "user.empty", size: 10).0, 0)
        XCTAssertEqual(Sys.getxattr(f, "trusted.t", size: 10).1, Array("tv".utf8))
        XCTAssertEqual(Sys.getxattr(f, "security.s", size: 10).1, Array("sv".utf8))
        // Missing attribute.
        XCTAssertEqual(Sys.getxattr(f, "user.missing", size: 10).0, -1)
        XCTAssertEqual(errnoName(errno), "ENODATA")
        // Listing.
        let (lsize, _) = Sys.listxattr(f, size: 0)
        XCTAssertGreaterThan(lsize, 0)
        let (lr, names) = Sys.listxattr(f, size: lsize)
        XCTAssertEqual(lr, lsize)
        XCTAssertTrue(Set(names).isSuperset(of: ["user.bin", "user.empty", "trusted.t", "security.s"]), "\(names)")
        let tooSmall = Sys.listxattr(f, size: 3)
        XCTAssertEqual(tooSmall.0, -1)
        XCTAssertEqual(errnoName(errno), "ERANGE")
        // XATTR_CREATE / XATTR_REPLACE.
        XCTAssertErrno(EEXIST, Sys.setxattr(f, "user.bin", [1], LinuxConst.XATTR_CREATE))
        XCTAssertErrno(ENODATA, Sys.setxattr(f, "user.new", [1], LinuxConst.XATTR_REPLACE))
        XCTAssertErrno(0, Sys.setxattr(f, "user.bin", [7, 7], LinuxConst.XATTR_REPLACE))
        XCTAssertEqual(Sys.getxattr(f, "user.bin", size: 10).1, [7, 7])
        XCTAssertErrno(0, Sys.setxattr(f, "user.new", [8], LinuxConst.XATTR_CREATE))
        // Remove.
        XCTAssertErrno(0, Sys.removexattr(f, "user.bin"))
        XCTAssertErrno(ENODATA, Sys.removexattr(f, "user.bin"))
        XCTAssertEqual(Sys.getxattr(f, "user.bin", size: 10).0, -1)
        XCTAssertFalse(Sys.listxattr(f, size: 4096).1.contains("user.bin"))
        // fd variants.
        let fd = try FS.open(f, O_RDONLY)
        defer { close(fd) }
        XCTAssertErrno(0, Sys.fsetxattr(fd, "user.viafd", [5]))
        XCTAssertEqual(Sys.fgetxattr(fd, "user.viafd", size: 4).1, [5])
        // Attributes survive rename and are per-inode (shared by hard links).
        try sys("link", link(f, p("hl")))
        try sys("rename", rename(f, p("renamed")))
        XCTAssertEqual(Sys.getxattr(p("hl"), "user.viafd", size: 4).1, [5])
        XCTAssertEqual(Sys.getxattr(p("renamed"), "user.new", size: 4).1, [8])
    }

    func testXattrLimitsAndFileTypesMatchTmpfs() throws {
        try assertSameAsTmpfs("xattr limits and file types") { dir, t in
            let f = dir + "/f"
            try FS.create(f)
            try FS.mkdir(dir + "/d")
            try sys("symlink", symlink("f", dir + "/l"))
            mkfifo(dir + "/fifo", 0o644)
            record(&t, "dir user.x", Sys.setxattr(dir + "/d", "user.x", [1]))
            t.append("dir get: \(Sys.getxattr(dir + "/d", "user.x", size: 4).1)")
            record(&t, "symlink lsetxattr user.x", Sys.setxattr(dir + "/l", "user.x", [1], nofollow: true))
            record(&t, "symlink lsetxattr trusted.x", Sys.setxattr(dir + "/l", "trusted.x", [1], nofollow: true))
            record(&t, "fifo user.x", Sys.setxattr(dir + "/fifo", "user.x", [1]))
            record(&t, "unknown namespace", Sys.setxattr(f, "bogus.x", [1]))
            record(&t, "no namespace", Sys.setxattr(f, "plain", [1]))
            record(&t, "empty name", Sys.setxattr(f, "", [1]))
            record(&t, "bare prefix user.", Sys.setxattr(f, "user.", [1]))
            record(&t, "255-byte name", Sys.setxattr(f, "user." + String(repeating: "n", count: 250), [1]))
            record(&t, "256-byte name", Sys.setxattr(f, "user." + String(repeating: "n", count: 251), [1]))
            record(&t, "64 KiB value", Sys.setxattr(f, "user.big", [UInt8](repeating: 3, count: 65_536)))
            record(&t, "64 KiB + 1 value", Sys.setxattr(f, "user.big2", [UInt8](repeating: 3, count: 65_537)))
            t.append("big size: \(Sys.getxattr(f, "user.big", size: 0).0)")
            record(&t, "XATTR_CREATE|XATTR_REPLACE", Sys.setxattr(f, "user.y", [1], LinuxConst.XATTR_CREATE | LinuxConst.XATTR_REPLACE))
            record(&t, "flags 4", Sys.setxattr(f, "user.y", [1], 4))
            record(&t, "remove missing", Sys.removexattr(f, "user.never"))
            recordInt(&t, "get on missing file", Sys.getxattr(dir + "/nope", "user.x", size: 4).0)
            t.append("list f: \(Sys.listxattr(f, size: 1 << 16).1.sorted())")
        }
    }

    func testManyAttributesOnOneFile() throws {
        let f = p("many")
        try FS.create(f)
        for i in 0..<200 {
            XCTAssertErrno(0, Sys.setxattr(f, "user.k\(i)", Array("value-\(i)".utf8)), "set user.k\(i)")
        }
        let names = Sys.listxattr(f, size: 1 << 16).1
        XCTAssertEqual(Set(names.filter { $0.hasPrefix("user.k") }).count, 200)
        for i in stride(from: 0, to: 200, by: 37) {
            XCTAssertEqual(String(decoding: Sys.getxattr(f, "user.k\(i)", size: 64).1, as: UTF8.self), "value-\(i)")
        }
    }
}
