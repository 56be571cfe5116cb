// errno values as results: names, assertions, and transcripts of outcomes.

import Foundation
import Glibc
import XCTest

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
    EOVERFLOW: "EOVERFLOW", ENOTTY: "ENOTTY", ECONNABORTED: "ECONNABORTED", ECANCELED: "ECANCELED", ETIMEDOUT: "ETIMEDOUT",
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
