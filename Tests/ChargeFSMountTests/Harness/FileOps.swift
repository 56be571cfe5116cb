// File operations on absolute paths, and running code as another user.

import Foundation
import Glibc

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

/// Page-aligned memory filled with one byte, as O_DIRECT I/O needs; freed at deinit.
final class AlignedBuffer {
    let base: UnsafeMutableRawPointer
    let count: Int
    init(count: Int, filledWith byte: UInt8 = 0) throws {
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 4096, count) == 0, let raw else { throw SysError(op: "posix_memalign", code: ENOMEM) }
        base = raw
        self.count = count
        memset(base, Int32(byte), count)
    }
    deinit { free(base) }
    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: base, count: count)) }
}
