// Permission enforcement for a non-root caller (uid/gid 65534, no supplementary groups).
// Operations run on a dedicated thread whose credentials are changed with raw setresuid, so the
// test process stays root. FUSE only lets other users in with allow_other, so the mount uses it;
// every scenario runs on kernel tmpfs, on chargefs with allow_other, and on chargefs with
// allow_other,default_permissions, and the transcripts must be identical.

import Foundation
import Glibc
import XCTest

let nobody: uid_t = 65534

/// Runs `op` as uid/gid 65534 and renders "label -> ERRNO".
func asNobody(_ label: String, _ op: @escaping @Sendable () -> Int32) -> String {
    do {
        let e = try asUser(uid: nobody, gid: nobody) { errnoOf(op) }
        return "\(label) -> \(errnoName(e))"
    } catch {
        return "\(label) -> harness error \(error)"
    }
}

/// Opens `path` for writing and writes one byte at `offset`: 0, or -1 with errno set.
func writeByte(_ path: String, at offset: off_t) -> Int32 {
    let fd = open(path, O_WRONLY)
    if fd < 0 { return -1 }
    defer { close(fd) }
    var b: UInt8 = 9
    return Glibc.pwrite(fd, &b, 1, offset) == 1 ? 0 : -1
}

final class MountPermissionsTests: MountTestCase {
    override class var mountOptions: [String] { ["allow_other"] }

    /// Runs `scenario` on tmpfs, chargefs(allow_other), chargefs(allow_other,default_permissions).
    func compareAcross(_ what: String, file: StaticString = #filePath, line: UInt = #line,
                       _ scenario: (String, inout [String]) throws -> Void) throws {
        let tmp = try mountTmpfs()
        let dp = try mountChargeFS(options: ["allow_other", "default_permissions"], name: "dp")
        var transcripts: [(String, [String])] = []
        for (label, mnt) in [("tmpfs", tmp.mountpoint), ("chargefs allow_other", root), ("chargefs default_permissions", dp.mountpoint)] {
            let dir = mnt + "/s"
            try FS.mkdir(dir)
            chmod(dir, 0o755)
            var t: [String] = []
            try scenario(dir, &t)
            transcripts.append((label, t))
        }
        let ref = transcripts[0].1
        for (label, t) in transcripts.dropFirst() where t != ref {
            var diff: [String] = []
            for i in 0..<max(t.count, ref.count) {
                let a = i < t.count ? t[i] : "<missing>", b = i < ref.count ? ref[i] : "<missing>"
                diff.append(a == b ? "   \(a)" : " ≠ \(label): \(a)\n     tmpfs: \(b)")
            }
            XCTFail("\(what): \(label) differs from tmpfs:\n" + diff.joined(separator: "\n"), file: file, line: line)
        }
    }

    func testHarnessReallyDropsPrivileges() throws {
        let ids = try asUser { () -> [UInt32] in [getuid(), geteuid(), getgid(), getegid()] }
        XCTAssertEqual(ids, [nobody, nobody, nobody, nobody])
        XCTAssertEqual(getuid(), 0, "only the helper thread changed identity")
        // A root-only file on chargefs is refused to nobody, readable for root.
        try FS.create(p("secret"), [1], mode: 0o600)
        chmod(p("secret"), 0o600)
        let path = p("secret")
        XCTAssertEqual(asNobody("open secret", { openClose(path, O_RDONLY) }), "open secret -> EACCES")
        XCTAssertEqual(try FS.contents(path), [1])
    }

    func testFileAndDirectoryModesMatchTmpfs() throws {
        try compareAcross("mode bits") { dir, t in
            try FS.create(dir + "/r600", [1], mode: 0o600); chmod(dir + "/r600", 0o600)
            try FS.create(dir + "/r644", [1], mode: 0o644); chmod(dir + "/r644", 0o644)
            try FS.create(dir + "/r666", [1], mode: 0o666); chmod(dir + "/r666", 0o666)
            try FS.create(dir + "/x755", Array("#!/bin/sh\nexit 0\n".utf8)); chmod(dir + "/x755", 0o755)
            try FS.create(dir + "/x700", [1]); chmod(dir + "/x700", 0o700)
            try FS.mkdir(dir + "/d700"); chmod(dir + "/d700", 0o700)
            try FS.create(dir + "/d700/inner", [1], mode: 0o644)
            try FS.mkdir(dir + "/d755"); chmod(dir + "/d755", 0o755)
            try FS.mkdir(dir + "/d711"); chmod(dir + "/d711", 0o711)
            try FS.create(dir + "/d711/known", [1], mode: 0o644); chmod(dir + "/d711/known", 0o644)
            try FS.mkdir(dir + "/d777"); chmod(dir + "/d777", 0o777)
            let d = dir
            t.append(asNobody("read r600") { openClose(d + "/r600", O_RDONLY) })
            t.append(asNobody("read r644") { openClose(d + "/r644", O_RDONLY) })
            t.append(asNobody("write r644") { openClose(d + "/r644", O_WRONLY) })
            t.append(asNobody("write r666") { openClose(d + "/r666", O_WRONLY) })
            t.append(asNobody("truncate r644") { truncate(d + "/r644", 0) })
            t.append(asNobody("access X x755") { access(d + "/x755", X_OK) })
            t.append(asNobody("access X x700") { access(d + "/x700", X_OK) })
            t.append(asNobody("access W r666") { access(d + "/r666", W_OK) })
            t.append(asNobody("opendir d700") { opendir(d + "/d700").map { closedir($0); return 0 } ?? -1 })
            t.append(asNobody("stat d700/inner") { var st = StatBuf(); return stat(d + "/d700/inner", &st) })
            t.append(asNobody("create in d755") { openClose(d + "/d755/new", O_CREAT | O_WRONLY) })
            t.append(asNobody("mkdir in d755") { mkdir(d + "/d755/sub", 0o755) })
            t.append(asNobody("symlink in d755") { symlink("x", d + "/d755/l") })
            t.append(asNobody("mknod fifo in d755") { mkfifo(d + "/d755/p", 0o644) })
            t.append(asNobody("unlink r644 in 755 parent") { unlink(d + "/r644") })
            t.append(asNobody("rename r644 in 755 parent") { rename(d + "/r644", d + "/moved") })
            t.append(asNobody("link r644 into d777") { link(d + "/r644", d + "/d777/hl") })
            t.append(asNobody("opendir d711") { opendir(d + "/d711").map { closedir($0); return 0 } ?? -1 })
            t.append(asNobody("read d711/known") { openClose(d + "/d711/known", O_RDONLY) })
            t.append(asNobody("create in d777") { openClose(d + "/d777/mine", O_CREAT | O_WRONLY) })
            var st = StatBuf()
            lstat(d + "/d777/mine", &st)
            t.append("d777/mine owner=\(st.st_uid):\(st.st_gid) mode=\(String(st.perm, radix: 8))")
            t.append(asNobody("mkdir in d777") { mkdir(d + "/d777/mydir", 0o700) })
            lstat(d + "/d777/mydir", &st)
            t.append("d777/mydir owner=\(st.st_uid):\(st.st_gid)")
            t.append(asNobody("O_NOATIME on root's file") { openClose(d + "/r666", O_RDONLY | LinuxConst.O_NOATIME) })
            t.append(asNobody("O_NOATIME on own file") { openClose(d + "/d777/mine", O_RDONLY | LinuxConst.O_NOATIME) })
            t.append("root reads r600 -> \(errnoName(errnoOf { openClose(d + "/r600", O_RDONLY) }))")
        }
    }

    func testStickyDirectoryMatchesTmpfs() throws {
        try compareAcross("sticky dir") { dir, t in
            try FS.mkdir(dir + "/tmp"); chmod(dir + "/tmp", 0o1777)
            try FS.create(dir + "/tmp/roots", [1], mode: 0o666); chmod(dir + "/tmp/roots", 0o666)
            try FS.mkdir(dir + "/tmp/rootdir"); chmod(dir + "/tmp/rootdir", 0o777)
            let d = dir + "/tmp"
            t.append(asNobody("create own") { openClose(d + "/mine", O_CREAT | O_WRONLY) })
            t.append(asNobody("unlink root's file") { unlink(d + "/roots") })
            t.append(asNobody("rename root's file") { rename(d + "/roots", d + "/stolen") })
            t.append(asNobody("rename onto root's file") { rename(d + "/mine", d + "/roots") })
            t.append(asNobody("rmdir root's dir") { rmdir(d + "/rootdir") })
            t.append(asNobody("write root's 666 file") { openClose(d + "/roots", O_WRONLY) })
            t.append(asNobody("rename own") { rename(d + "/mine", d + "/mine2") })
            t.append(asNobody("unlink own") { unlink(d + "/mine2") })
            t.append("root unlinks nobody's file -> \(errnoName(errnoOf { () -> Int32 in _ = openClose(d + "/x", O_CREAT | O_WRONLY); chown(d + "/x", nobody, nobody); return unlink(d + "/x") }))")
        }
    }

    func testOwnershipChangesMatchTmpfs() throws {
        try compareAcross("chmod/chown/utimes by non-owner") { dir, t in
            let d = dir
            try FS.create(d + "/roots", [1]); chmod(d + "/roots", 0o666)
            try FS.create(d + "/mine", [1]); chown(d + "/mine", nobody, nobody); chmod(d + "/mine", 0o644)
            try FS.create(d + "/mine-othergrp", [1]); chown(d + "/mine-othergrp", nobody, 4242); chmod(d + "/mine-othergrp", 0o644)
            t.append(asNobody("chmod root's file") { chmod(d + "/roots", 0o777) })
            t.append(asNobody("chown root's file to self") { chown(d + "/roots", nobody, nobody) })
            t.append(asNobody("chmod own file") { chmod(d + "/mine", 0o600) })
            t.append(asNobody("chown own file to root") { chown(d + "/mine", 0, UInt32.max) })
            t.append(asNobody("chgrp own file to foreign group") { chown(d + "/mine", UInt32.max, 4242) })
            t.append(asNobody("chown own file to self") { chown(d + "/mine", nobody, nobody) })
            t.append(asNobody("chmod g+s own file, group not mine") { chmod(d + "/mine-othergrp", 0o2755) })
            t.append("  mode=\(modeString(d + "/mine-othergrp"))")
            t.append(asNobody("chmod u+s own file") { chmod(d + "/mine", 0o4755) })
            t.append("  mode=\(modeString(d + "/mine"))")
            t.append(asNobody("utimes NOW on root's writable file") { utimens(d + "/roots", atime: (0, LinuxConst.UTIME_NOW), mtime: (0, LinuxConst.UTIME_NOW)) })
            t.append(asNobody("utimes explicit on root's writable file") { utimens(d + "/roots", atime: (5, 0), mtime: (5, 0)) })
            t.append(asNobody("utimes NULL on root's writable file") { utimensat(AT_FDCWD, d + "/roots", nil, 0) })
            t.append(asNobody("utimes explicit on own file") { utimens(d + "/mine", atime: (5, 0), mtime: (5, 0)) })
            t.append(asNobody("user xattr on root's 666 file") { Sys.setxattr(d + "/roots", "user.x", [1]) })
            chmod(d + "/roots", 0o644)
            t.append(asNobody("user xattr on root's 644 file") { Sys.setxattr(d + "/roots", "user.y", [1]) })
            t.append(asNobody("trusted xattr on own file") { Sys.setxattr(d + "/mine", "trusted.x", [1]) })
            t.append(asNobody("read user xattr of root's 644 file") { Int32(truncatingIfNeeded: Sys.getxattr(d + "/roots", "user.x", size: 10).0 < 0 ? -1 : 0) })
        }
    }

    func testWriteByNonOwnerClearsSetidBitsLikeTmpfs() throws {
        try compareAcross("setid clearing on write/truncate") { dir, t in
            let d = dir
            for (name, mode) in [("ug-gx", 0o6777), ("g-nogx", 0o2767), ("u-only", 0o4777), ("dir-sgid-file", 0o2777)] as [(String, mode_t)] {
                try FS.create(d + "/" + name, [1, 2, 3])
                chmod(d + "/" + name, mode)
                t.append(asNobody("write \(name)") { writeByte(d + "/" + name, at: 0) })
                t.append("  \(name) mode after nobody's write=\(modeString(d + "/" + name))")
                chmod(d + "/" + name, mode)
                t.append(asNobody("truncate \(name)") { truncate(d + "/" + name, 1) })
                t.append("  \(name) mode after nobody's truncate=\(modeString(d + "/" + name))")
                chmod(d + "/" + name, mode)
                t.append(asNobody("open O_TRUNC \(name)") { openClose(d + "/" + name, O_WRONLY | O_TRUNC) })
                t.append("  \(name) mode after nobody's O_TRUNC=\(modeString(d + "/" + name))")
                // The bits set again must go again: the kernel must not keep thinking the file
                // has nothing to clear (S_NOSEC) after the first write.
                chmod(d + "/" + name, mode)
                t.append(asNobody("second write \(name)") { writeByte(d + "/" + name, at: 2) })
                t.append("  \(name) mode after nobody's second write=\(modeString(d + "/" + name))")
            }
            // One open descriptor across a chmod u+s by the owner: the next write still clears it.
            try FS.create(d + "/held", [1]); chown(d + "/held", nobody, nobody); chmod(d + "/held", 0o666)
            t.append(asNobody("write, chmod u+s, write on one fd") { () -> Int32 in
                let fd = open(d + "/held", O_WRONLY)
                if fd < 0 { return -1 }
                defer { close(fd) }
                var b: UInt8 = 1
                if Glibc.write(fd, &b, 1) != 1 { return -1 }
                if chmod(d + "/held", 0o4766) != 0 { return -1 }
                return Glibc.write(fd, &b, 1) == 1 ? 0 : -1
            })
            t.append("  held mode=\(modeString(d + "/held"))")
            t.append(asNobody("chown own setuid file to self") { () -> Int32 in
                chown(d + "/held", nobody, nobody)
            })
            chmod(d + "/held", 0o6777)
            t.append(asNobody("chown own file to self again") { chown(d + "/held", nobody, nobody) })
            t.append("  held mode after chown=\(modeString(d + "/held"))")
        }
    }

    func testSetgidDirectoryForNonRootCreator() throws {
        try compareAcross("setgid dir, non-root creator") { dir, t in
            let d = dir + "/sg"
            try FS.mkdir(d)
            chown(d, 0, 4242)
            chmod(d, 0o2777)
            t.append(asNobody("create") { openClose(d + "/f", O_CREAT | O_WRONLY, 0o2755) })
            t.append(asNobody("mkdir") { mkdir(d + "/sub", 0o755) })
            for n in ["f", "sub"] {
                var st = StatBuf()
                lstat(d + "/" + n, &st)
                t.append("\(n): uid=\(st.st_uid) gid=\(st.st_gid) mode=\(String(st.perm, radix: 8))")
            }
        }
    }

    /// Without allow_other, FUSE refuses every other user outright (kernel behaviour); chargefs
    /// must not silently add allow_other.
    func testWithoutAllowOtherOtherUsersAreRefused() throws {
        let m = try mountChargeFS(options: [], name: "private")
        try FS.create(m.mountpoint + "/f", [1], mode: 0o666)
        chmod(m.mountpoint + "/f", 0o666)
        let path = m.mountpoint + "/f"
        XCTAssertEqual(asNobody("open", { openClose(path, O_RDONLY) }), "open -> EACCES")
    }
}
