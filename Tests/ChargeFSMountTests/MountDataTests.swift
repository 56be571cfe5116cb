// File data: truncate, holes, st_blocks, SEEK_DATA/SEEK_HOLE, fallocate, fsync, locks.

import Foundation
import Glibc
import XCTest

final class MountDataTests: MountTestCase {
    func testTruncateGrowShrinkReadsZeros() throws {
        let f = p("t")
        try FS.create(f, [UInt8](repeating: 0xAA, count: 10_000))
        try sys("truncate", truncate(f, 3_000))
        XCTAssertEqual(try FS.statOf(f).st_size, 3_000)
        try sys("truncate", truncate(f, 20_000))
        let data = try FS.contents(f)
        XCTAssertEqual(data.count, 20_000)
        XCTAssertEqual(Array(data[0..<3_000]), [UInt8](repeating: 0xAA, count: 3_000))
        XCTAssertEqual(Array(data[3_000...]), [UInt8](repeating: 0, count: 17_000), "no stale bytes after shrink+grow")
        // ftruncate in the middle of a page, then write beyond: the gap reads zero.
        let fd = try FS.open(f, O_RDWR)
        defer { close(fd) }
        try sys("ftruncate", ftruncate(fd, 1_001))
        XCTAssertEqual(try FS.write(fd, [1], at: 5_000), 1)
        let after = try FS.read(fd, count: 10_000, at: 0)
        XCTAssertEqual(after.count, 5_001)
        XCTAssertEqual(Array(after[1_001..<5_000]), [UInt8](repeating: 0, count: 3_999))
        XCTAssertErrno(EINVAL, ftruncate(fd, -1))
        try sys("ftruncate", ftruncate(fd, 0))
        XCTAssertEqual(try FS.fstatOf(fd).st_blocks, 0, "empty file holds no blocks")
        // Very large sparse size.
        try sys("ftruncate", ftruncate(fd, 1 << 40))
        XCTAssertEqual(try FS.fstatOf(fd).st_size, 1 << 40)
        XCTAssertEqual(try FS.read(fd, count: 4096, at: (1 << 40) - 4096), [UInt8](repeating: 0, count: 4096))
    }

    func testSparseFilesAndBlocksMatchTmpfs() throws {
        try assertSameAsTmpfs("sparse st_blocks") { dir, t in
            let cases: [(String, [(Int64, Int)])] = [
                ("one byte", [(0, 1)]),
                ("4096", [(0, 4096)]),
                ("4097", [(0, 4097)]),
                ("far byte", [(1 << 30, 1)]),
                ("two islands", [(0, 100), (10 << 20, 5000)]),
                ("straddle", [(4095, 2)]),
            ]
            for (name, writes) in cases {
                let fd = try FS.open(dir + "/" + name, O_CREAT | O_RDWR)
                for (off, len) in writes { _ = try FS.write(fd, [UInt8](repeating: 7, count: len), at: off) }
                let st = try FS.fstatOf(fd)
                t.append("\(name): size=\(st.st_size) blocks=\(st.st_blocks)")
                let hole = try FS.read(fd, count: 16, at: (1 << 20))
                t.append("\(name): read in hole=\(hole.allSatisfy { $0 == 0 }) n=\(hole.count)")
                close(fd)
            }
            let fd = try FS.open(dir + "/grow", O_CREAT | O_RDWR)
            ftruncate(fd, 100 << 20)
            t.append("truncated 100MiB: blocks=\((try? FS.fstatOf(fd).st_blocks) ?? -1)")
            close(fd)
        }
        // Hard check independent of tmpfs.
        let fd = try FS.open(p("sparse"), O_CREAT | O_RDWR)
        defer { close(fd) }
        XCTAssertEqual(try FS.write(fd, [1, 2, 3], at: 1 << 30), 3)
        let st = try FS.fstatOf(fd)
        XCTAssertEqual(st.st_size, (1 << 30) + 3)
        XCTAssertLessThanOrEqual(st.st_blocks, 16, "a 1 GiB hole must not be allocated")
        XCTAssertEqual(try FS.read(fd, count: 8, at: 12345), [UInt8](repeating: 0, count: 8))
        XCTAssertEqual(try FS.read(fd, count: 3, at: 1 << 30), [1, 2, 3])
    }

    func testSeekDataSeekHoleMatchTmpfs() throws {
        let sdir = try assertSameAsTmpfs("SEEK_DATA/SEEK_HOLE") { dir, t in
            let fd = try FS.open(dir + "/f", O_CREAT | O_RDWR)
            defer { close(fd) }
            _ = try FS.write(fd, [UInt8](repeating: 1, count: 4096), at: 0)
            _ = try FS.write(fd, [UInt8](repeating: 2, count: 100), at: 1 << 20)
            _ = try FS.write(fd, [UInt8](repeating: 3, count: 8192), at: 3 << 20)
            ftruncate(fd, 5 << 20)
            for off in [0, 100, 4096, 5000, (1 << 20) - 1, 1 << 20, (1 << 20) + 4096, 2 << 20, (3 << 20) + 8191, 4 << 20, (5 << 20) - 1, 5 << 20, 6 << 20] as [Int] {
                errno = 0
                let d = lseek(fd, off_t(off), LinuxConst.SEEK_DATA)
                let de = d < 0 ? errnoName(errno) : "\(d)"
                errno = 0
                let h = lseek(fd, off_t(off), LinuxConst.SEEK_HOLE)
                let he = h < 0 ? errnoName(errno) : "\(h)"
                t.append("off \(off): SEEK_DATA=\(de) SEEK_HOLE=\(he)")
            }
            // Punched hole becomes a hole for SEEK_HOLE.
            _ = Sys.fallocate(fd, LinuxConst.FALLOC_FL_PUNCH_HOLE | LinuxConst.FALLOC_FL_KEEP_SIZE, 3 << 20, 4096)
            t.append("after punch: SEEK_HOLE(3M)=\(lseek(fd, 3 << 20, LinuxConst.SEEK_HOLE)) SEEK_DATA(3M)=\(lseek(fd, 3 << 20, LinuxConst.SEEK_DATA))")
            let e = try FS.open(dir + "/empty", O_CREAT | O_RDWR)
            errno = 0
            t.append("empty: SEEK_DATA(0)=\(lseek(e, 0, LinuxConst.SEEK_DATA)) \(errnoName(errno))")
            errno = 0
            t.append("empty: SEEK_HOLE(0)=\(lseek(e, 0, LinuxConst.SEEK_HOLE)) \(errnoName(errno))")
            close(e)
        }
        let fd = try FS.open(sdir + "/f", O_RDONLY)
        defer { close(fd) }
        XCTAssertEqual(lseek(fd, 4096, LinuxConst.SEEK_DATA), 1 << 20, "next data after the first hole")
        XCTAssertEqual(lseek(fd, 0, LinuxConst.SEEK_HOLE), 4096)
        XCTAssertEqual(lseek(fd, 6 << 20, LinuxConst.SEEK_DATA), -1)
        XCTAssertEqual(errnoName(errno), "ENXIO")
    }

    func testFallocateModesMatchTmpfs() throws {
        try assertSameAsTmpfs("fallocate") { dir, t in
            let fd = try FS.open(dir + "/f", O_CREAT | O_RDWR)
            defer { close(fd) }
            func state(_ label: String) {
                let st = (try? FS.fstatOf(fd)) ?? StatBuf()
                t.append("  \(label): size=\(st.st_size) blocks=\(st.st_blocks)")
            }
            record(&t, "mode 0 [0,64K)", Sys.fallocate(fd, 0, 0, 65_536)); state("after mode 0")
            t.append("  reads zero: \(((try? FS.read(fd, count: 65_536, at: 0)) ?? []).allSatisfy { $0 == 0 })")
            record(&t, "KEEP_SIZE [64K,128K)", Sys.fallocate(fd, LinuxConst.FALLOC_FL_KEEP_SIZE, 65_536, 65_536)); state("after keep size")
            _ = try FS.write(fd, [UInt8](repeating: 9, count: 20_000), at: 1000)
            record(&t, "PUNCH|KEEP [4K,12K)", Sys.fallocate(fd, LinuxConst.FALLOC_FL_PUNCH_HOLE | LinuxConst.FALLOC_FL_KEEP_SIZE, 4096, 8192)); state("after punch")
            let r = (try? FS.read(fd, count: 20_000, at: 1000)) ?? []
            t.append("  punched zero: \(r.count == 20_000 && r[3096..<11288].allSatisfy { $0 == 0 }) kept: \(r.count == 20_000 && r[0..<3096].allSatisfy { $0 == 9 } && r[11288...].allSatisfy { $0 == 9 })")
            record(&t, "PUNCH|KEEP unaligned [100,5000)", Sys.fallocate(fd, LinuxConst.FALLOC_FL_PUNCH_HOLE | LinuxConst.FALLOC_FL_KEEP_SIZE, 100, 4900)); state("after unaligned punch")
            let r2 = (try? FS.read(fd, count: 6000, at: 0)) ?? []
            t.append("  unaligned: \(r2.count) \(r2.count == 6000 ? "\(r2[99]) \(r2[100]) \(r2[4999]) \(r2[5000])" : "")")
            record(&t, "PUNCH without KEEP_SIZE", Sys.fallocate(fd, LinuxConst.FALLOC_FL_PUNCH_HOLE, 0, 4096))
            record(&t, "ZERO_RANGE", Sys.fallocate(fd, LinuxConst.FALLOC_FL_ZERO_RANGE, 0, 4096))
            record(&t, "COLLAPSE_RANGE", Sys.fallocate(fd, LinuxConst.FALLOC_FL_COLLAPSE_RANGE, 0, 4096))
            record(&t, "INSERT_RANGE", Sys.fallocate(fd, LinuxConst.FALLOC_FL_INSERT_RANGE, 0, 4096))
            record(&t, "len 0", Sys.fallocate(fd, 0, 0, 0))
            record(&t, "negative offset", Sys.fallocate(fd, 0, -1, 10))
            record(&t, "mode 0 beyond EOF [1M,1M+4K)", Sys.fallocate(fd, 0, 1 << 20, 4096)); state("after extend")
            let ro = open(dir + "/f", O_RDONLY)
            record(&t, "on O_RDONLY fd", Sys.fallocate(ro, 0, 0, 4096))
            close(ro)
            state("final")
        }
    }

    /// A file of 1 MiB or more has a backing file, and its appends charge a 64-page batch ahead
    /// until the last close: st_blocks must show only what tmpfs shows, before the close and
    /// after it, whether or not a stat came between (fsstress's sizes, docs/takeover.md: a stat
    /// between the writev and the close kept the batch, 704 blocks against 192), and around a
    /// gap, a truncate up and a fallocate past the end over the batch.
    func testAppendsToALargeFileShowTmpfsBlocks() throws {
        try assertSameAsTmpfs("st_blocks around an append's batch") { dir, t in
            func blocks(_ label: String, _ fd: Int32) {
                let st = (try? FS.fstatOf(fd)) ?? StatBuf()
                t.append("  \(label): size=\(st.st_size) blocks=\(st.st_blocks)")
            }
            for statBetween in [false, true] {
                let f = dir + "/fsstress-\(statBetween)"
                let fd = try FS.open(f, O_CREAT | O_RDWR)
                _ = try FS.write(fd, pattern(876_333), at: 2 << 20)
                try sys("ftruncate", ftruncate(fd, 113_855))
                _ = try FS.write(fd, pattern(94_234, seed: 3), at: 359_249)
                if statBetween { blocks("stat between", fd) }
                close(fd)
                let st = try FS.statOf(f)
                t.append("  after close (stat between: \(statBetween)): size=\(st.st_size) blocks=\(st.st_blocks)")
            }
            let fd = try FS.open(dir + "/big", O_CREAT | O_RDWR)
            defer { close(fd) }
            for i in 0..<24 { _ = try FS.write(fd, pattern(128 << 10, seed: UInt8(i)), at: Int64(i) * (128 << 10)) }
            blocks("3 MiB appended", fd)
            _ = try FS.write(fd, [1, 2, 3, 4], at: 3 << 20)
            blocks("4 bytes appended", fd)
            _ = try FS.write(fd, pattern(4096), at: (3 << 20) + 10 * 4096)
            blocks("a page past a gap", fd)
            try sys("ftruncate", ftruncate(fd, (3 << 20) + 40 * 4096))
            blocks("truncated up", fd)
            _ = try FS.write(fd, pattern(4096), at: (3 << 20) + 40 * 4096)
            blocks("appended again", fd)
            record(&t, "KEEP_SIZE past the end", Sys.fallocate(fd, LinuxConst.FALLOC_FL_KEEP_SIZE, (3 << 20) + 43 * 4096, 3 * 4096))
            blocks("allocated past the end", fd)
            let again = try FS.open(dir + "/big", O_RDONLY)
            close(again)
            blocks("another open closed", fd)
        }
    }

    /// Found by the exerciser: a punch that runs past EOF must free the page holding EOF when it
    /// covers that page's in-file part entirely (tmpfs does).
    func testPunchHolePastEOFFreesTailPageLikeTmpfs() throws {
        try assertSameAsTmpfs("punch past EOF") { dir, t in
            try FS.create(dir + "/f", pattern(10_000))
            let fd = try FS.open(dir + "/f", O_RDWR)
            defer { close(fd) }
            record(&t, "punch [6000,14000)", Sys.fallocate(fd, LinuxConst.FALLOC_FL_PUNCH_HOLE | LinuxConst.FALLOC_FL_KEEP_SIZE, 6000, 8000))
            let st = try FS.fstatOf(fd)
            t.append("size=\(st.st_size) blocks=\(st.st_blocks)")
            let tail = try FS.read(fd, count: 10_000, at: 0)
            t.append("head intact=\(Array(tail.prefix(6000)) == Array(pattern(10_000).prefix(6000))) tail zero=\(tail.dropFirst(6000).allSatisfy { $0 == 0 })")
        }
    }

    func testFsyncFdatasyncSucceed() throws {
        let fd = try FS.open(p("s"), O_CREAT | O_RDWR)
        defer { close(fd) }
        _ = try FS.write(fd, pattern(50_000), at: 0)
        XCTAssertErrno(0, fsync(fd))
        XCTAssertErrno(0, fdatasync(fd))
        let dfd = try FS.open(root, O_RDONLY | O_DIRECTORY)
        defer { close(dfd) }
        XCTAssertErrno(0, fsync(dfd), "fsync on a directory")
        sync()
        XCTAssertEqual(try FS.read(fd, count: 50_000, at: 0), pattern(50_000))
    }

    /// RAM has nothing to sync: the kernel asks once, learns ENOSYS, and asks no more, while
    /// fsync(2) keeps succeeding. The counts come from the daemon's request counter.
    func testFsyncReachesTheDaemonOnceAndRequestsAreCounted() throws {
        let m = try fs
        let before = m.requestCounts
        XCTAssertEqual(before["INIT"], 1, "the counter saw INIT: \(before)")
        let fd = try FS.open(p("counted"), O_CREAT | O_RDWR)
        _ = try FS.write(fd, pattern(4096), at: 0)
        let dfd = try FS.open(root, O_RDONLY | O_DIRECTORY)
        for _ in 0..<5 {
            XCTAssertErrno(0, fsync(fd))
            XCTAssertErrno(0, fdatasync(fd))
            XCTAssertErrno(0, fsync(dfd), "fsync on a directory")
        }
        close(dfd)
        close(fd)
        let after = m.requestCounts
        XCTAssertEqual(after["CREATE", default: 0] - before["CREATE", default: 0], 1, "\(after)")
        XCTAssertEqual(after["WRITE", default: 0] - before["WRITE", default: 0], 1, "\(after)")
        XCTAssertLessThanOrEqual(after["FSYNC", default: 0], 1, "fsync answered ENOSYS once: \(after)")
        XCTAssertLessThanOrEqual(after["FSYNCDIR", default: 0], 1, "fsyncdir answered ENOSYS once: \(after)")
        XCTAssertEqual(try FS.contents(p("counted")), pattern(4096))
        XCTAssertErrno(EPERM, Sys.setxattr(root, "user.chargefs.requests", [1]), "the counts are read-only")
    }

    func testFlockAndOFDLocksConflictLikeTmpfs() throws {
        try FS.create(p("lock"), [1])
        let a = try FS.open(p("lock"), O_RDWR)
        let b = try FS.open(p("lock"), O_RDWR)
        defer { close(a); close(b) }
        XCTAssertErrno(0, flock(a, LOCK_EX | LOCK_NB))
        XCTAssertErrno(EWOULDBLOCK, flock(b, LOCK_EX | LOCK_NB), "second open file description conflicts")
        XCTAssertErrno(EWOULDBLOCK, flock(b, LOCK_SH | LOCK_NB))
        XCTAssertErrno(0, flock(a, LOCK_UN))
        XCTAssertErrno(0, flock(b, LOCK_SH | LOCK_NB))
        XCTAssertErrno(0, flock(a, LOCK_SH | LOCK_NB), "shared locks coexist")
        flock(a, LOCK_UN); flock(b, LOCK_UN)
        // OFD byte-range locks (per open file description, so they conflict within one process).
        var wl = Glibc.flock()
        wl.l_type = Int16(F_WRLCK); wl.l_whence = Int16(SEEK_SET); wl.l_start = 0; wl.l_len = 100
        XCTAssertErrno(0, fcntl(a, LinuxConst.F_OFD_SETLK, &wl))
        var other = Glibc.flock()
        other.l_type = Int16(F_WRLCK); other.l_whence = Int16(SEEK_SET); other.l_start = 50; other.l_len = 10
        XCTAssertErrno(EAGAIN, fcntl(b, LinuxConst.F_OFD_SETLK, &other))
        var probe = other
        XCTAssertErrno(0, fcntl(b, LinuxConst.F_OFD_GETLK, &probe))
        XCTAssertEqual(Int32(probe.l_type), Int32(F_WRLCK), "GETLK reports the conflicting lock")
        XCTAssertEqual(probe.l_start, 0)
        XCTAssertEqual(probe.l_len, 100)
        var free = Glibc.flock()
        free.l_type = Int16(F_WRLCK); free.l_whence = Int16(SEEK_SET); free.l_start = 100; free.l_len = 10
        XCTAssertErrno(0, fcntl(b, LinuxConst.F_OFD_SETLK, &free), "non-overlapping range")
        // Classic POSIX locks: same process never conflicts with itself.
        var pl = Glibc.flock()
        pl.l_type = Int16(F_WRLCK); pl.l_whence = Int16(SEEK_SET); pl.l_start = 500; pl.l_len = 0
        XCTAssertErrno(0, fcntl(a, F_SETLK, &pl))
        XCTAssertErrno(0, fcntl(b, F_SETLK, &pl))
        // Another process sees our POSIX lock: flock(1) uses flock(2), so use a shell `exec` with
        // a tiny helper instead: util-linux `flock -n` on the same file must fail while `a` holds
        // an flock lock.
        XCTAssertErrno(0, flock(a, LOCK_EX | LOCK_NB))
        let r = try Child.run(["/usr/bin/flock", "-n", "-E", "42", p("lock"), "true"], logDir: try scratch.path, timeout: 5)
        XCTAssertEqual(r.code, 42, "another process must see the flock lock: \(r.err)")
        flock(a, LOCK_UN)
        let r2 = try Child.run(["/usr/bin/flock", "-n", "-E", "42", p("lock"), "true"], logDir: try scratch.path, timeout: 5)
        XCTAssertEqual(r2.code, 0, "lock released: \(r2.err)")
    }

    /// fio write+verify jobs (psync with unaligned block sizes, and mmap engine). Each job is
    /// first run on a kernel tmpfs so a bad fio invocation cannot masquerade as a chargefs bug.
    /// Classic POSIX (fcntl) locks between processes: a python3 child takes a write lock on a
    /// byte range; this process must see the conflict via F_GETLK/F_SETLK, and get the lock
    /// once the child is gone. Compared with tmpfs.
    func testPosixLocksAcrossProcessesMatchTmpfs() throws {
        guard access("/usr/bin/python3", X_OK) == 0 else { throw XCTSkip("python3 not installed") }
        let t = try mountTmpfs()
        for (label, dir) in [("tmpfs", t.mountpoint), ("chargefs", root)] {
            let f = dir + "/plock"
            try FS.create(f, [UInt8](repeating: 0, count: 100))
            let ready = dir + "/plock.ready"
            let script = """
            import fcntl, os, time
            fd = os.open('\(f)', os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 20)
            open('\(ready)', 'w').close()
            time.sleep(30)
            """
            let child = try Child(argv: ["/usr/bin/python3", "-c", script], logDir: try scratch.path, tag: "plock-\(label)")
            defer { child.signal(SIGKILL); child.wait(timeout: 5) }
            var waited = 0
            while !FS.exists(ready) && waited < 500 && !child.poll() { usleep(10_000); waited += 1 }
            XCTAssertTrue(FS.exists(ready), "\(label): lock holder did not start: \(child.stderrText)")
            let fd = try FS.open(f, O_RDWR)
            defer { close(fd) }
            var probe = Glibc.flock()
            probe.l_type = Int16(F_WRLCK); probe.l_whence = Int16(SEEK_SET); probe.l_start = 25; probe.l_len = 1
            XCTAssertErrno(0, fcntl(fd, F_GETLK, &probe), label)
            XCTAssertEqual(Int32(probe.l_type), Int32(F_WRLCK), "\(label): GETLK sees the other process's lock")
            XCTAssertEqual(probe.l_pid, child.pid, label)
            XCTAssertEqual(probe.l_start, 20, label)
            XCTAssertEqual(probe.l_len, 10, label)
            var want = Glibc.flock()
            want.l_type = Int16(F_RDLCK); want.l_whence = Int16(SEEK_SET); want.l_start = 0; want.l_len = 0
            XCTAssertErrno(EAGAIN, fcntl(fd, F_SETLK, &want), "\(label): conflicting read lock")
            var disjoint = Glibc.flock()
            disjoint.l_type = Int16(F_WRLCK); disjoint.l_whence = Int16(SEEK_SET); disjoint.l_start = 0; disjoint.l_len = 20
            XCTAssertErrno(0, fcntl(fd, F_SETLK, &disjoint), "\(label): disjoint range")
            child.signal(SIGKILL)
            child.wait(timeout: 5)
            XCTAssertErrno(0, fcntl(fd, F_SETLK, &want), "\(label): lock free after the holder died")
        }
    }

    func testLargeRandomIOIntegrityWithFio() throws {
        guard access("/usr/bin/fio", X_OK) == 0 else { throw XCTSkip("fio not installed") }
        let t = try mountTmpfs()
        let jobs: [[String]] = [
            ["--name=randwrite4k", "--size=24m", "--bs=4k", "--rw=randwrite", "--ioengine=psync", "--verify=crc32c",
             "--numjobs=2", "--randseed=1234"],
            ["--name=unaligned", "--size=8m", "--bsrange=512-70k", "--bs_unaligned", "--rw=randwrite",
             "--ioengine=psync", "--verify=md5", "--randseed=99"],
            ["--name=mmap", "--size=8m", "--bsrange=512-70k", "--bs_unaligned", "--rw=randwrite",
             "--ioengine=mmap", "--verify=md5", "--randseed=7"],
        ]
        for job in jobs {
            for (label, dir) in [("tmpfs", t.mountpoint), ("chargefs", root)] {
                let argv = ["/usr/bin/fio"] + job + ["--directory=\(dir)", "--verify_fatal=1", "--do_verify=1", "--minimal", "--verify_state_save=0"]
                let r = try Child.run(argv, logDir: try scratch.path, timeout: 60)
                XCTAssertEqual(r.code, 0, "fio \(job[0]) on \(label) failed: \(r.err.suffix(1500)) \(r.out.prefix(200))")
                if r.code != 0 { return }
            }
        }
    }

    func testConcurrentWritersToDisjointRanges() throws {
        let f = p("shared")
        try FS.create(f)
        let fd = try FS.open(f, O_RDWR)
        defer { close(fd) }
        let chunk = 64 * 1024
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            let data = [UInt8](repeating: UInt8(i + 1), count: chunk)
            for rep in 0..<4 {
                _ = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, chunk, off_t((i * 4 + rep) * chunk)) }
            }
        }
        let all = try FS.read(fd, count: 32 * chunk, at: 0)
        XCTAssertEqual(all.count, 32 * chunk)
        for i in 0..<8 {
            for rep in 0..<4 {
                let s = (i * 4 + rep) * chunk
                XCTAssertTrue(all[s..<(s + chunk)].allSatisfy { $0 == UInt8(i + 1) }, "chunk \(i)/\(rep) corrupted")
            }
        }
    }
}
