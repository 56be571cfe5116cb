// Bad command lines: non-zero exit, a one-line stderr naming the problem, nothing mounted, no
// daemon left behind — in background mode (the default) and with -f.

import Foundation
import Glibc
import XCTest

final class MountBadInputTests: MountTestCase {
    override class var autoMount: Bool { false }

    /// Runs chargefsd with `args` (and again with -f appended) and checks the rejection.
    func assertRejected(_ args: [String], mentions: [String], watch mountpoints: [String] = [],
                        file: StaticString = #filePath, line: UInt = #line) throws {
        let bin = try Daemon.binaryPath()
        let logDir = try scratch.path
        for variant in [args, args + ["-f"]] {
            let label = "chargefsd \(variant.joined(separator: " "))"
            // Mounts under this test's scratch directory: other chargefs mounts on the machine
            // (another test run) are not this test's business.
            func ourMounts() -> Int {
                MountTable.entries().filter { $0.fsType == "fuse.chargefsd" && $0.mountPoint.hasPrefix(logDir + "/") }.count
            }
            let mountsBefore = ourMounts()
            let before = Daemon.runningPids()
            let watchedBefore = mountpoints.map { MountTable.entries(at: $0).count }
            let r: (code: Int32?, out: String, err: String)
            do {
                r = try Child.run([bin] + variant, logDir: logDir, timeout: 10)
            } catch {
                XCTFail("\(label): \(error)", file: file, line: line)
                continue
            }
            XCTAssertNotNil(r.code, "\(label): must exit, not die by a signal", file: file, line: line)
            XCTAssertNotEqual(r.code, 0, "\(label): must fail", file: file, line: line)
            let lines = r.err.split(separator: "\n", omittingEmptySubsequences: true)
            XCTAssertEqual(lines.count, 1, "\(label): stderr must be one line, got: \(r.err.debugDescription)", file: file, line: line)
            let lower = r.err.lowercased()
            XCTAssertTrue(mentions.contains { lower.contains($0.lowercased()) },
                          "\(label): stderr should name the problem (one of \(mentions)); got: \(r.err.debugDescription)", file: file, line: line)
            // Nothing mounted.
            let mountsAfter = ourMounts()
            XCTAssertEqual(mountsAfter, mountsBefore, "\(label): a mount was left behind", file: file, line: line)
            for (m, n) in zip(mountpoints, watchedBefore) {
                XCTAssertEqual(MountTable.entries(at: m).count, n, "\(label): \(m) got mounted", file: file, line: line)
            }
            // No daemon left (give a daemonized child a moment to show up).
            usleep(200_000)
            let leftover = Daemon.runningPids().subtracting(before)
            XCTAssertTrue(leftover.isEmpty, "\(label): chargefsd processes left running: \(leftover)", file: file, line: line)
            for pid in leftover { kill(pid, SIGKILL) }
            for (m, n) in zip(mountpoints, watchedBefore) where MountTable.entries(at: m).count > n {
                _ = umount2(m, Int32(MNT_DETACH))
            }
        }
    }

    func testUnknownOption() throws {
        let mnt = try scratch.makeDir("m")
        try assertRejected([mnt, "-o", "bogus_opt=1"], mentions: ["bogus_opt"], watch: [mnt])
        try assertRejected([mnt, "-o", "size=1m,frobnicate"], mentions: ["frobnicate"], watch: [mnt])
    }

    func testUnknownFlag() throws {
        let mnt = try scratch.makeDir("m")
        try assertRejected([mnt, "-x"], mentions: ["-x"], watch: [mnt])
        try assertRejected([mnt, "--bogus-flag"], mentions: ["--bogus-flag", "bogus-flag"], watch: [mnt])
    }

    func testMalformedSizes() throws {
        let mnt = try scratch.makeDir("m")
        for bad in ["12q", "abc", "-1", "1.5g", "10%%", "101%x", "99999999999999999999"] {
            try assertRejected([mnt, "-o", "size=\(bad)"], mentions: [bad, "size"], watch: [mnt])
        }
        try assertRejected([mnt, "-o", "size="], mentions: ["size"], watch: [mnt])
        try assertRejected([mnt, "-o", "nr_inodes=lots"], mentions: ["lots", "nr_inodes"], watch: [mnt])
        try assertRejected([mnt, "-o", "nr_inodes=5%"], mentions: ["5%", "nr_inodes"], watch: [mnt])
    }

    func testMalformedModeUidGid() throws {
        let mnt = try scratch.makeDir("m")
        try assertRejected([mnt, "-o", "mode=999"], mentions: ["999", "mode"], watch: [mnt])
        try assertRejected([mnt, "-o", "mode=rwx"], mentions: ["rwx", "mode"], watch: [mnt])
        try assertRejected([mnt, "-o", "uid=alice"], mentions: ["alice", "uid"], watch: [mnt])
        try assertRejected([mnt, "-o", "gid=-5"], mentions: ["-5", "gid"], watch: [mnt])
    }

    func testMissingMountpoint() throws {
        try assertRejected([], mentions: ["mountpoint", "mount point"])
        try assertRejected(["-o", "size=1m"], mentions: ["mountpoint", "mount point"])
    }

    func testMountpointIsAFileOrMissing() throws {
        let file = try scratch.path + "/plainfile"
        try FS.create(file, [1])
        try assertRejected([file], mentions: [file, "not a directory"])
        let missing = try scratch.path + "/does-not-exist"
        try assertRejected([missing], mentions: [missing, "no such"])
        try assertRejected(["src", file], mentions: [file, "not a directory"])
    }

    func testMountpointBusy() throws {
        let first = try mountChargeFS(options: [], name: "busy")
        try FS.create(first.mountpoint + "/keep", [7])
        try assertRejected([first.mountpoint], mentions: [first.mountpoint, "busy", "already mounted"], watch: [first.mountpoint])
        XCTAssertEqual(MountTable.entries(at: first.mountpoint).count, 1, "no second mount stacked on top")
        XCTAssertEqual(try FS.contents(first.mountpoint + "/keep"), [7], "the existing mount keeps working")
        XCTAssertFalse(first.daemon.poll(), "the existing daemon is untouched")
    }

    func testBadMemcgPath() throws {
        let mnt = try scratch.makeDir("m")
        try assertRejected([mnt, "-o", "memcg=/sys/fs/cgroup/definitely/not/there"], mentions: ["memcg", "definitely/not/there"], watch: [mnt])
        try assertRejected([mnt, "-o", "memcg=/tmp"], mentions: ["memcg", "/tmp"], watch: [mnt])
    }

    func testTooManyArguments() throws {
        let mnt = try scratch.makeDir("m")
        try assertRejected(["src", mnt, "extra-arg"], mentions: ["extra-arg", "argument"], watch: [mnt])
    }
}
