// Daemon lifecycle and mount options through the real command line.

import Foundation
import Glibc
import XCTest

extension MountTestCase {
    /// Starts `chargefsd [args]` in background mode (no -f); returns once the command returned.
    /// The daemon it leaves behind is found by its unique mountpoint argument and cleaned up.
    func startBackground(_ args: [String], mountpoint: String) throws -> (code: Int32?, err: String, pids: Set<pid_t>) {
        let bin = try Daemon.binaryPath()
        let logDir = try scratch.path
        let r = try Child.run([bin] + args, logDir: logDir, timeout: 10)
        let pids = Daemon.pids(withArgument: mountpoint)
        for pid in pids { Live.shared.add(pid: pid) }
        Live.shared.add(mount: mountpoint)
        addCleanup {
            Unmount.fuse(mountpoint, logDir: logDir)
            for pid in pids {
                for _ in 0..<100 where kill(pid, 0) == 0 { usleep(20_000) }
                if kill(pid, 0) == 0 { kill(pid, SIGTERM); usleep(300_000) }
                if kill(pid, 0) == 0 { kill(pid, SIGKILL) }
                Live.shared.remove(pid: pid)
            }
            Unmount.lazy(mountpoint, logDir: logDir)
            Live.shared.remove(mount: mountpoint)
        }
        return (r.code, r.err, pids)
    }
}

/// Waits until every thread of `pid` is stopped (state T in /proc/PID/task/TID/stat).
func allThreadsStopped(_ pid: pid_t, timeout: Double) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        let stopped = !tasks.isEmpty && tasks.allSatisfy { tid in
            guard let s = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/stat", encoding: .utf8),
                  let close = s.lastIndex(of: ")") else { return false }
            return s[s.index(close, offsetBy: 2)] == "T"
        }
        if stopped { return true }
        usleep(5_000)
    }
    return false
}

/// Waits until `pid` (not our child) is gone or a zombie.
func waitGone(_ pid: pid_t, timeout: Double) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if kill(pid, 0) != 0 { return true }
        if let s = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
           let close = s.lastIndex(of: ")"), s[s.index(close, offsetBy: 2)] == "Z" { return true }
        usleep(20_000)
    }
    return false
}

final class MountCLITests: MountTestCase {
    override class var autoMount: Bool { false }

    func testBackgroundModeReturnsWithMountReady() throws {
        let mnt = try scratch.makeDir("bg")
        let r = try startBackground([mnt, "-o", "size=2m"], mountpoint: mnt)
        XCTAssertEqual(r.code, 0, "background start: \(r.err)")
        // Ready the moment the command returns: no polling here.
        XCTAssertEqual(MountTable.entries(at: mnt).last?.fsType, "fuse.chargefsd")
        XCTAssertNoThrow(try FS.create(mnt + "/x", [1, 2]))
        XCTAssertEqual(try FS.contents(mnt + "/x"), [1, 2])
        XCTAssertEqual(r.pids.count, 1, "exactly one daemon left running: \(r.pids)")
        // fusermount3 -u ends the background daemon.
        let u = try Child.run(["/usr/bin/fusermount3", "-u", mnt], logDir: try scratch.path)
        XCTAssertEqual(u.code, 0, u.err)
        for pid in r.pids { XCTAssertTrue(waitGone(pid, timeout: 5), "daemon \(pid) still running after fusermount3 -u") }
        XCTAssertTrue(MountTable.entries(at: mnt).isEmpty)
    }

    func testSigtermWithOpenFileExitsZeroAndUnmounts() throws {
        for sig in [SIGTERM, SIGINT] {
            let m = try mountChargeFS(options: [], name: "sig\(sig)")
            let fd = try FS.open(m.mountpoint + "/open", O_CREAT | O_RDWR)
            _ = try FS.write(fd, [1, 2, 3], at: 0)
            m.daemon.signal(sig)
            XCTAssertTrue(m.daemon.wait(timeout: 5), "daemon did not exit on signal \(sig)")
            XCTAssertEqual(m.daemon.exitCode, 0, "signal \(sig): \(m.daemon.statusDescription); stderr: \(m.daemon.stderrText.suffix(500))")
            var gone = false
            for _ in 0..<100 { if !m.isMounted { gone = true; break }; usleep(20_000) }
            XCTAssertTrue(gone, "mount still present after signal \(sig)")
            close(fd)
        }
    }

    func testFusermountAndUmountEndTheDaemon() throws {
        let a = try mountChargeFS(options: [], name: "fu")
        let u = try Child.run(["/usr/bin/fusermount3", "-u", a.mountpoint], logDir: try scratch.path)
        XCTAssertEqual(u.code, 0, u.err)
        XCTAssertTrue(a.daemon.wait(timeout: 5), "fusermount3 -u did not end the daemon")
        XCTAssertEqual(a.daemon.exitCode, 0, a.daemon.statusDescription)
        let b = try mountChargeFS(options: [], name: "um")
        XCTAssertErrno(0, umount2(b.mountpoint, 0))
        XCTAssertTrue(b.daemon.wait(timeout: 5), "umount did not end the daemon")
        XCTAssertEqual(b.daemon.exitCode, 0, b.daemon.statusDescription)
    }

    func testHelpAndVersion() throws {
        let bin = try Daemon.binaryPath()
        let before = MountTable.entries().count
        let v = try Child.run([bin, "-V"], logDir: try scratch.path)
        XCTAssertEqual(v.code, 0)
        XCTAssertTrue((v.out + v.err).lowercased().contains("chargefsd"), "version output: \(v.out) \(v.err)")
        let h = try Child.run([bin, "-h"], logDir: try scratch.path)
        XCTAssertEqual(h.code, 0)
        XCTAssertTrue((h.out + h.err).contains("size="), "help mentions size=: \(h.out)")
        XCTAssertEqual(MountTable.entries().count, before, "-h/-V must not mount anything")
    }

    func testMountOptionsAppliedAndShown() throws {
        let m = try mountChargeFS(options: ["mode=0750", "uid=1000", "gid=2000", "nosuid", "nodev", "noexec", "noatime", "allow_other"],
                                  source: "my-source", name: "opts")
        let st = try FS.statOf(m.mountpoint)
        XCTAssertEqual(String(st.perm, radix: 8), "750")
        XCTAssertEqual(st.st_uid, 1000)
        XCTAssertEqual(st.st_gid, 2000)
        let e = try XCTUnwrap(m.entry)
        XCTAssertEqual(e.fsType, "fuse.chargefsd")
        XCTAssertEqual(e.source, "my-source")
        let mo = Set(e.mountOptions.split(separator: ",").map(String.init))
        XCTAssertTrue(mo.isSuperset(of: ["nosuid", "nodev", "noexec", "noatime"]), "mount options: \(e.mountOptions)")
        XCTAssertTrue(e.superOptions.contains("allow_other"), "super options: \(e.superOptions)")
        let procLine = MountTable.procMountsLines(containing: m.mountpoint).first ?? ""
        XCTAssertTrue(procLine.hasPrefix("my-source \(m.mountpoint) fuse.chargefsd "), "/proc/mounts: \(procLine)")
        // noexec is enforced.
        let script = m.mountpoint + "/run.sh"
        try FS.create(script, Array("#!/bin/sh\nexit 0\n".utf8), mode: 0o755)
        chmod(script, 0o755)
        XCTAssertThrowsError(try Child(argv: [script], logDir: try scratch.path, tag: "noexec")) { err in
            XCTAssertEqual((err as? SysError).map { errnoName($0.code) }, "EACCES")
        }
        // noatime: reads do not touch atime.
        let f = m.mountpoint + "/na"
        try FS.create(f, [1])
        _ = utimens(f, atime: (1000, 0), mtime: (2000, 0))
        _ = try FS.contents(f)
        XCTAssertEqual(try FS.statOf(f).st_atim.tv_sec, 1000, "noatime")
    }

    func testExecWorksWithoutNoexec() throws {
        let m = try mountChargeFS(options: [], name: "exec")
        let script = m.mountpoint + "/run.sh"
        try FS.create(script, Array("#!/bin/sh\necho ran-from-chargefs\nexit 7\n".utf8), mode: 0o755)
        chmod(script, 0o755)
        let r = try Child.run([script], logDir: try scratch.path)
        XCTAssertEqual(r.code, 7)
        XCTAssertEqual(r.out, "ran-from-chargefs\n")
    }

    func testReadOnlyMount() throws {
        let m = try mountChargeFS(options: ["ro"], name: "ro")
        XCTAssertErrno(EROFS, openClose(m.mountpoint + "/x", O_CREAT | O_WRONLY))
        XCTAssertErrno(EROFS, mkdir(m.mountpoint + "/d", 0o755))
        XCTAssertErrno(EROFS, chmod(m.mountpoint, 0o700))
        XCTAssertTrue(m.entry?.mountOptions.split(separator: ",").contains("ro") ?? false)
        XCTAssertNotEqual(Sys.statfs(m.mountpoint).1.flags & 1, 0, "ST_RDONLY in statfs flags")
        XCTAssertEqual(try FS.list(m.mountpoint), [])
    }

    func testDebugFlagRunsInForegroundWithTrace() throws {
        let m = try mountChargeFS(options: [], name: "dbg", extraArgs: ["-d"])
        try FS.create(m.mountpoint + "/traced", [1])
        XCTAssertFalse(m.daemon.poll(), "-d keeps the daemon in the foreground")
        usleep(100_000)
        XCTAssertFalse(m.daemon.stderrText.isEmpty, "-d prints a FUSE trace")
    }

    /// The per-test watchdog must turn a FUSE hang into a quick failure: a stopped daemon blocks
    /// syscalls; killing it (what the watchdog does) must make them fail (ECONNABORTED/ENOTCONN).
    func testWatchdogUnblocksHungMount() throws {
        let m = try mountChargeFS(options: [], name: "hang")
        let path = m.mountpoint + "/never-looked-up-\(UUID().uuidString)"
        let overUring = m.transport == "io_uring"
        kill(m.daemon.pid, SIGSTOP)
        // kill returns before every thread has stopped; one still running could answer the lookup
        // (a cached negative entry: ENOENT below instead of a dead mount's error).
        XCTAssertTrue(allThreadsStopped(m.daemon.pid, timeout: 2), "daemon did not stop")
        let w = Watchdog(name: "self-test", budget: 1.0, grace: 60)
        defer { w.cancel() }
        let start = Date()
        let e = errnoOf { openClose(path, O_CREAT | O_WRONLY) }
        let took = Date().timeIntervalSince(start)
        w.cancel()
        XCTAssertTrue(w.fired)
        // The aborted in-flight request gets ECONNABORTED (newer kernels) or ENOTCONN; over
        // io_uring also ECANCELED (the kernel cancels the dead daemon's ring entries); calls racing
        // that teardown get ECANCELED or ECONNABORTED for a moment, until the connection is gone.
        let aborted = ["ENOTCONN", "ECONNABORTED"] + (overUring ? ["ECANCELED"] : [])
        XCTAssertTrue(aborted.contains(errnoName(e)), errnoName(e))
        var later = errnoName(errnoOf { openClose(path, O_RDONLY) })
        let settle = Date().addingTimeInterval(2)
        while overUring && ["ECANCELED", "ECONNABORTED"].contains(later) && Date() < settle {
            usleep(20_000)
            later = errnoName(errnoOf { openClose(path, O_RDONLY) })
        }
        XCTAssertEqual(later, "ENOTCONN", "later calls on the dead mount")
        XCTAssertLessThan(took, 10)
        XCTAssertTrue(m.daemon.wait(timeout: 5))
        XCTAssertEqual(m.daemon.termSignal, SIGKILL)
        expectDaemonDeath = true
    }
}
