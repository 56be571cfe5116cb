// Integration-test harness: runs the real chargefsd against a real FUSE mount, plus kernel tmpfs
// mounts to compare against. Everything here talks to the kernel through Glibc directly; functions
// Swift's Glibc module hides (_GNU_SOURCE ones: fallocate, renameat2, xattrs, statfs, raw syscall)
// are looked up with dlsym so the tests do not depend on the daemon's C shim.
//
// Requirements: root, /dev/fuse, fusermount3. Every mount and process started here is torn down in
// tearDown (also when the test fails), and a per-test watchdog SIGKILLs the daemon when a test
// overruns its budget: that aborts the FUSE connection, so a syscall blocked on the mount returns
// ENOTCONN and the test fails in seconds instead of hanging CI.

import Foundation
import Glibc
import TestSupport
import XCTest

// MARK: - Linux constants Swift's Glibc does not export (x86_64 / generic values)

enum LinuxConst {
    static let SEEK_DATA: Int32 = 3
    static let SEEK_HOLE: Int32 = 4
    static let O_DIRECT: Int32 = 0o40000
    static let O_NOATIME: Int32 = 0o1000000
    static let XATTR_CREATE: Int32 = 1
    static let XATTR_REPLACE: Int32 = 2
    static let UTIME_NOW: Int = (1 << 30) - 1
    static let UTIME_OMIT: Int = (1 << 30) - 2
    static let FALLOC_FL_KEEP_SIZE: Int32 = 0x01
    static let FALLOC_FL_PUNCH_HOLE: Int32 = 0x02
    static let FALLOC_FL_COLLAPSE_RANGE: Int32 = 0x08
    static let FALLOC_FL_ZERO_RANGE: Int32 = 0x10
    static let FALLOC_FL_INSERT_RANGE: Int32 = 0x20
    static let RENAME_NOREPLACE: UInt32 = 1
    static let RENAME_EXCHANGE: UInt32 = 2
    static let F_OFD_GETLK: Int32 = 36
    static let F_OFD_SETLK: Int32 = 37
    static let SYS_setgroups = 116
    static let SYS_setresuid = 117
    static let SYS_setresgid = 119
    static let TMPFS_MAGIC: Int = 0x0102_1994
    static let FUSE_SUPER_MAGIC: Int = 0x6573_5546

    static func makedev(_ major: UInt64, _ minor: UInt64) -> dev_t {
        var dev = (major & 0x0000_0fff) << 8
        dev |= (major & 0xffff_f000) << 32
        dev |= (minor & 0x0000_00ff)
        dev |= (minor & 0xffff_ff00) << 12
        return dev_t(dev)
    }
    static func major(_ dev: dev_t) -> UInt64 {
        let d = UInt64(dev)
        return ((d >> 8) & 0xfff) | ((d >> 32) & ~UInt64(0xfff))
    }
    static func minor(_ dev: dev_t) -> UInt64 {
        let d = UInt64(dev)
        return (d & 0xff) | ((d >> 12) & ~UInt64(0xff))
    }
}

// MARK: - libc functions hidden from Swift, through dlsym

enum Sys {
    nonisolated(unsafe) static let handle = dlopen(nil, RTLD_NOW)

    private static func sym<T>(_ name: String, _: T.Type) -> T? {
        guard let p = dlsym(handle, name) else { return nil }
        return unsafeBitCast(p, to: T.self)
    }

    typealias FallocateFn = @convention(c) (Int32, Int32, Int64, Int64) -> Int32
    typealias Renameat2Fn = @convention(c) (Int32, UnsafePointer<CChar>, Int32, UnsafePointer<CChar>, UInt32) -> Int32
    typealias SetxattrFn = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32
    typealias FsetxattrFn = @convention(c) (Int32, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32
    typealias GetxattrFn = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
    typealias FgetxattrFn = @convention(c) (Int32, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
    typealias ListxattrFn = @convention(c) (UnsafePointer<CChar>, UnsafeMutablePointer<CChar>?, Int) -> Int
    typealias RemovexattrFn = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>) -> Int32
    typealias StatfsFn = @convention(c) (UnsafePointer<CChar>, UnsafeMutableRawPointer) -> Int32
    typealias FstatfsFn = @convention(c) (Int32, UnsafeMutableRawPointer) -> Int32
    // syscall(2) is variadic; on x86_64 calling it through a fixed-arity pointer is ABI-compatible
    // for integer arguments (glibc's syscall just moves registers).
    typealias Syscall3Fn = @convention(c) (Int, Int, Int, Int) -> Int

    static let _fallocate = sym("fallocate", FallocateFn.self)
    static let _renameat2 = sym("renameat2", Renameat2Fn.self)
    static let _setxattr = sym("setxattr", SetxattrFn.self)
    static let _lsetxattr = sym("lsetxattr", SetxattrFn.self)
    static let _fsetxattr = sym("fsetxattr", FsetxattrFn.self)
    static let _getxattr = sym("getxattr", GetxattrFn.self)
    static let _lgetxattr = sym("lgetxattr", GetxattrFn.self)
    static let _fgetxattr = sym("fgetxattr", FgetxattrFn.self)
    static let _listxattr = sym("listxattr", ListxattrFn.self)
    static let _llistxattr = sym("llistxattr", ListxattrFn.self)
    static let _removexattr = sym("removexattr", RemovexattrFn.self)
    static let _lremovexattr = sym("lremovexattr", RemovexattrFn.self)
    static let _statfs = sym("statfs", StatfsFn.self)
    static let _fstatfs = sym("fstatfs", FstatfsFn.self)
    static let _syscall = sym("syscall", Syscall3Fn.self)

    private static func missing() -> Int32 { errno = ENOSYS; return -1 }

    static func fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32 {
        guard let f = _fallocate else { return missing() }
        return f(fd, mode, offset, length)
    }
    static func renameat2(_ from: String, _ to: String, _ flags: UInt32) -> Int32 {
        guard let f = _renameat2 else { return missing() }
        return f(AT_FDCWD, from, AT_FDCWD, to, flags)
    }
    static func setxattr(_ path: String, _ name: String, _ value: [UInt8], _ flags: Int32 = 0, nofollow: Bool = false) -> Int32 {
        guard let f = nofollow ? _lsetxattr : _setxattr else { return missing() }
        return value.withUnsafeBytes { f(path, name, $0.baseAddress, value.count, flags) }
    }
    static func fsetxattr(_ fd: Int32, _ name: String, _ value: [UInt8], _ flags: Int32 = 0) -> Int32 {
        guard let f = _fsetxattr else { return missing() }
        return value.withUnsafeBytes { f(fd, name, $0.baseAddress, value.count, flags) }
    }
    /// getxattr with an explicit buffer size (0 = size query). Returns (result, bytes).
    static func getxattr(_ path: String, _ name: String, size: Int, nofollow: Bool = false) -> (Int, [UInt8]) {
        guard let f = nofollow ? _lgetxattr : _getxattr else { return (Int(missing()), []) }
        var buf = [UInt8](repeating: 0, count: max(size, 1))
        let r = buf.withUnsafeMutableBytes { f(path, name, size == 0 ? nil : $0.baseAddress, size) }
        return (r, r > 0 && size > 0 ? Array(buf[0..<r]) : [])
    }
    static func fgetxattr(_ fd: Int32, _ name: String, size: Int) -> (Int, [UInt8]) {
        guard let f = _fgetxattr else { return (Int(missing()), []) }
        var buf = [UInt8](repeating: 0, count: max(size, 1))
        let r = buf.withUnsafeMutableBytes { f(fd, name, size == 0 ? nil : $0.baseAddress, size) }
        return (r, r > 0 && size > 0 ? Array(buf[0..<r]) : [])
    }
    /// listxattr with an explicit buffer size (0 = size query). Returns (result, names).
    static func listxattr(_ path: String, size: Int, nofollow: Bool = false) -> (Int, [String]) {
        guard let f = nofollow ? _llistxattr : _listxattr else { return (Int(missing()), []) }
        var buf = [CChar](repeating: 0, count: max(size, 1))
        let r = buf.withUnsafeMutableBufferPointer { f(path, size == 0 ? nil : $0.baseAddress, size) }
        guard r > 0, size > 0 else { return (r, []) }
        let names = buf[0..<r].split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        return (r, names)
    }
    static func removexattr(_ path: String, _ name: String, nofollow: Bool = false) -> Int32 {
        guard let f = nofollow ? _lremovexattr : _removexattr else { return missing() }
        return f(path, name)
    }

    /// struct statfs on x86_64: 11 longs (type, bsize, blocks, bfree, bavail, files, ffree, fsid,
    /// namelen, frsize, flags) + 4 spare.
    struct StatFS: Equatable {
        var type = 0, bsize = 0, blocks = 0, bfree = 0, bavail = 0, files = 0, ffree = 0
        var namelen = 0, frsize = 0, flags = 0
    }
    static func statfs(_ path: String) -> (Int32, StatFS) {
        guard let f = _statfs else { return (missing(), StatFS()) }
        var raw = [Int](repeating: 0, count: 15)
        let r = raw.withUnsafeMutableBytes { f(path, $0.baseAddress!) }
        return (r, StatFS(type: raw[0], bsize: raw[1], blocks: raw[2], bfree: raw[3], bavail: raw[4],
                          files: raw[5], ffree: raw[6], namelen: raw[8], frsize: raw[9], flags: raw[10]))
    }

    /// Changes the credentials of the CALLING THREAD only (raw syscalls, no glibc setxid broadcast).
    static func setThreadCredentials(uid: uid_t, gid: gid_t) -> Int32 {
        guard let sc = _syscall else { return missing() }
        if sc(LinuxConst.SYS_setgroups, 0, 0, 0) != 0 { return -1 }
        if sc(LinuxConst.SYS_setresgid, Int(gid), Int(gid), Int(gid)) != 0 { return -1 }
        if sc(LinuxConst.SYS_setresuid, Int(uid), Int(uid), Int(uid)) != 0 { return -1 }
        return 0
    }
}

// MARK: - errno helpers

struct HarnessError: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

let errnoNames: [Int32: String] = [
    0: "OK", EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EIO: "EIO", ENXIO: "ENXIO", E2BIG: "E2BIG",
    EBADF: "EBADF", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT", EBUSY: "EBUSY",
    EEXIST: "EEXIST", EXDEV: "EXDEV", ENODEV: "ENODEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR", EINVAL: "EINVAL",
    ENFILE: "ENFILE", EMFILE: "EMFILE", ETXTBSY: "ETXTBSY", EFBIG: "EFBIG", ENOSPC: "ENOSPC", ESPIPE: "ESPIPE",
    EROFS: "EROFS", EMLINK: "EMLINK", ERANGE: "ERANGE", EDEADLK: "EDEADLK", ENAMETOOLONG: "ENAMETOOLONG",
    ENOLCK: "ENOLCK", ENOSYS: "ENOSYS", ENOTEMPTY: "ENOTEMPTY", ELOOP: "ELOOP", ENODATA: "ENODATA",
    EOPNOTSUPP: "EOPNOTSUPP", ENOTCONN: "ENOTCONN", EDQUOT: "EDQUOT", EILSEQ: "EILSEQ",
    EOVERFLOW: "EOVERFLOW", ENOTTY: "ENOTTY", ECONNABORTED: "ECONNABORTED", ETIMEDOUT: "ETIMEDOUT",
]

func errnoName(_ e: Int32) -> String { errnoNames[e] ?? "errno(\(e))" }

struct SysError: Error, CustomStringConvertible {
    let op: String
    let code: Int32
    var description: String { "\(op) failed: \(errnoName(code)) (\(String(cString: strerror(code))))" }
}

/// Runs a libc call returning -1/errno; returns 0 on success or the errno.
@discardableResult
func errnoOf(_ body: () -> Int32) -> Int32 {
    errno = 0
    let r = body()
    return r == -1 ? errno : 0
}

@discardableResult
func errnoOfInt(_ body: () -> Int) -> Int32 {
    errno = 0
    let r = body()
    return r == -1 ? errno : 0
}

/// Throws SysError for a -1 result.
@discardableResult
func sys(_ op: @autoclosure () -> String, _ r: Int32) throws -> Int32 {
    if r == -1 { throw SysError(op: op(), code: errno) }
    return r
}

@discardableResult
func sys(_ op: @autoclosure () -> String, _ r: Int) throws -> Int {
    if r == -1 { throw SysError(op: op(), code: errno) }
    return r
}

func XCTAssertErrno(_ expected: Int32, _ r: @autoclosure () -> Int32, _ message: @autoclosure () -> String = "",
                    file: StaticString = #filePath, line: UInt = #line) {
    let got = errnoOf(r)
    XCTAssertEqual(errnoName(got), errnoName(expected), message(), file: file, line: line)
}

// MARK: - file helpers (operate on absolute paths)

typealias StatBuf = Glibc.stat

enum FS {
    static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0o644) throws -> Int32 {
        try sys("open(\(path))", Glibc.open(path, flags | O_CLOEXEC, mode))
    }
    static func write(_ fd: Int32, _ bytes: [UInt8], at offset: Int64) throws -> Int {
        try sys("pwrite", bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, bytes.count, off_t(offset)) })
    }
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = try sys("write", bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, bytes.count - done) })
            if n == 0 { throw SysError(op: "write returned 0", code: EIO) }
            done += n
        }
    }
    static func read(_ fd: Int32, count: Int, at offset: Int64) throws -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = try sys("pread", buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset) + done) })
            if n == 0 { break }
            done += n
        }
        return Array(buf[0..<done])
    }
    static func create(_ path: String, _ bytes: [UInt8] = [], mode: mode_t = 0o644) throws {
        let fd = try open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
        defer { close(fd) }
        try writeAll(fd, bytes)
    }
    static func contents(_ path: String) throws -> [UInt8] {
        let fd = try open(path, O_RDONLY)
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = try sys("read(\(path))", buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) })
            if n == 0 { break }
            out += buf[0..<n]
        }
        return out
    }
    static func lstatOf(_ path: String) throws -> StatBuf {
        var st = StatBuf()
        try sys("lstat(\(path))", lstat(path, &st))
        return st
    }
    static func statOf(_ path: String) throws -> StatBuf {
        var st = StatBuf()
        try sys("stat(\(path))", stat(path, &st))
        return st
    }
    static func fstatOf(_ fd: Int32) throws -> StatBuf {
        var st = StatBuf()
        try sys("fstat", fstat(fd, &st))
        return st
    }
    static func exists(_ path: String) -> Bool {
        var st = StatBuf()
        return lstat(path, &st) == 0
    }
    static func mkdir(_ path: String, _ mode: mode_t = 0o755) throws {
        try sys("mkdir(\(path))", Glibc.mkdir(path, mode))
    }
    /// Directory entries without "." and "..", as raw byte names.
    static func listRaw(_ path: String) throws -> [[UInt8]] {
        guard let d = opendir(path) else { throw SysError(op: "opendir(\(path))", code: errno) }
        defer { closedir(d) }
        var names: [[UInt8]] = []
        while true {
            errno = 0
            guard let ent = readdir(d) else {
                if errno != 0 { throw SysError(op: "readdir(\(path))", code: errno) }
                break
            }
            let name = withUnsafeBytes(of: ent.pointee.d_name) { raw -> [UInt8] in
                Array(raw.prefix(while: { $0 != 0 }))
            }
            if name == [0x2e] || name == [0x2e, 0x2e] { continue }
            names.append(name)
        }
        return names
    }
    static func list(_ path: String) throws -> [String] {
        try listRaw(path).map { String(decoding: $0, as: UTF8.self) }.sorted()
    }
    /// Recursively removes a tree (used only to scrub tmpfs/chargefs scratch content).
    static func removeTree(_ path: String) {
        var st = StatBuf()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in (try? listRaw(path)) ?? [] {
                removeTree(path + "/" + String(decoding: name, as: UTF8.self))
            }
            Glibc.rmdir(path)
        } else {
            Glibc.unlink(path)
        }
    }
    static func readlink(_ path: String) throws -> String {
        var buf = [CChar](repeating: 0, count: 4097)
        let n = try sys("readlink(\(path))", Glibc.readlink(path, &buf, 4096))
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

extension stat {
    var fileType: mode_t { st_mode & S_IFMT }
    var perm: mode_t { st_mode & 0o7777 }
    var mtimeNs: Int { st_mtim.tv_sec * 1_000_000_000 + st_mtim.tv_nsec }
    var ctimeNs: Int { st_ctim.tv_sec * 1_000_000_000 + st_ctim.tv_nsec }
    var atimeNs: Int { st_atim.tv_sec * 1_000_000_000 + st_atim.tv_nsec }
}

/// Runs `body` on a fresh thread whose credentials are uid/gid (no supplementary groups). Only that
/// thread changes identity (raw setresuid), so the test process stays root.
func asUser<T: Sendable>(uid: uid_t = 65534, gid: gid_t = 65534, _ body: @escaping @Sendable () -> T) throws -> T {
    try runOnCredThread(uid: uid, gid: gid, body)
}

private final class ResultBox<T>: @unchecked Sendable { var value: T? }

private final class CredThreadJob: @unchecked Sendable {
    let uid: uid_t
    let gid: gid_t
    let work: () -> Void
    var credErr: Int32 = 0
    init(uid: uid_t, gid: gid_t, work: @escaping () -> Void) { self.uid = uid; self.gid = gid; self.work = work }
}

private func runOnCredThread<T: Sendable>(uid: uid_t, gid: gid_t, _ body: @escaping @Sendable () -> T) throws -> T {
    let out = ResultBox<T>()
    let job = CredThreadJob(uid: uid, gid: gid) { out.value = body() }
    let arg = Unmanaged.passRetained(job).toOpaque()
    var tid = pthread_t()
    let rc = pthread_create(&tid, nil, { raw in
        guard let raw else { return nil }
        let job = Unmanaged<CredThreadJob>.fromOpaque(raw).takeRetainedValue()
        if Sys.setThreadCredentials(uid: job.uid, gid: job.gid) != 0 {
            job.credErr = errno
            return nil
        }
        job.work()
        return nil
    }, arg)
    if rc != 0 {
        Unmanaged<CredThreadJob>.fromOpaque(arg).release()
        throw SysError(op: "pthread_create", code: rc)
    }
    pthread_join(tid, nil)
    if job.credErr != 0 { throw SysError(op: "setresuid(\(uid)) on thread", code: job.credErr) }
    guard let v = out.value else { throw SysError(op: "credential thread produced no result", code: EIO) }
    return v
}

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
        if !options.isEmpty { argv += ["-o", options.joined(separator: ",")] }
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

// MARK: - watchdog

func logStderr(_ msg: String) {
    let line = Array((msg + "\n").utf8)
    _ = line.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
}

/// SIGKILLs every live daemon when a test overruns its budget (aborting the FUSE connection so
/// blocked syscalls fail with ENOTCONN). If the test is still stuck `grace` seconds later, the
/// mounts are detached and the whole test process exits, so CI never hangs.
final class Watchdog: @unchecked Sendable {
    private let lock = NSLock()
    private var _fired = false
    private var cancelled = false
    let budget: Double
    let name: String

    init(name: String, budget: Double, grace: Double = 20) {
        self.name = name
        self.budget = budget
        let q = DispatchQueue.global()
        q.asyncAfter(deadline: .now() + budget) { [self] in
            let go = lock.withLock { () -> Bool in
                if cancelled { return false }
                _fired = true
                return true
            }
            guard go else { return }
            let live = Live.shared.snapshot
            logStderr("WATCHDOG: \(name) exceeded \(budget)s; SIGKILL daemons \(live.pids)")
            for pid in live.pids { kill(pid, SIGKILL) }
        }
        q.asyncAfter(deadline: .now() + budget + grace) { [self] in
            let go = lock.withLock { !cancelled }
            guard go else { return }
            let live = Live.shared.snapshot
            logStderr("WATCHDOG: \(name) still stuck \(grace)s after killing the daemon; detaching \(live.mounts) and exiting")
            for pid in live.pids { kill(pid, SIGKILL) }
            for m in live.mounts { umount2(m, Int32(MNT_DETACH)) }
            _exit(70)
        }
    }
    var fired: Bool { lock.withLock { _fired } }
    func cancel() { lock.withLock { cancelled = true } }
}

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

/// open(2) then close: 0 on success, -1 with errno on failure (no fd leaks in transcripts).
func openClose(_ path: String, _ flags: Int32, _ mode: mode_t = 0o644) -> Int32 {
    let fd = open(path, flags | O_CLOEXEC, mode)
    if fd < 0 { return -1 }
    close(fd)
    return 0
}

/// Records "label -> OK/ERRNO" into a transcript.
func record(_ t: inout [String], _ label: String, _ r: @autoclosure () -> Int32) {
    t.append("\(label) -> \(errnoName(errnoOf(r)))")
}

func recordInt(_ t: inout [String], _ label: String, _ r: @autoclosure () -> Int) {
    t.append("\(label) -> \(errnoName(errnoOfInt(r)))")
}

func pattern(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 7 &+ ($0 >> 8)) }
}

/// Sleeps long enough for a coarse kernel clock tick to pass.
func tick() { usleep(20_000) }
