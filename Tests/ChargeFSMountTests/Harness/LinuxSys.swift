// Linux constants and libc functions the harness needs that Swift's Glibc does not export.

import Foundation
import Glibc

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
