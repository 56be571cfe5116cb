// rename(2) and renameat2(2) flags, with tmpfs's errnos.

import Foundation
import Glibc
import XCTest

final class MountRenameTests: MountTestCase {
    func testRenameErrnoMatrixMatchesTmpfs() throws {
        try assertSameAsTmpfs("rename matrix") { dir, t in
            try FS.create(dir + "/f1", [1])
            try FS.create(dir + "/f2", [2])
            try FS.mkdir(dir + "/d1")
            try FS.mkdir(dir + "/d2")
            try FS.mkdir(dir + "/full")
            try FS.create(dir + "/full/x")
            try FS.mkdir(dir + "/d1/sub")
            try FS.mkdir(dir + "/d1/sub/deeper")
            try sys("link", link(dir + "/f1", dir + "/f1link"))
            func r(_ a: String, _ b: String) -> Int32 { rename(dir + "/" + a, dir + "/" + b) }
            func r2(_ a: String, _ b: String, _ f: UInt32) -> Int32 { Sys.renameat2(dir + "/" + a, dir + "/" + b, f) }
            record(&t, "file -> dir", r("f2", "d2"))
            record(&t, "dir -> file", r("d2", "f2"))
            record(&t, "dir -> non-empty dir", r("d2", "full"))
            record(&t, "dir -> own child", r("d1", "d1/sub/moved"))
            record(&t, "dir -> own grandchild", r("d1", "d1/sub/deeper/moved"))
            record(&t, "dir -> itself", r("d1", "d1"))
            record(&t, "missing -> x", r("nope", "x"))
            record(&t, "file -> missing/x", r("f2", "nope/x"))
            record(&t, "file -> file/x", r("f2", "f1/x"))
            record(&t, "hardlinks same inode", r("f1", "f1link"))
            record(&t, "  f1 still exists", FS.exists(dir + "/f1") ? 0 : -1)
            record(&t, "NOREPLACE onto file", r2("f2", "f1", LinuxConst.RENAME_NOREPLACE))
            record(&t, "NOREPLACE onto dir", r2("d2", "d1", LinuxConst.RENAME_NOREPLACE))
            record(&t, "NOREPLACE new name", r2("f2", "f3", LinuxConst.RENAME_NOREPLACE))
            record(&t, "EXCHANGE with missing", r2("f3", "nope", LinuxConst.RENAME_EXCHANGE))
            record(&t, "EXCHANGE|NOREPLACE", r2("f3", "f1", LinuxConst.RENAME_EXCHANGE | LinuxConst.RENAME_NOREPLACE))
            record(&t, "unknown flag 0x100", r2("f3", "f4", 0x100))
            record(&t, "EXCHANGE dir into own subtree", r2("d1", "d1/sub/deeper", LinuxConst.RENAME_EXCHANGE))
            record(&t, "dir -> empty dir", r("d2", "d1/sub/deeper"))
            record(&t, "file -> existing file", r("f3", "f1"))
            record(&t, "'.' as source", r("d1/.", "zz"))
            record(&t, "onto '..'", r("f1", "d1/.."))
            record(&t, "long target", r("f1", String(repeating: "n", count: 256)))
            t.append("final listing: \((try? FS.list(dir)) ?? [])")
            t.append("d1/sub listing: \((try? FS.list(dir + "/d1/sub")) ?? [])")
        }
    }

    func testRenameMovesContentAndReplacesTarget() throws {
        try FS.create(p("a"), Array("AAA".utf8))
        try FS.create(p("b"), Array("BBBB".utf8))
        let inoA = try FS.statOf(p("a")).st_ino
        // Keep the victim open: replaced inode must live on until closed.
        let victim = try FS.open(p("b"), O_RDONLY)
        defer { close(victim) }
        try sys("rename", rename(p("a"), p("b")))
        XCTAssertFalse(FS.exists(p("a")))
        XCTAssertEqual(String(decoding: try FS.contents(p("b")), as: UTF8.self), "AAA")
        XCTAssertEqual(try FS.statOf(p("b")).st_ino, inoA)
        XCTAssertEqual(try FS.fstatOf(victim).st_nlink, 0)
        XCTAssertEqual(String(decoding: try FS.read(victim, count: 10, at: 0), as: UTF8.self), "BBBB")
        // Across directories.
        try FS.mkdir(p("x"))
        try FS.mkdir(p("y"))
        try FS.create(p("x/f"), [5])
        try sys("rename", rename(p("x/f"), p("y/g")))
        XCTAssertEqual(try FS.list(p("x")), [])
        XCTAssertEqual(try FS.list(p("y")), ["g"])
        XCTAssertEqual(try FS.contents(p("y/g")), [5])
        // Moving a directory with contents.
        try FS.create(p("x/inner"), [6])
        try sys("rename", rename(p("x"), p("y/x")))
        XCTAssertEqual(try FS.contents(p("y/x/inner")), [6])
        XCTAssertErrno(EINVAL, rename(p("y"), p("y/x/y")))
        XCTAssertErrno(ENOTEMPTY, { () -> Int32 in try? FS.mkdir(p("z")); try? FS.create(p("z/q")); return rename(p("y"), p("z")) }())
        XCTAssertErrno(EISDIR, rename(p("b"), p("y")))
        XCTAssertErrno(ENOTDIR, rename(p("y"), p("b")))
    }

    func testRenameNoReplace() throws {
        try FS.create(p("a"), [1])
        try FS.create(p("b"), [2])
        XCTAssertErrno(EEXIST, Sys.renameat2(p("a"), p("b"), LinuxConst.RENAME_NOREPLACE))
        XCTAssertEqual(try FS.contents(p("a")), [1])
        XCTAssertEqual(try FS.contents(p("b")), [2])
        XCTAssertErrno(0, Sys.renameat2(p("a"), p("c"), LinuxConst.RENAME_NOREPLACE))
        XCTAssertEqual(try FS.contents(p("c")), [1])
        XCTAssertFalse(FS.exists(p("a")))
    }

    func testRenameExchange() throws {
        try FS.create(p("a"), Array("file-a".utf8))
        try FS.mkdir(p("d"))
        try FS.create(p("d/inside"), [9])
        try FS.mkdir(p("other"))
        let inoA = try FS.lstatOf(p("a")).st_ino
        let inoD = try FS.lstatOf(p("d")).st_ino
        let rootLinks = try FS.statOf(root).st_nlink
        // File <-> directory across parents.
        XCTAssertErrno(0, Sys.renameat2(p("a"), p("other/../d"), LinuxConst.RENAME_EXCHANGE))
        XCTAssertEqual(try FS.lstatOf(p("a")).st_ino, inoD)
        XCTAssertEqual(try FS.lstatOf(p("d")).st_ino, inoA)
        XCTAssertEqual(try FS.contents(p("a/inside")), [9])
        XCTAssertEqual(String(decoding: try FS.contents(p("d")), as: UTF8.self), "file-a")
        XCTAssertEqual(try FS.statOf(root).st_nlink, rootLinks)
        // Exchange between different directories: nlink of parents follows the directory.
        try FS.create(p("other/f"), [3])
        let otherLinks = try FS.statOf(p("other")).st_nlink
        XCTAssertErrno(0, Sys.renameat2(p("a"), p("other/f"), LinuxConst.RENAME_EXCHANGE))
        XCTAssertEqual(try FS.statOf(p("other")).st_nlink, otherLinks + 1)
        XCTAssertEqual(try FS.statOf(root).st_nlink, rootLinks - 1)
        XCTAssertEqual(try FS.contents(p("other/f/inside")), [9])
        XCTAssertEqual(try FS.contents(p("a")), [3])
        XCTAssertEqual(try FS.statOf(p("other/f/..")).st_ino, try FS.statOf(p("other")).st_ino)
        // Errors.
        XCTAssertErrno(ENOENT, Sys.renameat2(p("a"), p("missing"), LinuxConst.RENAME_EXCHANGE))
        XCTAssertErrno(EINVAL, Sys.renameat2(p("a"), p("d"), LinuxConst.RENAME_EXCHANGE | LinuxConst.RENAME_NOREPLACE))
        XCTAssertErrno(EINVAL, Sys.renameat2(p("other"), p("other/f"), LinuxConst.RENAME_EXCHANGE))
    }

    func testRenameTimestampsMatchTmpfs() throws {
        try assertSameAsTmpfs("rename timestamps") { dir, t in
            try FS.mkdir(dir + "/src")
            try FS.mkdir(dir + "/dst")
            try FS.create(dir + "/src/f", [1])
            func st(_ rel: String) -> StatBuf { var s = StatBuf(); lstat(dir + "/" + rel, &s); return s }
            let f0 = st("src/f"), s0 = st("src"), d0 = st("dst")
            tick()
            record(&t, "rename src/f dst/g", rename(dir + "/src/f", dir + "/dst/g"))
            let f1 = st("dst/g"), s1 = st("src"), d1 = st("dst")
            t.append("file ctime changed=\(f1.ctimeNs != f0.ctimeNs) mtime changed=\(f1.mtimeNs != f0.mtimeNs)")
            t.append("src mtime changed=\(s1.mtimeNs != s0.mtimeNs) ctime changed=\(s1.ctimeNs != s0.ctimeNs)")
            t.append("dst mtime changed=\(d1.mtimeNs != d0.mtimeNs) ctime changed=\(d1.ctimeNs != d0.ctimeNs)")
        }
    }
}
