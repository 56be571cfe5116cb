// Child processes of the tests, and what the watchdog must clean up.

import Foundation
import Glibc
import XCTest

// MARK: - processes

/// A child process started with posix_spawn; stdout/stderr go to files.
final class Child: @unchecked Sendable {
    let pid: pid_t
    let argv: [String]
    let stdoutPath: String
    let stderrPath: String
    private(set) var status: Int32?   // raw wait status once reaped

    init(argv: [String], logDir: String, tag: String, env: [String: String] = [:]) throws {
        self.argv = argv
        stdoutPath = "\(logDir)/\(tag).stdout"
        stderrPath = "\(logDir)/\(tag).stderr"
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        defer { posix_spawn_file_actions_destroy(&fa) }
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fa, 1, stdoutPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&fa, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Default signal dispositions/mask in the child (XCTest may block some).
        var allSignals = sigset_t()
        sigfillset(&allSignals)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &allSignals)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        var environment = ProcessInfo.processInfo.environment
        for (k, v) in env { environment[k] = v }
        let envStrings = environment.map { "\($0.key)=\($0.value)" }
        var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        var cEnv: [UnsafeMutablePointer<CChar>?] = envStrings.map { strdup($0) } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        var p: pid_t = 0
        let rc = posix_spawn(&p, argv[0], &fa, &attr, &cArgs, &cEnv)
        if rc != 0 { throw SysError(op: "posix_spawn(\(argv[0]))", code: rc) }
        pid = p
    }

    /// Reaps without blocking; true when the child has exited.
    @discardableResult
    func poll() -> Bool {
        if status != nil { return true }
        var st: Int32 = 0
        let r = waitpid(pid, &st, WNOHANG)
        if r == pid { status = st; return true }
        if r == -1 && errno == ECHILD { status = -1; return true }
        return false
    }

    /// Waits up to `timeout` seconds; returns true when exited.
    @discardableResult
    func wait(timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while !poll() {
            if Date() > deadline { return false }
            usleep(5_000)
        }
        return true
    }

    func signal(_ sig: Int32) { if !poll() { kill(pid, sig) } }

    var exitCode: Int32? {
        guard let s = status, s != -1 else { return nil }
        return (s & 0x7f) == 0 ? (s >> 8) & 0xff : nil
    }
    var termSignal: Int32? {
        guard let s = status, s != -1 else { return nil }
        let sig = s & 0x7f
        return sig != 0 && sig != 0x7f ? sig : nil
    }
    var statusDescription: String {
        if let c = exitCode { return "exit \(c)" }
        if let s = termSignal { return "killed by signal \(s)" }
        return status == nil ? "running" : "unknown"
    }
    var stdoutText: String { (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "" }
    var stderrText: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    /// Runs a command to completion (bounded). Returns (exit status description, stdout, stderr, exit code).
    static func run(_ argv: [String], logDir: String, timeout: Double = 10, env: [String: String] = [:]) throws -> (code: Int32?, out: String, err: String) {
        let tag = "run-\(UUID().uuidString.prefix(8))"
        let c = try Child(argv: argv, logDir: logDir, tag: tag, env: env)
        if !c.wait(timeout: timeout) {
            c.signal(SIGKILL)
            c.wait(timeout: 5)
            throw SysError(op: "\(argv.joined(separator: " ")) timed out after \(timeout)s", code: ETIMEDOUT)
        }
        return (c.exitCode, c.stdoutText, c.stderrText)
    }
}

/// Processes and mounts the harness is responsible for; the watchdog kills/unmounts them.
final class Live: @unchecked Sendable {
    static let shared = Live()
    private let lock = NSLock()
    private var pids: Set<pid_t> = []
    private var mounts: Set<String> = []
    func add(pid: pid_t) { lock.withLock { _ = pids.insert(pid) } }
    func remove(pid: pid_t) { lock.withLock { _ = pids.remove(pid) } }
    func add(mount: String) { lock.withLock { _ = mounts.insert(mount) } }
    func remove(mount: String) { lock.withLock { _ = mounts.remove(mount) } }
    var snapshot: (pids: [pid_t], mounts: [String]) { lock.withLock { (Array(pids), Array(mounts)) } }
}
