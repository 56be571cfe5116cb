// Regular files, special files, links, names, open flags — through a real chargefs mount.

import Foundation
import Glibc
import XCTest

/// Path made of raw bytes (names need not be UTF-8).
func rawPath(_ root: String, _ name: [UInt8]) -> [CChar] {
    (Array(root.utf8) + [0x2f] + name).map { CChar(bitPattern: $0) } + [0]
}

final class MountFilesTests: MountTestCase {
    func testWriteReadBackAcrossPagesAndReopen() throws {
        let path = p("data.bin")
        let data = pattern(300_001, seed: 3)
        try FS.create(path, data)
        XCTAssertEqual(try FS.contents(path), data)
        let st = try FS.statOf(path)
        XCTAssertEqual(st.st_size, 300_001)
        XCTAssertEqual(st.fileType, S_IFREG)
        // Overwrite a range straddling a page boundary, extend past EOF.
        let fd = try FS.open(path, O_RDWR)
        defer { close(fd) }
        XCTAssertEqual(try FS.write(fd, [UInt8](repeating: 0xAB, count: 10_000), at: 4090), 10_000)
        XCTAssertEqual(try FS.write(fd, [1, 2, 3], at: 300_001), 3)
        var expect = data
        expect.replaceSubrange(4090..<14090, with: [UInt8](repeating: 0xAB, count: 10_000))
        expect += [1, 2, 3]
        XCTAssertEqual(try FS.read(fd, count: 400_000, at: 0), expect)
        XCTAssertEqual(try FS.contents(path), expect)
        XCTAssertEqual(try FS.fstatOf(fd).st_size, 300_004)
    }

    func testOpenExclTruncAppend() throws {
        let path = p("f")
        try FS.create(path, Array("hello world".utf8))
        XCTAssertErrno(EEXIST, openClose(path, O_CREAT | O_EXCL | O_WRONLY))
        let fdA = try FS.open(path, O_WRONLY | O_APPEND)
        try FS.writeAll(fdA, Array("!!".utf8))
        // lseek does not defeat O_APPEND.
        lseek(fdA, 0, SEEK_SET)
        try FS.writeAll(fdA, Array("?".utf8))
        close(fdA)
        XCTAssertEqual(String(decoding: try FS.contents(path), as: UTF8.self), "hello world!!?")
        let fdT = try FS.open(path, O_WRONLY | O_TRUNC)
        XCTAssertEqual(try FS.fstatOf(fdT).st_size, 0)
        close(fdT)
        XCTAssertEqual(try FS.contents(path), [])
        // O_CREAT|O_EXCL on a fresh name works; on a dangling symlink it must fail (EEXIST).
        let fresh = p("new")
        XCTAssertEqual(errnoName(errnoOf { let fd = open(fresh, O_CREAT | O_EXCL | O_WRONLY, 0o600); if fd >= 0 { close(fd); return 0 }; return -1 }), "OK")
        try sys("symlink", symlink("nowhere", p("dangling")))
        XCTAssertErrno(EEXIST, openClose(p("dangling"), O_CREAT | O_EXCL | O_WRONLY))
    }

    func testODirectAndONoatimeAreAccepted() throws {
        let path = p("direct")
        try FS.create(path, pattern(8192))
        let fd = open(path, O_RDWR | LinuxConst.O_DIRECT)
        XCTAssertGreaterThanOrEqual(fd, 0, "O_DIRECT open: \(errnoName(errno))")
        if fd >= 0 {
            // Aligned buffer, aligned offset.
            let aligned = try AlignedBuffer(count: 4096, filledWith: 0x5A)
            let buf = aligned.base
            XCTAssertEqual(pwrite(fd, buf, 4096, 4096), 4096)
            memset(buf, 0, 4096)
            XCTAssertEqual(pread(fd, buf, 4096, 4096), 4096)
            XCTAssertEqual(buf.load(fromByteOffset: 100, as: UInt8.self), 0x5A)
            close(fd)
        }
        var expect = pattern(8192)
        expect.replaceSubrange(4096..<8192, with: [UInt8](repeating: 0x5A, count: 4096))
        XCTAssertEqual(try FS.contents(path), expect)
        let fd2 = open(path, O_RDONLY | LinuxConst.O_NOATIME)
        XCTAssertGreaterThanOrEqual(fd2, 0, "O_NOATIME open by owner: \(errnoName(errno))")
        if fd2 >= 0 { close(fd2) }
    }

    func testNameLengthLimitMatchesTmpfs() throws {
        let n255 = String(repeating: "a", count: 255)
        let n256 = String(repeating: "b", count: 256)
                try FS.create(root + "/" + n255, [7])
        XCTAssertEqual(try FS.contents(root + "/" + n255), [7])
        XCTAssertTrue(try FS.list(root).contains(n255))
        XCTAssertErrno(ENAMETOOLONG, openClose(root + "/" + n256, O_CREAT | O_WRONLY))
        XCTAssertErrno(ENAMETOOLONG, mkdir(root + "/" + n256, 0o755))
        XCTAssertErrno(ENAMETOOLONG, symlink("x", root + "/" + n256))
        XCTAssertErrno(ENAMETOOLONG, link(root + "/" + n255, root + "/" + n256))
        XCTAssertErrno(ENAMETOOLONG, rename(root + "/" + n255, root + "/" + n256))
        XCTAssertErrno(ENAMETOOLONG, mknod(root + "/" + n256, S_IFIFO | 0o644, 0))
        try assertSameAsTmpfs("name length errnos") { dir, t in
            record(&t, "create 255", openClose(dir + "/" + n255, O_CREAT | O_WRONLY))
            record(&t, "create 256", openClose(dir + "/" + n256, O_CREAT | O_WRONLY))
            record(&t, "stat 256", { var st = StatBuf(); return stat(dir + "/" + n256, &st) }())
            record(&t, "unlink 256", unlink(dir + "/" + n256))
            record(&t, "mkdir 256", mkdir(dir + "/" + n256, 0o755))
            record(&t, "symlink 256", symlink("x", dir + "/" + n256))
            // A symlink *target* may be long (up to PATH_MAX-1).
            record(&t, "symlink long target", symlink(String(repeating: "t/", count: 1000), dir + "/longtarget"))
        }
    }

    func testArbitraryBytesInNamesRoundTrip() throws {
        let root = root
        let names: [[UInt8]] = [
            [0xff, 0xfe, 0x80],                    // invalid UTF-8
            [0xc3, 0x28],                          // invalid 2-byte sequence
            Array("new\nline".utf8),
            Array("tab\tand space ".utf8),
            Array("back\\slash*?".utf8),
            Array("héllo-ünïcode-☃".utf8),
            [0x01, 0x02, 0x7f],
            Array("...".utf8),
            [0xed, 0xa0, 0x80],                    // UTF-8 encoded surrogate (invalid)
        ]
        for (i, name) in names.enumerated() {
            let path = rawPath(root, name)
            let fd = open(path, O_CREAT | O_WRONLY | O_EXCL | O_CLOEXEC, 0o644)
            XCTAssertGreaterThanOrEqual(fd, 0, "create \(name): \(errnoName(errno))")
            if fd >= 0 {
                var b = UInt8(i)
                _ = Glibc.write(fd, &b, 1)
                close(fd)
            }
        }
        let listed = try FS.listRaw(root)
        XCTAssertEqual(Set(listed), Set(names), "readdir must return exactly the bytes created")
        XCTAssertEqual(listed.count, names.count)
        for (i, name) in names.enumerated() {
            let path = rawPath(root, name)
            var st = StatBuf()
            XCTAssertEqual(stat(path, &st), 0, "stat \(name)")
            XCTAssertEqual(st.st_size, 1)
            let fd = open(path, O_RDONLY)
            var b: UInt8 = 0xEE
            if fd >= 0 { _ = Glibc.read(fd, &b, 1); close(fd) }
            XCTAssertEqual(b, UInt8(i), "content of \(name)")
        }
        // Rename between two non-UTF-8 names.
        XCTAssertEqual(rename(rawPath(root, names[0]), rawPath(root, [0xfa, 0xfb])), 0)
        XCTAssertTrue(try FS.listRaw(root).contains([0xfa, 0xfb]))
        XCTAssertFalse(try FS.listRaw(root).contains(names[0]))
    }

    func testSymlinks() throws {
        let target = "some/where/../../target"
        try FS.create(p("target"), [1, 2, 3])
        try sys("symlink", symlink(target, p("link")))
        XCTAssertEqual(try FS.readlink(p("link")), target)
        let lst = try FS.lstatOf(p("link"))
        XCTAssertEqual(lst.fileType, S_IFLNK)
        XCTAssertEqual(lst.st_size, target.utf8.count)
        XCTAssertEqual(lst.perm, 0o777)
        // Following the link resolves relative to the link's dir.
        try sys("symlink", symlink("target", p("rel")))
        XCTAssertEqual(try FS.contents(p("rel")), [1, 2, 3])
        XCTAssertEqual(try FS.statOf(p("rel")).fileType, S_IFREG)
        // Dangling and looping links.
        try sys("symlink", symlink("missing", p("dangling")))
        XCTAssertErrno(ENOENT, openClose(p("dangling"), O_RDONLY))
        try sys("symlink", symlink("loop2", p("loop1")))
        try sys("symlink", symlink("loop1", p("loop2")))
        XCTAssertErrno(ELOOP, openClose(p("loop1"), O_RDONLY))
        // Long target (4000 bytes) round-trips.
        let long = String(repeating: "abcd/", count: 800)
        try sys("symlink", symlink(long, p("long")))
        XCTAssertEqual(try FS.readlink(p("long")), long)
        XCTAssertErrno(EEXIST, symlink("x", p("link")))
        // readlink on a non-link.
        let regular = p("target")
        var small = [CChar](repeating: 0, count: 10)
        XCTAssertEqual(errnoName(errnoOfInt { readlink(regular, &small, 10) }), "EINVAL")
    }

    func testHardLinks() throws {
        let a = p("a"), b = p("b")
        try FS.create(a, Array("shared".utf8))
        try sys("link", link(a, b))
        let sa = try FS.statOf(a), sb = try FS.statOf(b)
        XCTAssertEqual(sa.st_ino, sb.st_ino)
        XCTAssertEqual(sa.st_nlink, 2)
        XCTAssertEqual(sb.st_nlink, 2)
        // Writes through one name are seen through the other.
        let fd = try FS.open(b, O_WRONLY | O_APPEND)
        try FS.writeAll(fd, Array("+more".utf8))
        close(fd)
        XCTAssertEqual(String(decoding: try FS.contents(a), as: UTF8.self), "shared+more")
        try sys("unlink", unlink(a))
        XCTAssertEqual(try FS.statOf(b).st_nlink, 1)
        XCTAssertEqual(String(decoding: try FS.contents(b), as: UTF8.self), "shared+more")
        try FS.mkdir(p("d"))
        XCTAssertErrno(EPERM, link(p("d"), p("dlink")), "hard link to a directory")
        try FS.create(a)
        XCTAssertErrno(EEXIST, link(b, a))
        XCTAssertErrno(ENOENT, link(p("nope"), p("x")))
        // Hard link to a symlink links the symlink itself (linkat without FOLLOW).
        try sys("symlink", symlink("b", p("sl")))
        try sys("linkat", linkat(AT_FDCWD, p("sl"), AT_FDCWD, p("sl2"), 0))
        XCTAssertEqual(try FS.lstatOf(p("sl2")).fileType, S_IFLNK)
        XCTAssertEqual(try FS.lstatOf(p("sl")).st_nlink, 2)
        // Many links.
        for i in 0..<50 { try sys("link", link(b, p("many\(i)"))) }
        XCTAssertEqual(try FS.statOf(b).st_nlink, 51)
    }

    func testSpecialFilesMatchTmpfs() throws {
        let sdir = try assertSameAsTmpfs("special files") { dir, t in
            record(&t, "mkfifo", mkfifo(dir + "/fifo", 0o640))
            record(&t, "mknod chr 1:3", mknod(dir + "/chr", S_IFCHR | 0o600, LinuxConst.makedev(1, 3)))
            record(&t, "mknod blk 7:0", mknod(dir + "/blk", S_IFBLK | 0o600, LinuxConst.makedev(7, 0)))
            record(&t, "mknod big dev", mknod(dir + "/big", S_IFCHR | 0o600, LinuxConst.makedev(4095, 1_000_000)))
            record(&t, "mknod sock", mknod(dir + "/sock", S_IFSOCK | 0o600, 0))
            record(&t, "mknod reg", mknod(dir + "/reg", S_IFREG | 0o600, 0))
            record(&t, "mkfifo exists", mkfifo(dir + "/fifo", 0o640))
            for name in ["fifo", "chr", "blk", "big", "sock", "reg"] {
                var st = StatBuf()
                if lstat(dir + "/" + name, &st) != 0 { t.append("\(name): lstat \(errnoName(errno))"); continue }
                t.append("\(name): type=\(String(st.fileType, radix: 8)) perm=\(String(st.perm & ~0o022, radix: 8)) size=\(st.st_size) nlink=\(st.st_nlink) rdev=\(LinuxConst.major(st.st_rdev)):\(LinuxConst.minor(st.st_rdev))")
            }
        }
        // Exact values too, so the test fails even if the comparison mount were wrong.
        let chr = try FS.lstatOf(sdir + "/chr")
        XCTAssertEqual(chr.fileType, S_IFCHR)
        XCTAssertEqual(LinuxConst.major(chr.st_rdev), 1)
        XCTAssertEqual(LinuxConst.minor(chr.st_rdev), 3)
        XCTAssertEqual(try FS.lstatOf(sdir + "/fifo").fileType, S_IFIFO)
        XCTAssertEqual(try FS.lstatOf(sdir + "/sock").fileType, S_IFSOCK)
    }

    func testFifoCarriesData() throws {
        let path = p("pipe")
        try sys("mkfifo", mkfifo(path, 0o600))
        let rfd = try FS.open(path, O_RDONLY | O_NONBLOCK)
        defer { close(rfd) }
        let wfd = try FS.open(path, O_WRONLY | O_NONBLOCK)
        defer { close(wfd) }
        try FS.writeAll(wfd, Array("through the fifo".utf8))
        var buf = [UInt8](repeating: 0, count: 64)
        let n = Glibc.read(rfd, &buf, 64)
        XCTAssertEqual(n, 16)
        XCTAssertEqual(String(decoding: buf.prefix(max(n, 0)), as: UTF8.self), "through the fifo")
    }

    func testUnixSocketBindAndConnect() throws {
        let path = p("s")
        XCTAssertLessThan(path.utf8.count, 100)
        func addr() -> sockaddr_un {
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &a.sun_path) { raw in
                for (i, c) in path.utf8.enumerated() { raw[i] = c }
            }
            return a
        }
        let server = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(server, 0)
        defer { close(server) }
        var sa = addr()
        let len = socklen_t(MemoryLayout<sockaddr_un>.size)
        let b = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(server, $0, len) } }
        XCTAssertEqual(b, 0, "bind on chargefs: \(errnoName(errno))")
        XCTAssertEqual(listen(server, 1), 0)
        XCTAssertEqual(try FS.lstatOf(path).fileType, S_IFSOCK)
        let client = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(client) }
        var ca = addr()
        let c = withUnsafePointer(to: &ca) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, len) } }
        XCTAssertEqual(c, 0, "connect via socket inode on chargefs: \(errnoName(errno))")
    }

    func testUnlinkedButOpenFileStaysUsable() throws {
        let path = p("ghost")
        let data = pattern(200_000, seed: 9)
        try FS.create(path, data)
        let fd = try FS.open(path, O_RDWR)
        defer { close(fd) }
        try sys("unlink", unlink(path))
        XCTAssertFalse(FS.exists(path))
        XCTAssertErrno(ENOENT, openClose(path, O_RDONLY))
        XCTAssertFalse(try FS.list(root).contains("ghost"))
        let st = try FS.fstatOf(fd)
        XCTAssertEqual(st.st_nlink, 0)
        XCTAssertEqual(st.st_size, 200_000)
        XCTAssertEqual(try FS.read(fd, count: 200_000, at: 0), data)
        XCTAssertEqual(try FS.write(fd, [9, 9, 9], at: 200_000), 3)
        XCTAssertEqual(try FS.read(fd, count: 3, at: 200_000), [9, 9, 9])
        XCTAssertEqual(try FS.fstatOf(fd).st_size, 200_003)
        XCTAssertEqual(ftruncate(fd, 10), 0)
        XCTAssertEqual(try FS.read(fd, count: 100, at: 0), Array(data.prefix(10)))
        // A new file with the same name is a different inode.
        try FS.create(path, [1])
        XCTAssertNotEqual(try FS.statOf(path).st_ino, try FS.fstatOf(fd).st_ino)
        XCTAssertEqual(try FS.read(fd, count: 100, at: 0), Array(data.prefix(10)))
    }

    func testOpenErrnosMatchTmpfs() throws {
        try assertSameAsTmpfs("open/unlink errnos") { dir, t in
            try FS.create(dir + "/file", [1])
            try FS.mkdir(dir + "/dir")
            record(&t, "open missing", openClose(dir + "/missing", O_RDONLY))
            record(&t, "open dir O_WRONLY", openClose(dir + "/dir", O_WRONLY))
            record(&t, "open dir O_RDONLY", openClose(dir + "/dir", O_RDONLY))
            record(&t, "open file/x", openClose(dir + "/file/x", O_RDONLY))
            record(&t, "create file/x", openClose(dir + "/file/x", O_CREAT | O_WRONLY))
            record(&t, "open O_DIRECTORY file", openClose(dir + "/file", O_RDONLY | O_DIRECTORY))
            record(&t, "unlink dir", unlink(dir + "/dir"))
            record(&t, "unlink missing", unlink(dir + "/missing"))
            record(&t, "mkdir over file", mkdir(dir + "/file", 0o755))
            record(&t, "create over dir", openClose(dir + "/dir", O_CREAT | O_WRONLY))
            record(&t, "truncate dir", truncate(dir + "/dir", 0))
            var b = [UInt8](repeating: 0, count: 8)
            let dfd = open(dir + "/dir", O_RDONLY)
            recordInt(&t, "read dir fd", Glibc.read(dfd, &b, 8))
            close(dfd)
            let wfd = open(dir + "/file", O_RDONLY)
            recordInt(&t, "write to O_RDONLY fd", Glibc.write(wfd, &b, 1))
            record(&t, "ftruncate O_RDONLY fd", ftruncate(wfd, 0))
            close(wfd)
        }
    }
}
