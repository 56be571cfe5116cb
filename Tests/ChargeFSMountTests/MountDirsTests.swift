// Directories: creation/removal errnos, link counts, readdir completeness and stability.

import Foundation
import Glibc
import TestSupport
import XCTest

final class MountDirsTests: MountTestCase {
    func testMkdirRmdirErrnosMatchTmpfs() throws {
        try assertSameAsTmpfs("mkdir/rmdir") { dir, t in
            record(&t, "mkdir d", mkdir(dir + "/d", 0o755))
            record(&t, "mkdir d again", mkdir(dir + "/d", 0o755))
            record(&t, "mkdir d/sub", mkdir(dir + "/d/sub", 0o700))
            record(&t, "mkdir missing/x", mkdir(dir + "/missing/x", 0o755))
            record(&t, "rmdir d (non-empty)", rmdir(dir + "/d"))
            try FS.create(dir + "/d/sub/file")
            record(&t, "rmdir d/sub (has file)", rmdir(dir + "/d/sub"))
            record(&t, "rmdir file", rmdir(dir + "/d/sub/file"))
            record(&t, "unlink dir", unlink(dir + "/d/sub"))
            record(&t, "rmdir d/.", rmdir(dir + "/d/."))
            record(&t, "rmdir d/sub/..", rmdir(dir + "/d/sub/.."))
            record(&t, "unlink file", unlink(dir + "/d/sub/file"))
            record(&t, "rmdir d/sub", rmdir(dir + "/d/sub"))
            record(&t, "rmdir d", rmdir(dir + "/d"))
            record(&t, "rmdir d again", rmdir(dir + "/d"))
            record(&t, "mkdir 0o7777", mkdir(dir + "/m", 0o7777))
            var st = StatBuf()
            lstat(dir + "/m", &st)
            t.append("mode of mkdir 7777 (umask \(String(currentUmask(), radix: 8))): \(String(st.perm, radix: 8)) nlink=\(st.st_nlink)")
        }
        XCTAssertErrno(ENOTEMPTY, { () -> Int32 in
            try? FS.mkdir(p("x")); try? FS.create(p("x/y")); return rmdir(p("x"))
        }())
    }

    func testDirectoryLinkCountCountsSubdirectories() throws {
        let rootNlink = try FS.statOf(root).st_nlink
        try FS.mkdir(p("d"))
        XCTAssertEqual(try FS.statOf(p("d")).st_nlink, 2)
        XCTAssertEqual(try FS.statOf(root).st_nlink, rootNlink + 1)
        for i in 0..<3 { try FS.mkdir(p("d/s\(i)")) }
        for i in 0..<4 { try FS.create(p("d/f\(i)")) }
        try sys("symlink", symlink("s0", p("d/l")))
        try sys("mkfifo", mkfifo(p("d/fifo"), 0o644))
        XCTAssertEqual(try FS.statOf(p("d")).st_nlink, 5, "2 + 3 subdirs; files/links/fifos do not count")
        try sys("rmdir", rmdir(p("d/s2")))
        XCTAssertEqual(try FS.statOf(p("d")).st_nlink, 4)
        try FS.mkdir(p("e"))
        try sys("rename", rename(p("d/s1"), p("e/s1")))
        XCTAssertEqual(try FS.statOf(p("d")).st_nlink, 3)
        XCTAssertEqual(try FS.statOf(p("e")).st_nlink, 3)
        // ".." of the moved dir now points at e.
        XCTAssertEqual(try FS.statOf(p("e/s1/..")).st_ino, try FS.statOf(p("e")).st_ino)
        // Replacing an empty dir by rename keeps counts right.
        try FS.mkdir(p("e/s2"))
        XCTAssertEqual(try FS.statOf(p("e")).st_nlink, 4)
        try sys("rename", rename(p("d/s0"), p("e/s2")))
        XCTAssertEqual(try FS.statOf(p("e")).st_nlink, 4)
        XCTAssertEqual(try FS.statOf(p("d")).st_nlink, 2)
        try assertSameAsTmpfs("nlink sequence") { dir, t in
            func n(_ rel: String) -> String { var st = StatBuf(); return lstat(dir + "/" + rel, &st) == 0 ? "\(st.st_nlink)" : errnoName(errno) }
            try FS.mkdir(dir + "/a"); t.append("a=\(n("a"))")
            try FS.mkdir(dir + "/a/b"); try FS.mkdir(dir + "/a/c"); t.append("a=\(n("a")) dir=\(n(""))")
            try FS.mkdir(dir + "/x")
            record(&t, "exchange a/b <-> x/file", { () -> Int32 in try? FS.create(dir + "/x/file"); return Sys.renameat2(dir + "/a/b", dir + "/x/file", LinuxConst.RENAME_EXCHANGE) }())
            t.append("a=\(n("a")) x=\(n("x")) x/file=\(n("x/file")) a/b=\(n("a/b"))")
            record(&t, "rmdir a/c", rmdir(dir + "/a/c"))
            t.append("a=\(n("a"))")
        }
    }

    func testReaddirReturnsEveryEntryOnceWithTypes() throws {
        try FS.mkdir(p("big"))
        var expected: Set<String> = []
        for i in 0..<1500 {
            let name = "entry-\(i)-" + String(repeating: "x", count: i % 200)
            try FS.create(p("big/" + name))
            expected.insert(name)
        }
        let listed = try FS.list(p("big"))
        XCTAssertEqual(listed.count, 1500, "no duplicates, nothing missing")
        XCTAssertEqual(Set(listed), expected)
        // d_type and "." / ".." entries.
        try FS.mkdir(p("typed"))
        try FS.mkdir(p("typed/dir"))
        try FS.create(p("typed/reg"))
        try sys("symlink", symlink("reg", p("typed/lnk")))
        try sys("mkfifo", mkfifo(p("typed/fifo"), 0o644))
        guard let d = opendir(p("typed")) else { throw SysError(op: "opendir", code: errno) }
        defer { closedir(d) }
        var types: [String: UInt8] = [:]
        var inodes: [String: ino_t] = [:]
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            types[name] = e.pointee.d_type
            inodes[name] = e.pointee.d_ino
        }
        XCTAssertEqual(Set(types.keys), [".", "..", "dir", "reg", "lnk", "fifo"])
        XCTAssertEqual(types["dir"], UInt8(DT_DIR))
        XCTAssertEqual(types["reg"], UInt8(DT_REG))
        XCTAssertEqual(types["lnk"], UInt8(DT_LNK))
        XCTAssertEqual(types["fifo"], UInt8(DT_FIFO))
        XCTAssertEqual(inodes["reg"].map { UInt64($0) }, UInt64(try FS.lstatOf(p("typed/reg")).st_ino))
        // Empty directory lists only . and ..
        try FS.mkdir(p("empty"))
        XCTAssertEqual(try FS.list(p("empty")), [])
    }

    /// Entries that exist for the whole listing must appear exactly once even while other
    /// entries are added and removed concurrently (POSIX readdir guarantee, tmpfs behaviour).
    func testReaddirStableUnderConcurrentAddRemove() throws {
        let dir = p("churn")
        try FS.mkdir(dir)
        var stable: Set<String> = []
        for i in 0..<400 {
            let name = "stable-\(i)"
            try FS.create(dir + "/" + name)
            stable.insert(name)
        }
        final class Flag: @unchecked Sendable {
            private let lock = NSLock()
            private var v = false
            var value: Bool { lock.withLock { v } }
            func set() { lock.withLock { v = true } }
        }
        let stop = Flag()
        let done = DispatchSemaphore(value: 0)
        let churnDir = dir
        Thread.detachNewThread {
            var i = 0
            while !stop.value {
                let name = churnDir + "/churn-\(i % 300)"
                if i % 2 == 0 || i % 7 == 0 {
                    _ = openClose(name, O_CREAT | O_WRONLY)
                } else {
                    unlink(churnDir + "/churn-\((i * 7) % 300)")
                }
                if i % 50 == 0 { _ = rename(churnDir + "/churn-\(i % 300)", churnDir + "/churn-r\(i % 300)") }
                i += 1
            }
            done.signal()
        }
        defer {
            stop.set()
            _ = done.wait(timeout: .now() + 10)
        }
        for pass in 0..<15 {
            // Small reads force several READDIR round-trips with offsets.
            guard let d = opendir(dir) else { throw SysError(op: "opendir", code: errno) }
            var seen: [String: Int] = [:]
            while true {
                errno = 0
                guard let e = readdir(d) else {
                    XCTAssertEqual(errno, 0, "readdir error in pass \(pass): \(errnoName(errno))")
                    break
                }
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
                seen[name, default: 0] += 1
            }
            closedir(d)
            let missing = stable.filter { seen[$0] == nil }
            let dups = seen.filter { $0.value > 1 }.map(\.key)
            XCTAssertTrue(missing.isEmpty, "pass \(pass): stable entries missing: \(missing.sorted().prefix(10))")
            XCTAssertTrue(dups.isEmpty, "pass \(pass): duplicated entries: \(dups.sorted().prefix(10))")
            if !missing.isEmpty || !dups.isEmpty { break }
        }
    }

    /// Several threads create, rename, link and unlink in one directory at once; afterwards every
    /// listed entry must stat, link counts must be consistent, and the daemon must still be alive.
    func testConcurrentNamespaceChurnStaysConsistent() throws {
        let dir = p("race")
        try FS.mkdir(dir)
        DispatchQueue.concurrentPerform(iterations: 4) { w in
            var rng = SplitMix64(seed: UInt64(w + 1))
            for i in 0..<400 {
                let a = dir + "/n\(rng.next() % 40)", b = dir + "/n\(rng.next() % 40)"
                switch rng.next() % 6 {
                case 0: _ = openClose(a, O_CREAT | O_WRONLY)
                case 1: rename(a, b)
                case 2: link(a, b)
                case 3: unlink(a)
                case 4: _ = Sys.renameat2(a, b, LinuxConst.RENAME_EXCHANGE)
                default: mkdir(a, 0o755); rmdir(b)
                }
                if i % 100 == 0 { _ = try? FS.list(dir) }
            }
        }
        let names = try FS.list(dir)
        var inodeLinks: [ino_t: (nlink: nlink_t, seen: Int)] = [:]
        var subdirs = 0
        for n in names {
            let st = try FS.lstatOf(dir + "/" + n)
            if st.fileType == S_IFDIR { subdirs += 1; continue }
            inodeLinks[st.st_ino, default: (st.st_nlink, 0)].seen += 1
        }
        for (ino, v) in inodeLinks {
            XCTAssertEqual(Int(v.nlink), v.seen, "inode \(ino): st_nlink \(v.nlink) but \(v.seen) names in the only directory")
        }
        XCTAssertEqual(Int(try FS.statOf(dir).st_nlink), 2 + subdirs)
        XCTAssertFalse(try fs.daemon.poll(), "daemon died")
    }

    /// seekdir/telldir: resuming a listing at a remembered position continues where it stopped.
    func testTelldirSeekdirResume() throws {
        try FS.mkdir(p("s"))
        for i in 0..<100 { try FS.create(p("s/n\(i)")) }
        guard let d = opendir(p("s")) else { throw SysError(op: "opendir", code: errno) }
        defer { closedir(d) }
        var first: [String] = []
        for _ in 0..<40 {
            guard let e = readdir(d) else { break }
            first.append(withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) })
        }
        let pos = telldir(d)
        var rest1: [String] = []
        while let e = readdir(d) { rest1.append(withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }) }
        seekdir(d, pos)
        var rest2: [String] = []
        while let e = readdir(d) { rest2.append(withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }) }
        XCTAssertEqual(rest1, rest2)
        XCTAssertEqual(Set(first + rest1).subtracting([".", ".."]).count, 100)
        XCTAssertEqual(first.count + rest1.count, 102)
    }

    func testDeepNestingAndDirectoryTimes() throws {
        var path = root
        for i in 0..<40 {
            path += "/level\(i)"
            try FS.mkdir(path)
        }
        try FS.create(path + "/leaf", [42])
        XCTAssertEqual(try FS.contents(path + "/leaf"), [42])
        try assertSameAsTmpfs("directory timestamps") { dir, t in
            try FS.mkdir(dir + "/d")
            func times() -> (Int, Int) { var st = StatBuf(); lstat(dir + "/d", &st); return (st.mtimeNs, st.ctimeNs) }
            var before = times(); tick()
            try FS.create(dir + "/d/f")
            var after = times()
            t.append("create: mtime changed=\(after.0 != before.0) ctime changed=\(after.1 != before.1)")
            before = after; tick()
            _ = openClose(dir + "/d/f", O_WRONLY | O_TRUNC)
            after = times()
            t.append("truncate child: dir mtime changed=\(after.0 != before.0)")
            before = after; tick()
            unlink(dir + "/d/f")
            after = times()
            t.append("unlink: mtime changed=\(after.0 != before.0) ctime changed=\(after.1 != before.1)")
            before = after; tick()
            mkdir(dir + "/d/sub", 0o755)
            after = times()
            t.append("mkdir: mtime changed=\(after.0 != before.0) ctime changed=\(after.1 != before.1)")
            before = after; tick()
            _ = FS.exists(dir + "/d/sub")
            _ = try? FS.list(dir + "/d")
            after = times()
            t.append("readdir: mtime changed=\(after.0 != before.0)")
        }
    }
}

func currentUmask() -> mode_t {
    let m = umask(0o022)
    umask(m)
    return m
}
