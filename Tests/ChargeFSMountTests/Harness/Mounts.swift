// The mount table, the daemon binary, and the two mounts the tests compare: chargefs and tmpfs.

import Foundation
import Glibc

// MARK: - mount table

struct MountEntry {
    let mountPoint: String
    let mountOptions: String
    let fsType: String
    let source: String
    let superOptions: String
}

enum MountTable {
    static func unescape(_ s: Substring) -> String {
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == 0x5c, i + 3 < b.count, let v = UInt8(String(decoding: b[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v); i += 4
            } else { out.append(b[i]); i += 1 }
        }
        return String(decoding: out, as: UTF8.self)
    }
    static func entries() -> [MountEntry] {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            guard let sep = f.firstIndex(of: "-"), f.count > sep + 3, f.count > 5 else { return nil }
            return MountEntry(mountPoint: unescape(f[4]), mountOptions: String(f[5]), fsType: String(f[sep + 1]),
                              source: unescape(f[sep + 2]), superOptions: String(f[sep + 3]))
        }
    }
    static func entries(at path: String) -> [MountEntry] { entries().filter { $0.mountPoint == path } }
    static func procMountsLines(containing path: String) -> [String] {
        guard let text = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").map(String.init).filter { $0.split(separator: " ").dropFirst().first.map(String.init) == path }
    }
}

// MARK: - locating the daemon

enum Daemon {
    static func binaryPath() throws -> String {
        if let p = ProcessInfo.processInfo.environment["CHARGEFSD"], !p.isEmpty { return p }
        let exe = try FS.readlink("/proc/self/exe")
        var dir = (exe as NSString).deletingLastPathComponent
        // The bundle may be nested (…/debug/chargefsPackageTests.xctest/...); walk up a little.
        for _ in 0..<4 {
            let candidate = dir + "/chargefsd"
            if access(candidate, X_OK) == 0 { return candidate }
            dir = (dir as NSString).deletingLastPathComponent
        }
        throw HarnessError("chargefsd binary not found next to the test bundle (\(exe)); build it with `swift build --scratch-path <same>` or set CHARGEFSD")
    }

    /// pids whose /proc/PID/exe is our chargefsd binary.
    static func runningPids() -> Set<pid_t> {
        guard let bin = try? binaryPath(), let real = realpath(bin, nil) else { return [] }
        let binReal = String(cString: real)
        free(real)
        var out: Set<pid_t> = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(name) else { continue }
            if let exe = try? FS.readlink("/proc/\(pid)/exe") {
                let e = exe.hasSuffix(" (deleted)") ? String(exe.dropLast(10)) : exe
                if e == binReal { out.insert(pid) }
            }
        }
        return out
    }

    /// Processes whose command line mentions `needle` (e.g. a unique mountpoint).
    static func pids(withArgument needle: String) -> Set<pid_t> {
        var out: Set<pid_t> = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(name), pid != getpid() else { continue }
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
            let args = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            if args.contains(where: { $0 == needle }) { out.insert(pid) }
        }
        return out
    }
}

// MARK: - mounts

/// A scratch directory under /tmp holding mountpoints and logs.
final class Scratch {
    let path: String
    init() throws {
        var template = Array("/tmp/chargefs-itest.XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw SysError(op: "mkdtemp", code: errno)
        }
        path = String(cString: p)
        chmod(path, 0o755)
    }
    func makeDir(_ name: String) throws -> String {
        let p = path + "/" + name
        if !FS.exists(p) { try FS.mkdir(p, 0o755) }
        return p
    }
    /// Removes the scratch dir unless something is still mounted below it.
    func remove() {
        let mounted = MountTable.entries().contains { $0.mountPoint.hasPrefix(path + "/") }
        if mounted { return }
        FS.removeTree(path)
    }
}

enum Unmount {
    /// fusermount3 -u, falling back to umount -l; bounded.
    static func fuse(_ mountpoint: String, logDir: String) {
        guard !MountTable.entries(at: mountpoint).isEmpty else { return }
        _ = try? Child.run(["/usr/bin/fusermount3", "-u", "-z", mountpoint], logDir: logDir, timeout: 5)
        if MountTable.entries(at: mountpoint).isEmpty { return }
        lazy(mountpoint, logDir: logDir)
    }
    static func lazy(_ mountpoint: String, logDir: String) {
        for _ in 0..<5 where !MountTable.entries(at: mountpoint).isEmpty {
            if umount2(mountpoint, Int32(MNT_DETACH)) != 0 {
                _ = try? Child.run(["/bin/umount", "-l", mountpoint], logDir: logDir, timeout: 5)
            }
        }
    }
}

/// A chargefsd started in the foreground (-f) as our child.
final class ChargeFSMount {
    let mountpoint: String
    let daemon: Child
    let scratch: Scratch
    private(set) var stopped = false

    /// Starts `chargefsd [source] MNT -f -o opts` and waits until the mount is live.
    init(scratch: Scratch, options: [String] = [], source: String? = nil, name: String = "mnt",
         extraArgs: [String] = [], timeout: Double = 10) throws {
        self.scratch = scratch
        mountpoint = try scratch.makeDir(name)
        let bin = try Daemon.binaryPath()
        var argv = [bin]
        if let source { argv.append(source) }
        argv.append(mountpoint)
        argv.append("-f")
        // The whole suite can run over another transport: CHARGEFS_TEST_MOUNT_OPTIONS goes first,
        // so a test's own options still win.
        func key(_ option: String) -> Substring { option.split(separator: "=", maxSplits: 1).first ?? "" }
        let suiteOptions = Self.suiteOptions.filter { suite in !options.contains { key($0) == key(suite) } }
        let allOptions = suiteOptions + options
        if !allOptions.isEmpty { argv += ["-o", allOptions.joined(separator: ",")] }
        argv += extraArgs
        daemon = try Child(argv: argv, logDir: scratch.path, tag: "chargefsd-\(name)")
        Live.shared.add(pid: daemon.pid)
        Live.shared.add(mount: mountpoint)
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if MountTable.entries(at: mountpoint).contains(where: { $0.fsType == "fuse.chargefsd" }) { break }
            if daemon.poll() {
                let err = daemon.stderrText
                stop()
                throw HarnessError("chargefsd exited (\(daemon.statusDescription)) before mounting: \(argv.joined(separator: " ")); stderr: \(err)")
            }
            if Date() > deadline {
                let err = daemon.stderrText
                stop()
                throw HarnessError("chargefsd did not mount \(mountpoint) within \(timeout)s; stderr: \(err)")
            }
            usleep(10_000)
        }
        // CHARGEFS_TEST_TRANSPORT=io_uring|dev-fuse: the transport the suite runs over must be the
        // one that serves (a run meant for io_uring that fell back to /dev/fuse fails).
        if let want = Self.expectedTransport, !options.contains(where: { $0.hasPrefix("io_uring") }),
           !extraArgs.contains("-o") {
            let served = transport
            if served != want {
                let err = daemon.stderrText
                stop()
                throw HarnessError("chargefsd at \(mountpoint) serves over \(served ?? "an unknown transport"), not \(want) (CHARGEFS_TEST_TRANSPORT); stderr: \(err)")
            }
        }
    }

    static var suiteOptions: [String] {
        (ProcessInfo.processInfo.environment["CHARGEFS_TEST_MOUNT_OPTIONS"] ?? "").split(separator: ",").map(String.init)
    }
    static var expectedTransport: String? {
        ProcessInfo.processInfo.environment["CHARGEFS_TEST_TRANSPORT"].flatMap { $0.isEmpty ? nil : $0 }
    }

    /// The `transport=` line of the root's status attribute.
    var transport: String? {
        let (n, value) = Sys.getxattr(mountpoint, "user.chargefs.status", size: 4096)
        guard n > 0 else { return nil }
        let text = String(decoding: value.prefix(n), as: UTF8.self)
        return text.split(separator: "\n").first(where: { $0.hasPrefix("transport=") }).map { String($0.dropFirst(10)) }
    }

    /// The root's `user.chargefs.requests` attribute: requests the kernel sent, by kind.
    var requestCounts: [String: Int] {
        let (n, value) = Sys.getxattr(mountpoint, "user.chargefs.requests", size: 8192)
        guard n > 0 else { return [:] }
        var counts: [String: Int] = [:]
        for line in String(decoding: value.prefix(n), as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: "=")
            if parts.count == 2, let count = Int(parts[1]) { counts[String(parts[0])] = count }
        }
        return counts
    }

    var entry: MountEntry? { MountTable.entries(at: mountpoint).last }
    var isMounted: Bool { !MountTable.entries(at: mountpoint).isEmpty }
    func path(_ rel: String) -> String { mountpoint + "/" + rel }

    func killDaemon() { daemon.signal(SIGKILL) }

    /// Unmounts, ends the daemon (SIGTERM, then SIGKILL), removes the mountpoint. Idempotent.
    func stop() {
        if stopped { return }
        stopped = true
        if !daemon.poll() { Unmount.fuse(mountpoint, logDir: scratch.path) }
        if !daemon.wait(timeout: 3) {
            daemon.signal(SIGTERM)
            if !daemon.wait(timeout: 3) {
                daemon.signal(SIGKILL)
                daemon.wait(timeout: 5)
            }
        }
        Unmount.lazy(mountpoint, logDir: scratch.path)
        Live.shared.remove(pid: daemon.pid)
        Live.shared.remove(mount: mountpoint)
        Glibc.rmdir(mountpoint)
    }
}

/// A kernel tmpfs to compare against.
final class TmpfsMount {
    let mountpoint: String
    let scratch: Scratch
    private var stopped = false
    init(scratch: Scratch, options: String = "", name: String = "tmpfs") throws {
        self.scratch = scratch
        mountpoint = try scratch.makeDir(name)
        let r = Glibc.mount("tmpfs", mountpoint, "tmpfs", 0, options.isEmpty ? nil : options)
        if r != 0 {
            let e = errno
            Glibc.rmdir(mountpoint)
            throw SysError(op: "mount -t tmpfs -o \(options) \(mountpoint)", code: e)
        }
        Live.shared.add(mount: mountpoint)
    }
    func path(_ rel: String) -> String { mountpoint + "/" + rel }
    func stop() {
        if stopped { return }
        stopped = true
        if umount2(mountpoint, 0) != 0 { Unmount.lazy(mountpoint, logDir: scratch.path) }
        Live.shared.remove(mount: mountpoint)
        Glibc.rmdir(mountpoint)
    }
}
