// size= and nr_inodes=: statfs/df, ENOSPC with partial writes, space given back on
// unlink/truncate/punch and at last close of an unlinked file.
// Not tested: storing through a mapping past size= (tmpfs raises SIGBUS, which would kill the
// test process).

import Foundation
import Glibc
import XCTest

final class MountCapacityTests: MountTestCase {
    override class var autoMount: Bool { false }

    func usedBytes(_ path: String) -> Int {
        let (_, s) = Sys.statfs(path)
        return (s.blocks - s.bfree) * s.bsize
    }

    /// Writes `count` bytes in one write(2) call; returns the result and errno.
    func bigWrite(_ path: String, _ count: Int, byte: UInt8 = 0x5C, flags: Int32 = O_CREAT | O_WRONLY | O_TRUNC) throws -> (Int, Int32) {
        let fd = try FS.open(path, flags)
        defer { close(fd) }
        let buf = [UInt8](repeating: byte, count: count)
        errno = 0
        let n = buf.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, count) }
        return (n, n < 0 ? errno : 0)
    }

    func testStatfsReportsSizeInodesAndUsageLikeTmpfs() throws {
        let ours = try mountChargeFS(options: ["size=4m", "nr_inodes=64"], name: "cap")
        let ref = try mountTmpfs(options: "size=4m,nr_inodes=64")
        func summary(_ root: String) -> [String] {
            let (r, s) = Sys.statfs(root)
            return ["rc=\(r) bytes=\(s.blocks * s.bsize) free=\(s.bfree * s.bsize) avail=\(s.bavail * s.bsize) files=\(s.files) ffree=\(s.ffree) namelen=\(s.namelen)"]
        }
        var a: [String] = [], b: [String] = []
        for (root, out) in [(ref.mountpoint, 1), (ours.mountpoint, 0)] {
            var t = summary(root)
            _ = try bigWrite(root + "/one", 1 << 20)
            try FS.mkdir(root + "/d")
            for i in 0..<5 { try FS.create(root + "/d/f\(i)", [1]) }
            t += summary(root)
            unlink(root + "/one")
            if out == 0 {
                // RELEASE reaches the daemon asynchronously after close(2); allow it to settle.
                for _ in 0..<100 where summary(root) != b.last.map({ [$0] }) ?? [] { usleep(20_000) }
            }
            t += summary(root)
            if out == 0 { a = t } else { b = t }
        }
        XCTAssertEqual(a, b, "statfs differs from tmpfs (chargefs first)")
        let (_, s) = Sys.statfs(ours.mountpoint)
        XCTAssertEqual(s.blocks * s.bsize, 4 << 20, "df size must equal size=4m")
        XCTAssertEqual(s.files, 64, "df inodes must equal nr_inodes=64")
        XCTAssertEqual(s.type, LinuxConst.FUSE_SUPER_MAGIC)
        // df(1) agrees.
        let df = try Child.run(["/bin/df", "-B1", "--output=size,used", ours.mountpoint], logDir: try scratch.path)
        XCTAssertEqual(df.code, 0)
        XCTAssertTrue(df.out.contains("\(4 << 20)"), "df output: \(df.out)")
    }

    func testENOSPCPartialWriteKeepsEarlierData() throws {
        let ours = try mountChargeFS(options: ["size=1m"], name: "cap")
        let ref = try mountTmpfs(options: "size=1m")
        var results: [String: (Int, Int32)] = [:]
        for (label, root) in [("chargefs", ours.mountpoint), ("tmpfs", ref.mountpoint)] {
            try FS.create(root + "/early", pattern(300_000, seed: 4))
            let (n, e) = try bigWrite(root + "/big", 2 << 20)
            results[label] = (n, e)
            XCTAssertGreaterThan(n, 0, "\(label): a write crossing the limit returns the part written (\(errnoName(e)))")
            XCTAssertLessThan(n, 2 << 20, "\(label): cannot write more than size=")
            if n > 0 {
                let back = try FS.contents(root + "/big")
                XCTAssertEqual(back.count, n, "\(label): file size equals the partial count")
                XCTAssertTrue(back.allSatisfy { $0 == 0x5C }, "\(label): partial data intact")
            }
            // The next write fails with ENOSPC.
            let (n2, e2) = try bigWrite(root + "/big", 8192, flags: O_WRONLY | O_APPEND)
            XCTAssertEqual(n2, -1, "\(label)")
            XCTAssertEqual(errnoName(e2), "ENOSPC", "\(label)")
            XCTAssertEqual(try FS.contents(root + "/early"), pattern(300_000, seed: 4), "\(label): earlier data intact")
            // Creating empty files and metadata still works; fallocate beyond space fails.
            XCTAssertNoThrow(try FS.create(root + "/empty"), label)
            let fd = try FS.open(root + "/empty", O_RDWR)
            XCTAssertErrno(ENOSPC, Sys.fallocate(fd, 0, 0, 2 << 20), label)
            XCTAssertEqual(try FS.fstatOf(fd).st_size, 0, "\(label): failed fallocate leaves size alone")
            close(fd)
        }
        XCTAssertEqual(results["chargefs"]?.0, results["tmpfs"]?.0, "partial write count differs from tmpfs")
    }

    func testNrInodesLimitMatchesTmpfs() throws {
        let ours = try mountChargeFS(options: ["nr_inodes=16"], name: "cap")
        let ref = try mountTmpfs(options: "nr_inodes=16")
        var counts: [String] = []
        for root in [ours.mountpoint, ref.mountpoint] {
            var made = 0
            var lastErr: Int32 = 0
            for i in 0..<40 {
                let e = errnoOf { openClose(root + "/f\(i)", O_CREAT | O_WRONLY) }
                if e != 0 { lastErr = e; break }
                made += 1
            }
            let mk = errnoName(errnoOf { mkdir(root + "/dir", 0o755) })
            let sl = errnoName(errnoOf { symlink("x", root + "/sl") })
            let ln = errnoName(errnoOf { link(root + "/f0", root + "/hard") })   // hard links need no inode
            unlink(root + "/f0")
            let after = errnoName(errnoOf { openClose(root + "/again", O_CREAT | O_WRONLY) })
            counts.append("files=\(made) err=\(errnoName(lastErr)) mkdir=\(mk) symlink=\(sl) link=\(ln) after unlink=\(after)")
        }
        XCTAssertEqual(counts[0], counts[1], "chargefs vs tmpfs")
        XCTAssertTrue(counts[0].contains("err=ENOSPC"), counts[0])
    }

    func testSpaceReturnedOnlyAtLastCloseOfUnlinkedFile() throws {
        let ours = try mountChargeFS(options: ["size=4m"], name: "cap")
        let root = ours.mountpoint
        let base = usedBytes(root)
        try FS.create(root + "/held", [UInt8](repeating: 1, count: 3 << 20))
        let fd = try FS.open(root + "/held", O_RDONLY)
        try sys("unlink", unlink(root + "/held"))
        XCTAssertGreaterThanOrEqual(usedBytes(root) - base, 3 << 20, "still charged while open")
        let (n, _) = try bigWrite(root + "/other", 2 << 20)
        XCTAssertLessThan(n, 2 << 20, "space of the open unlinked file is not reusable yet")
        XCTAssertEqual(try FS.read(fd, count: 10, at: (3 << 20) - 10), [UInt8](repeating: 1, count: 10))
        close(fd)
        unlink(root + "/other")
        // The daemon frees on RELEASE, which the kernel sends asynchronously after close.
        var freed = false
        for _ in 0..<100 {
            if usedBytes(root) - base < (1 << 20) { freed = true; break }
            usleep(20_000)
        }
        XCTAssertTrue(freed, "memory of the unlinked file must be freed at last close; used=\(usedBytes(root) - base)")
        let (n2, e2) = try bigWrite(root + "/other", 3 << 20)
        XCTAssertEqual(n2, 3 << 20, "after the last close the space is reusable (\(errnoName(e2)))")
    }

    func testTruncatePunchAndUnlinkGiveSpaceBack() throws {
        let ours = try mountChargeFS(options: ["size=2m"], name: "cap")
        let root = ours.mountpoint
        let (n, _) = try bigWrite(root + "/fill", 2 << 20)
        XCTAssertGreaterThan(n, 1 << 20)
        let fd = try FS.open(root + "/fill", O_RDWR)
        defer { close(fd) }
        XCTAssertErrno(ENOSPC, { () -> Int32 in (try? FS.write(fd, [1], at: 3 << 20)) == nil ? -1 : 0 }())
        XCTAssertErrno(0, Sys.fallocate(fd, LinuxConst.FALLOC_FL_PUNCH_HOLE | LinuxConst.FALLOC_FL_KEEP_SIZE, 0, 1 << 20))
        XCTAssertEqual(try FS.write(fd, [UInt8](repeating: 2, count: 512 << 10), at: 0), 512 << 10, "punched space reusable")
        try sys("ftruncate", ftruncate(fd, 0))
        let (n2, e2) = try bigWrite(root + "/second", 1536 << 10)
        XCTAssertEqual(n2, 1536 << 10, "truncated space reusable (\(errnoName(e2)))")
        unlink(root + "/second")
        // Its pages go at the RELEASE the kernel sends asynchronously after close: over io_uring
        // another worker of the same CPU may handle it a moment after unlink returned.
        var waits = 0
        while usedBytes(root) >= (1 << 20) && waits < 100 {
            usleep(10_000)
            waits += 1
        }
        let (n3, _) = try bigWrite(root + "/third", 1536 << 10)
        XCTAssertEqual(n3, 1536 << 10, "unlinked space reusable")
    }

    func testSizeSuffixesPercentAndDefaultsMatchTmpfs() throws {
        let cases: [(String, String)] = [
            ("size=512k", "size=512k"), ("size=3m", "size=3m"), ("size=1g", "size=1g"), ("size=10%", "size=10%"),
            ("nr_inodes=2k", "nr_inodes=2k"), ("size=1048576", "size=1048576"), ("size=5000", "size=5000"),
        ]
        for (i, (ourOpt, refOpt)) in cases.enumerated() {
            let ours = try mountChargeFS(options: [ourOpt], name: "c\(i)")
            let ref = try mountTmpfs(options: refOpt, name: "t\(i)")
            let (_, a) = Sys.statfs(ours.mountpoint), (_, b) = Sys.statfs(ref.mountpoint)
            if ourOpt.hasPrefix("size") {
                XCTAssertEqual(a.blocks * a.bsize, b.blocks * b.bsize, "\(ourOpt): total bytes")
            } else {
                XCTAssertEqual(a.files, b.files, "\(ourOpt): inodes")
            }
            ours.stop()
            ref.stop()
        }
        // Defaults: size = 50% of RAM (as tmpfs), and size=0 is unlimited.
        let ours = try mountChargeFS(options: [], name: "dflt")
        let ref = try mountTmpfs(name: "tdflt")
        XCTAssertEqual(Sys.statfs(ours.mountpoint).1.blocks * Sys.statfs(ours.mountpoint).1.bsize,
                       Sys.statfs(ref.mountpoint).1.blocks * Sys.statfs(ref.mountpoint).1.bsize, "default size")
        let unlimited = try mountChargeFS(options: ["size=0", "nr_inodes=0"], name: "unl")
        // Unlimited: tmpfs reports no totals at all (0 blocks, 0 inodes), and so must we.
        let refUnlimited = try mountTmpfs(options: "size=0,nr_inodes=0", name: "tunl")
        let (_, u) = Sys.statfs(unlimited.mountpoint), (_, r) = Sys.statfs(refUnlimited.mountpoint)
        XCTAssertEqual([u.blocks, u.bfree, u.bavail, u.files, u.ffree], [r.blocks, r.bfree, r.bavail, r.files, r.ffree],
                       "size=0,nr_inodes=0: statfs totals as tmpfs")
        refUnlimited.stop()
        let (n, e) = try bigWrite(unlimited.mountpoint + "/big", 48 << 20)
        XCTAssertEqual(n, 48 << 20, "size=0 is unlimited (\(errnoName(e)))")
        for i in 0..<300 { try FS.create(unlimited.mountpoint + "/f\(i)") }
    }
}
