// The base class of every mount test: a fresh mount per test, a tmpfs twin, guaranteed teardown.
//
// The harness (this folder) runs the real chargefsd against a real FUSE mount, plus kernel tmpfs
// mounts to compare against. It talks to the kernel through Glibc directly; functions Swift's
// Glibc module hides (_GNU_SOURCE ones: fallocate, renameat2, xattrs, statfs, raw syscall) are
// looked up with dlsym (LinuxSys.swift), so the tests do not depend on the daemon's C shim.
// Requirements: root, /dev/fuse, fusermount3. Every mount and process started here is torn down
// in tearDown (also when the test fails), and a per-test watchdog SIGKILLs the daemon when a test
// overruns its budget: that aborts the FUSE connection, so a syscall blocked on the mount returns
// ENOTCONN and the test fails in seconds instead of hanging CI.

import Foundation
import Glibc
import XCTest

// MARK: - base test case

/// Base class: a fresh chargefs mount per test (options from `mountOptions`), optional tmpfs
/// twin, watchdog, guaranteed teardown.
class MountTestCase: XCTestCase {
    /// Options passed with -o. Override per class.
    class var mountOptions: [String] { [] }
    /// Whether setUp mounts chargefs automatically.
    class var autoMount: Bool { true }
    /// Seconds a test may run before the watchdog kills the daemon.
    class var budget: Double { 20 }

    private var _scratch: Scratch?
    private var _fs: ChargeFSMount?
    private var extraMounts: [ChargeFSMount] = []
    private var tmpfsMounts: [TmpfsMount] = []
    private var watchdog: Watchdog?
    private var cleanups: [() -> Void] = []

    var scratch: Scratch {
        get throws {
            if let s = _scratch { return s }
            let s = try Scratch()
            _scratch = s
            return s
        }
    }

    /// The per-test chargefs mount.
    var fs: ChargeFSMount {
        get throws { try XCTUnwrap(_fs, "chargefs is not mounted in this test") }
    }
    /// Mountpoint of the per-test chargefs (a path that does not exist when nothing is mounted).
    var root: String { _fs?.mountpoint ?? "/nonexistent/chargefs-not-mounted" }
    /// Absolute path under the chargefs mount.
    func p(_ rel: String) -> String { root + "/" + rel }

    override func setUpWithError() throws {
        try super.setUpWithError()
        watchdog = Watchdog(name: name, budget: Self.budget)
        if Self.autoMount {
            _fs = try ChargeFSMount(scratch: scratch, options: Self.mountOptions)
        }
    }

    override func tearDownWithError() throws {
        watchdog?.cancel()
        // A daemon that crashed during the test is a failure even if the assertions passed.
        let crashSignals: Set<Int32> = [SIGSEGV, SIGABRT, SIGILL, SIGBUS, SIGFPE, SIGTRAP, SIGSYS]
        for m in ([_fs].compactMap { $0 } + extraMounts) where m.daemon.poll() && !expectDaemonDeath {
            if let sig = m.daemon.termSignal, crashSignals.contains(sig) {
                XCTFail("chargefsd (\(m.mountpoint)) crashed with signal \(sig); stderr: \(m.daemon.stderrText.suffix(2000))")
            }
        }
        for c in cleanups.reversed() { c() }
        cleanups = []
        _fs?.stop()
        for m in extraMounts { m.stop() }
        for t in tmpfsMounts { t.stop() }
        if let w = watchdog, w.fired {
            XCTFail("watchdog: test ran longer than \(w.budget)s (daemon SIGKILLed; probable FUSE hang)")
        }
        _scratch?.remove()
        _fs = nil
        extraMounts = []
        tmpfsMounts = []
        _scratch = nil
        expectDaemonDeath = false
        try super.tearDownWithError()
    }

    func addCleanup(_ body: @escaping () -> Void) { cleanups.append(body) }

    /// Set by tests that kill the daemon on purpose.
    var expectDaemonDeath = false

    /// Mounts another chargefs (torn down automatically).
    @discardableResult
    func mountChargeFS(options: [String] = [], source: String? = nil, name: String = "mnt2", extraArgs: [String] = []) throws -> ChargeFSMount {
        let m = try ChargeFSMount(scratch: scratch, options: options, source: source, name: name, extraArgs: extraArgs)
        extraMounts.append(m)
        return m
    }

    /// Mounts a kernel tmpfs (torn down automatically).
    func mountTmpfs(options: String = "", name: String = "tmpfs") throws -> TmpfsMount {
        let t = try TmpfsMount(scratch: scratch, options: options, name: name)
        tmpfsMounts.append(t)
        return t
    }

    /// Runs the same scenario on chargefs and on a fresh kernel tmpfs and asserts identical
    /// transcripts. The scenario gets the root directory and a transcript to append to.
    @discardableResult
    func assertSameAsTmpfs(tmpfsOptions: String = "", _ what: String = "",
                           file: StaticString = #filePath, line: UInt = #line,
                           _ scenario: (String, inout [String]) throws -> Void) throws -> String {
        let t = try mountTmpfs(options: tmpfsOptions, name: "tmpfs-\(tmpfsMounts.count)")
        var ours: [String] = []
        var ref: [String] = []
        let dirName = "scenario-\(UUID().uuidString.prefix(6))"
        let ourRoot = p(dirName)
        let refRoot = t.path(dirName)
        try FS.mkdir(ourRoot, 0o777)
        try FS.mkdir(refRoot, 0o777)
        chmod(ourRoot, 0o777)
        chmod(refRoot, 0o777)
        try scenario(refRoot, &ref)
        try scenario(ourRoot, &ours)
        if ours != ref {
            var diff: [String] = []
            for i in 0..<max(ours.count, ref.count) {
                let a = i < ours.count ? ours[i] : "<missing>"
                let b = i < ref.count ? ref[i] : "<missing>"
                diff.append(a == b ? "   \(a)" : " ≠ chargefs: \(a)\n     tmpfs:    \(b)")
            }
            XCTFail("\(what) differs from kernel tmpfs:\n" + diff.joined(separator: "\n"), file: file, line: line)
        }
        return ourRoot
    }
}

func pattern(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 7 &+ ($0 >> 8)) }
}

/// Sleeps long enough for a coarse kernel clock tick to pass.
func tick() { usleep(20_000) }
