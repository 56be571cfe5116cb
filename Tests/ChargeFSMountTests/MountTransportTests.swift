// Which transport serves a mount: FUSE over io_uring (Linux 6.14+, enable_uring) or /dev/fuse.
// These tests set /sys/module/fuse/parameters/enable_uring as root and put it back in their
// cleanup, also when they fail. Where the kernel has no FUSE over io_uring they fail, saying so.

import Foundation
import Glibc
import XCTest

final class MountTransportTests: MountTestCase {
    override class var autoMount: Bool { false }
    static let knob = "/sys/module/fuse/parameters/enable_uring"

    /// Sets enable_uring for this test; the cleanup puts the old value back.
    func setEnableUring(_ on: Bool) throws {
        guard let old = try? String(contentsOfFile: Self.knob, encoding: .utf8) else {
            throw HarnessError("\(Self.knob) is missing: this kernel has no FUSE over io_uring (Linux 6.14+ with CONFIG_FUSE_IO_URING), so the io_uring transport cannot be tested here")
        }
        addCleanup { try? old.trimmingCharacters(in: .whitespacesAndNewlines).write(toFile: Self.knob, atomically: false, encoding: .utf8) }
        try (on ? "Y" : "N").write(toFile: Self.knob, atomically: false, encoding: .utf8)
    }

    /// Voluntary context switches of each of the daemon's ring workers (threads named
    /// chargefs-ringN, N the queue's CPU), by thread id.
    func ringThreads(_ pid: pid_t) -> [String: (queue: String, switches: Int)] {
        var result: [String: (queue: String, switches: Int)] = [:]
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        for tid in tasks {
            guard let comm = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/comm", encoding: .utf8),
                  comm.hasPrefix("chargefs-ring"),
                  let status = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/status", encoding: .utf8),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("voluntary_ctxt_switches:") }),
                  let n = Int(line.split(separator: "\t").last?.trimmingCharacters(in: .whitespaces) ?? "") else { continue }
            result[tid] = (comm.trimmingCharacters(in: .whitespacesAndNewlines), n)
        }
        return result
    }

    /// io_uring=on with enable_uring set: the status says io_uring, ring workers serve a queue per
    /// possible CPU, and requests (a 4 MiB file written and read back, 200 mkdirs) wake
    /// those threads, not only /dev/fuse's.
    func testIoUringServesWhenEnabled() throws {
        try setEnableUring(true)
        let m = try mountChargeFS(options: ["io_uring=on"], name: "uring")
        XCTAssertEqual(m.transport, "io_uring")
        let possible = try String(contentsOfFile: "/sys/devices/system/cpu/possible", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let cpus = possible.split(separator: ",").reduce(0) { n, range in
            let ends = range.split(separator: "-").compactMap { Int($0) }
            return n + (ends.count == 2 ? ends[1] - ends[0] + 1 : 1)
        }
        let before = ringThreads(m.daemon.pid)
        XCTAssertEqual(Set(before.values.map(\.queue)).count, cpus, "a queue per possible CPU (\(possible)): \(before)")
        XCTAssertGreaterThanOrEqual(before.count, 2 * cpus, "two workers per queue to begin with: \(before)")
        let data = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ ($0 >> 12)) }
        try FS.create(m.path("f"), data)
        XCTAssertEqual(try FS.contents(m.path("f")), data)
        // Each mkdir of a new name is at least one request no cache can answer.
        for i in 0..<200 { XCTAssertEqual(mkdir(m.path("d\(i)"), 0o755), 0) }
        let after = ringThreads(m.daemon.pid)
        let woken = after.reduce(0) { $0 + $1.value.switches - (before[$1.key]?.switches ?? 0) }
        XCTAssertGreaterThanOrEqual(woken, 200, "ring threads served requests: before \(before), after \(after)")
        XCTAssertTrue(m.daemon.stderrText.contains("serving over io_uring"), m.daemon.stderrText)
    }

    /// The default (auto) uses io_uring where enabled; io_uring=off never does (no ring threads).
    func testAutoUsesIoUringAndOffDoesNot() throws {
        try setEnableUring(true)
        let auto = try mountChargeFS(options: ["io_uring=auto"], name: "auto")
        XCTAssertEqual(auto.transport, "io_uring")
        let off = try mountChargeFS(options: ["io_uring=off"], name: "off")
        XCTAssertEqual(off.transport, "dev-fuse")
        XCTAssertTrue(ringThreads(off.daemon.pid).isEmpty)
        try FS.create(off.path("x"), [1, 2, 3])
        XCTAssertEqual(try FS.contents(off.path("x")), [1, 2, 3])
    }

    /// enable_uring off: auto serves over /dev/fuse; io_uring=on fails in one line, exit 1,
    /// nothing mounted.
    func testOnFailsWhereDisabledAndAutoFallsBack() throws {
        try setEnableUring(false)
        let auto = try mountChargeFS(options: ["io_uring=auto"], name: "auto")
        XCTAssertEqual(auto.transport, "dev-fuse")
        try FS.create(auto.path("x"), [4, 5])
        XCTAssertEqual(try FS.contents(auto.path("x")), [4, 5])

        let mnt = try scratch.makeDir("on")
        let r = try Child.run([try Daemon.binaryPath(), mnt, "-f", "-o", "io_uring=on"], logDir: try scratch.path, timeout: 10)
        XCTAssertEqual(r.code, 1)
        XCTAssertEqual(r.err, "chargefsd: io_uring=on: FUSE over io_uring is disabled on this host (\(Self.knob) is N; root may set it to Y)\n")
        XCTAssertTrue(MountTable.entries(at: mnt).isEmpty, "nothing mounted")
    }

    /// io_uring itself refused (sysctl kernel.io_uring_disabled=2, set and put back): auto falls
    /// back to /dev/fuse and says why; io_uring=on fails in one line, nothing mounted.
    func testIoUringRefusedByTheHost() throws {
        try setEnableUring(true)
        let sysctl = "/proc/sys/kernel/io_uring_disabled"
        guard let old = try? String(contentsOfFile: sysctl, encoding: .utf8) else {
            throw HarnessError("\(sysctl) is missing (Linux 6.6+): cannot refuse io_uring here")
        }
        addCleanup { try? old.trimmingCharacters(in: .whitespacesAndNewlines).write(toFile: sysctl, atomically: false, encoding: .utf8) }
        try "2".write(toFile: sysctl, atomically: false, encoding: .utf8)
        let auto = try mountChargeFS(options: ["io_uring=auto"], name: "auto")
        XCTAssertEqual(auto.transport, "dev-fuse")
        try FS.create(auto.path("x"), [7])
        XCTAssertEqual(try FS.contents(auto.path("x")), [7])
        XCTAssertTrue(auto.daemon.stderrText.contains("serving over /dev/fuse (io_uring is not available to chargefsd: "), auto.daemon.stderrText)

        let mnt = try scratch.makeDir("on")
        let r = try Child.run([try Daemon.binaryPath(), mnt, "-f", "-o", "io_uring=on"], logDir: try scratch.path, timeout: 10)
        XCTAssertEqual(r.code, 1)
        XCTAssertTrue(r.err.hasPrefix("chargefsd: io_uring=on: chargefsd may not use io_uring here ("), r.err)
        XCTAssertEqual(r.err.filter { $0 == "\n" }.count, 1, "one line: \(r.err)")
        XCTAssertTrue(MountTable.entries(at: mnt).isEmpty, "nothing mounted")
    }

    /// Unmounting an io_uring mount ends the daemon promptly (the kernel ends every ring entry).
    func testUnmountEndsTheDaemon() throws {
        try setEnableUring(true)
        let m = try mountChargeFS(options: ["io_uring=on"], name: "uring")
        XCTAssertEqual(m.transport, "io_uring")
        try FS.create(m.path("y"), [9])
        let u = try Child.run(["/usr/bin/fusermount3", "-u", m.mountpoint], logDir: try scratch.path)
        XCTAssertEqual(u.code, 0, u.err)
        XCTAssertTrue(m.daemon.wait(timeout: 5), "daemon still running 5 s after unmount")
        XCTAssertEqual(m.daemon.exitCode, 0, m.daemon.stderrText)
    }

    /// SIGTERM while mounted: the ring threads are stopped and the daemon exits cleanly.
    func testSignalEndsTheDaemon() throws {
        try setEnableUring(true)
        let m = try mountChargeFS(options: ["io_uring=on"], name: "uring")
        XCTAssertEqual(m.transport, "io_uring")
        m.daemon.signal(SIGTERM)
        XCTAssertTrue(m.daemon.wait(timeout: 5), "daemon still running 5 s after SIGTERM")
        XCTAssertEqual(m.daemon.exitCode, 0, m.daemon.stderrText)
    }
}
