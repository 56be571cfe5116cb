// Metadata: chmod/chown (setuid/setgid clearing), utimensat, timestamp updates, ownership.

import Foundation
import Glibc
import XCTest

func utimens(_ path: String, atime: (Int, Int), mtime: (Int, Int), flags: Int32 = 0) -> Int32 {
    var ts = [timespec(tv_sec: atime.0, tv_nsec: atime.1), timespec(tv_sec: mtime.0, tv_nsec: mtime.1)]
    return utimensat(AT_FDCWD, path, &ts, flags)
}

func modeString(_ path: String) -> String {
    var st = StatBuf()
    return lstat(path, &st) == 0 ? String(st.perm, radix: 8) : errnoName(errno)
}

final class MountAttrsTests: MountTestCase {
    func testChmodChangesModeAndCtimeOnly() throws {
        let f = p("f")
        try FS.create(f, [1])
        let before = try FS.statOf(f)
        tick()
        try sys("chmod", chmod(f, 0o4751))
        let after = try FS.statOf(f)
        XCTAssertEqual(after.perm, 0o4751)
        XCTAssertEqual(after.fileType, S_IFREG)
        XCTAssertNotEqual(after.ctimeNs, before.ctimeNs, "chmod must update ctime")
        XCTAssertEqual(after.mtimeNs, before.mtimeNs, "chmod must not update mtime")
        try sys("chmod", chmod(f, 0))
        XCTAssertEqual(try FS.statOf(f).perm, 0)
        // Root still reads a mode-000 file, as on tmpfs.
        XCTAssertEqual(try FS.contents(f), [1])
        try FS.mkdir(p("d"))
        try sys("chmod", chmod(p("d"), 0o1777))
        XCTAssertEqual(try FS.statOf(p("d")).perm, 0o1777)
        XCTAssertEqual(try FS.statOf(p("d")).fileType, S_IFDIR)
        // fchmod on an open fd.
        let fd = try FS.open(p("d/g"), O_CREAT | O_RDWR, 0o600)
        defer { close(fd) }
        try sys("fchmod", fchmod(fd, 0o640))
        XCTAssertEqual(try FS.fstatOf(fd).perm, 0o640)
    }

    func testChownAndSetidClearingMatchTmpfs() throws {
        try assertSameAsTmpfs("chown / setid clearing") { dir, t in
            for (name, mode) in [("suid-gx", 0o6755), ("sgid-nogx", 0o2745), ("suid-only", 0o4700)] as [(String, mode_t)] {
                let f = dir + "/" + name
                try FS.create(f, [1])
                chmod(f, mode)
                record(&t, "\(name) chown 1000:1000", chown(f, 1000, 1000))
                t.append("  \(name) mode after chown=\(modeString(f))")
                chmod(f, mode)
                record(&t, "\(name) chown -1:-1", chown(f, UInt32.max, UInt32.max))
                t.append("  \(name) mode after no-op chown=\(modeString(f))")
                chmod(f, mode)
                record(&t, "\(name) truncate by root", truncate(f, 0))
                t.append("  \(name) mode after truncate=\(modeString(f))")
                chmod(f, mode)
                let fd = open(f, O_WRONLY)
                var b: UInt8 = 1
                recordInt(&t, "\(name) write by root", Glibc.write(fd, &b, 1))
                close(fd)
                t.append("  \(name) mode after root write=\(modeString(f))")
                var st = StatBuf()
                lstat(f, &st)
                t.append("  \(name) owner=\(st.st_uid):\(st.st_gid)")
            }
            try FS.mkdir(dir + "/sgdir")
            chmod(dir + "/sgdir", 0o2775)
            record(&t, "chown sgid dir", chown(dir + "/sgdir", 1000, 1000))
            t.append("  sgdir mode=\(modeString(dir + "/sgdir"))")
            try sys("symlink", symlink("target", dir + "/lnk"))
            record(&t, "lchown symlink", lchown(dir + "/lnk", 1234, 4321))
            var st = StatBuf()
            lstat(dir + "/lnk", &st)
            t.append("  symlink owner=\(st.st_uid):\(st.st_gid)")
        }
        let f = p("own")
        try FS.create(f, [1])
        try sys("chown", chown(f, 1000, 2000))
        let st = try FS.statOf(f)
        XCTAssertEqual(st.st_uid, 1000)
        XCTAssertEqual(st.st_gid, 2000)
        try sys("chmod", chmod(f, 0o6755))
        try sys("chown", chown(f, 1001, 2001))
        XCTAssertEqual(try FS.statOf(f).perm, 0o755, "chown clears setuid and setgid (group-exec)")
    }

    /// File capabilities go when the file is written or truncated, even by root, as on tmpfs.
    func testWriteRemovesFileCapabilitiesLikeTmpfs() throws {
        // vfs_cap_data revision 2, effective, permitted CAP_NET_RAW (bit 13).
        let caps: [UInt8] = [0x01, 0, 0, 0x02, 0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        try assertSameAsTmpfs("security.capability on write") { dir, t in
            for how in ["write", "truncate", "chown"] {
                let f = dir + "/" + how
                try FS.create(f, [1, 2, 3])
                record(&t, "\(how): set capability", Sys.setxattr(f, "security.capability", caps))
                t.append("  before: \(Sys.getxattr(f, "security.capability", size: 64).0)")
                switch how {
                case "write":
                    let fd = open(f, O_WRONLY)
                    var b: UInt8 = 1
                    recordInt(&t, "write", Glibc.write(fd, &b, 1))
                    close(fd)
                case "truncate": record(&t, "truncate", truncate(f, 1))
                default: record(&t, "chown", chown(f, 1000, 1000))
                }
                t.append("  after: \(Sys.getxattr(f, "security.capability", size: 64).0)")
            }
        }
    }

    func testCreatedFilesOwnedByCallerAndUmaskApplied() throws {
        try FS.create(p("f"), [], mode: 0o666)
        let st = try FS.statOf(p("f"))
        XCTAssertEqual(st.st_uid, getuid())
        XCTAssertEqual(st.st_gid, getgid())
        XCTAssertEqual(st.perm, 0o666 & ~currentUmask())
        // Root dir defaults like tmpfs: mode 1777, owned by the mounter.
        let t = try mountTmpfs()
        let ours = try FS.statOf(root), ref = try FS.statOf(t.mountpoint)
        XCTAssertEqual(String(ours.perm, radix: 8), String(ref.perm, radix: 8), "root dir mode")
        XCTAssertEqual(ours.st_uid, ref.st_uid)
        XCTAssertEqual(ours.st_gid, ref.st_gid)
    }

    func testSetgidDirectoryInheritanceMatchesTmpfs() throws {
        try assertSameAsTmpfs("setgid dir inheritance") { dir, t in
            try FS.mkdir(dir + "/sg")
            chown(dir + "/sg", 0, 4242)
            chmod(dir + "/sg", 0o2775)
            try FS.create(dir + "/sg/file")
            try FS.mkdir(dir + "/sg/sub", 0o755)
            mkfifo(dir + "/sg/fifo", 0o644)
            symlink("x", dir + "/sg/lnk")
            for n in ["file", "sub", "fifo", "lnk"] {
                var st = StatBuf()
                lstat(dir + "/sg/" + n, &st)
                t.append("\(n): gid=\(st.st_gid) mode=\(String(st.perm, radix: 8))")
            }
            try FS.create(dir + "/sg/sub/deep")
            var st = StatBuf()
            lstat(dir + "/sg/sub/deep", &st)
            t.append("sub/deep gid=\(st.st_gid)")
        }
        try FS.mkdir(p("sg2"))
        try sys("chown", chown(p("sg2"), 0, 777))
        try sys("chmod", chmod(p("sg2"), 0o2777))
        try FS.mkdir(p("sg2/child"))
        let c = try FS.statOf(p("sg2/child"))
        XCTAssertEqual(c.st_gid, 777)
        XCTAssertEqual(c.perm & S_ISGID, S_ISGID, "subdirectory inherits the setgid bit")
    }

    func testUtimensatExplicitNowOmitAndNanoseconds() throws {
        let f = p("t")
        try FS.create(f, [1])
        // Explicit times with full nanosecond precision.
        XCTAssertErrno(0, utimens(f, atime: (1_000_000_000, 123_456_789), mtime: (1_500_000_000, 987_654_321)))
        var st = try FS.statOf(f)
        XCTAssertEqual(st.st_atim.tv_sec, 1_000_000_000)
        XCTAssertEqual(st.st_atim.tv_nsec, 123_456_789)
        XCTAssertEqual(st.st_mtim.tv_sec, 1_500_000_000)
        XCTAssertEqual(st.st_mtim.tv_nsec, 987_654_321)
        let ctime1 = st.ctimeNs
        tick()
        // UTIME_OMIT on atime, UTIME_NOW on mtime.
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        XCTAssertErrno(0, utimens(f, atime: (0, LinuxConst.UTIME_OMIT), mtime: (0, LinuxConst.UTIME_NOW)))
        st = try FS.statOf(f)
        XCTAssertEqual(st.st_atim.tv_sec, 1_000_000_000, "UTIME_OMIT keeps atime")
        XCTAssertEqual(st.st_atim.tv_nsec, 123_456_789)
        XCTAssertLessThanOrEqual(abs(st.st_mtim.tv_sec - now.tv_sec), 2, "UTIME_NOW sets mtime to now")
        XCTAssertGreaterThan(st.ctimeNs, ctime1, "utimensat updates ctime")
        // Both omitted: nothing changes.
        let snapshot = try FS.statOf(f)
        tick()
        XCTAssertErrno(0, utimens(f, atime: (0, LinuxConst.UTIME_OMIT), mtime: (0, LinuxConst.UTIME_OMIT)))
        let same = try FS.statOf(f)
        XCTAssertEqual(same.mtimeNs, snapshot.mtimeNs)
        XCTAssertEqual(same.atimeNs, snapshot.atimeNs)
        // Pre-epoch and far-future times.
        XCTAssertErrno(0, utimens(f, atime: (-86_400, 5), mtime: (4_102_444_800, 999_999_999)))
        st = try FS.statOf(f)
        XCTAssertEqual(st.st_atim.tv_sec, -86_400)
        XCTAssertEqual(st.st_atim.tv_nsec, 5)
        XCTAssertEqual(st.st_mtim.tv_sec, 4_102_444_800)
        XCTAssertEqual(st.st_mtim.tv_nsec, 999_999_999)
        // Invalid nsec.
        XCTAssertErrno(EINVAL, utimens(f, atime: (0, 1_000_000_000), mtime: (0, 0)))
        // On a symlink itself.
        try sys("symlink", symlink("t", p("l")))
        XCTAssertErrno(0, utimens(p("l"), atime: (10, 1), mtime: (20, 2), flags: AT_SYMLINK_NOFOLLOW))
        let ls = try FS.lstatOf(p("l"))
        XCTAssertEqual(ls.st_mtim.tv_sec, 20)
        XCTAssertEqual(ls.st_mtim.tv_nsec, 2)
        XCTAssertEqual(try FS.statOf(f).st_mtim.tv_sec, 4_102_444_800, "target untouched")
        // Timestamps are nanosecond-granular on fresh files too (not rounded to seconds).
        var nonzero = false
        for i in 0..<5 {
            try FS.create(p("ns\(i)"))
            if try FS.statOf(p("ns\(i)")).st_mtim.tv_nsec % 1_000_000 != 0 { nonzero = true }
            usleep(1_337)
        }
        XCTAssertTrue(nonzero, "mtimes look second/millisecond-rounded")
    }

    func testTimestampUpdatesMatchTmpfs() throws {
        try assertSameAsTmpfs("a/m/ctime updates") { dir, t in
            let f = dir + "/f"
            try FS.create(f, Array("content".utf8))
            // Make atime older than mtime so relatime allows the next read to update it.
            _ = utimens(f, atime: (1_000_000, 0), mtime: (0, LinuxConst.UTIME_OMIT))
            func st() -> StatBuf { var s = StatBuf(); lstat(f, &s); return s }
            func step(_ label: String, _ body: () -> Void) {
                let a = st()
                tick()
                body()
                let b = st()
                t.append("\(label): atime \(b.atimeNs != a.atimeNs ? "changed" : "same"), mtime \(b.mtimeNs != a.mtimeNs ? "changed" : "same"), ctime \(b.ctimeNs != a.ctimeNs ? "changed" : "same")")
            }
            step("read") { _ = try? FS.contents(f) }
            step("second read (relatime)") { _ = try? FS.contents(f) }
            step("write") { if let fd = try? FS.open(f, O_WRONLY) { _ = try? FS.write(fd, [1], at: 0); close(fd) } }
            step("empty write") { if let fd = try? FS.open(f, O_WRONLY) { _ = try? FS.write(fd, [], at: 0); close(fd) } }
            step("open O_RDWR, no io") { _ = openClose(f, O_RDWR) }
            step("chmod") { chmod(f, 0o600) }
            step("chown same owner") { chown(f, 0, 0) }
            // A SETATTR that sets nothing: tmpfs moves ctime (pjdfstest chown/00.t).
            step("chown -1:-1") { chown(f, UInt32.max, UInt32.max) }
            step("truncate grow") { truncate(f, 100) }
            step("truncate same size") { truncate(f, 100) }
            step("ftruncate same size") { if let fd = try? FS.open(f, O_WRONLY) { ftruncate(fd, 100); close(fd) } }
            step("O_TRUNC open") { _ = openClose(f, O_WRONLY | O_TRUNC) }
            step("O_TRUNC on empty") { _ = openClose(f, O_WRONLY | O_TRUNC) }
            step("link") { link(f, f + "2") }
            step("unlink other link") { unlink(f + "2") }
            step("rename") { rename(f, dir + "/g"); rename(dir + "/g", f) }
            step("setxattr") { _ = Sys.setxattr(f, "user.k", [1]) }
            step("removexattr") { _ = Sys.removexattr(f, "user.k") }
            step("fallocate") { if let fd = try? FS.open(f, O_WRONLY) { _ = Sys.fallocate(fd, 0, 0, 8192); close(fd) } }
            step("punch hole") { if let fd = try? FS.open(f, O_WRONLY) { _ = Sys.fallocate(fd, LinuxConst.FALLOC_FL_PUNCH_HOLE | LinuxConst.FALLOC_FL_KEEP_SIZE, 0, 4096); close(fd) } }
            step("stat only") { _ = st() }
        }
    }

    func testFileSizeAndBlksizeReported() throws {
        try FS.create(p("f"), pattern(10_000))
        let st = try FS.statOf(p("f"))
        XCTAssertEqual(st.st_size, 10_000)
        XCTAssertGreaterThan(st.st_blksize, 0)
        XCTAssertEqual(st.st_blocks, 24, "10000 bytes occupy 3 pages = 24 512-byte blocks, as on tmpfs")
        XCTAssertEqual(try FS.statOf(root).st_dev, try FS.statOf(p("f")).st_dev)
        XCTAssertNotEqual(try FS.statOf(root).st_ino, st.st_ino)
    }
}
