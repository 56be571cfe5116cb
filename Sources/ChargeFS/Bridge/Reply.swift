import CFuse
import Glibc
import SystemPackage

/// The one answer a FUSE request gets.
///
/// Non-copyable, and every way of answering consumes it: the compiler rejects a handler that
/// could answer twice, or use the request after answering. A reply dropped unanswered (a bug)
/// answers EIO from `deinit`, so no caller ever hangs on a request the daemon forgot.
struct Reply: ~Copyable {
    /// Entries and attributes stay cached this long: every change comes through this kernel, so
    /// they stay right; the timeout bounds how stale atime (which only we update) can look.
    static let cacheSeconds = 3600.0

    let request: fuse_req_t?

    init(_ request: fuse_req_t?) { self.request = request }

    deinit { fuse_reply_err(request, EIO) }

    consuming func error(_ error: Errno) {
        fuse_reply_err(request, error.rawValue)
        discard self
    }

    consuming func success() {
        fuse_reply_err(request, 0)
        discard self
    }

    /// forget and forget_multi: the kernel expects no answer.
    consuming func none() {
        fuse_reply_none(request)
        discard self
    }

    consuming func entry(_ attributes: Attributes) {
        var e = Self.entryParameters(attributes)
        fuse_reply_entry(request, &e)
        discard self
    }

    /// A negative entry lets the kernel cache the miss; creating the name invalidates it.
    consuming func noEntry() {
        var e = fuse_entry_param()
        e.entry_timeout = Self.cacheSeconds
        fuse_reply_entry(request, &e)
        discard self
    }

    consuming func attributes(_ attributes: Attributes) {
        var st = attributes.stat
        fuse_reply_attr(request, &st, Self.cacheSeconds)
        discard self
    }

    consuming func link(target: [UInt8]) {
        let terminated = target + [0]
        terminated.withUnsafeBufferPointer { buf in
            buf.withMemoryRebound(to: CChar.self) { _ = fuse_reply_readlink(request, $0.baseAddress) }
        }
        discard self
    }

    consuming func opened(_ fi: UnsafeMutablePointer<fuse_file_info>) {
        fuse_reply_open(request, fi)
        discard self
    }

    /// An open the kernel serves from `backingID`'s file itself (FUSE passthrough); with
    /// `directIO`, reads and writes still come to the daemon (direct I/O overrides passthrough
    /// for them) and only mappings map the backing file. libfuse 3.14's fuse_open_out has no
    /// backing id.
    consuming func openedPassthrough(backingID: Int32, handle: UInt64, directIO: Bool) {
        let flags = UInt32(CFUSE_FOPEN_PASSTHROUGH) | (directIO ? UInt32(FOPEN_DIRECT_IO) : 0)
        var out = cfuse_open_out_7_40(fh: handle, open_flags: flags, backing_id: backingID)
        withUnsafeBytes(of: &out) { _ = fuse_reply_buf(request, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        discard self
    }

    consuming func created(_ attributes: Attributes, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        var e = Self.entryParameters(attributes)
        fuse_reply_create(request, &e, fi)
        discard self
    }

    consuming func written(_ count: Int) {
        fuse_reply_write(request, count)
        discard self
    }

    consuming func bytes(_ start: UnsafeRawPointer?, count: Int) {
        fuse_reply_buf(request, start?.assumingMemoryBound(to: CChar.self), count)
        discard self
    }

    /// getxattr and listxattr: the size alone when the caller asked for it (size 0), ERANGE
    /// when its buffer is too small.
    consuming func xattr(_ value: [UInt8], bufferSize: Int) {
        if bufferSize == 0 {
            fuse_reply_xattr(request, value.count)
        } else if value.count > bufferSize {
            fuse_reply_err(request, ERANGE)
        } else {
            value.withUnsafeBytes { _ = fuse_reply_buf(request, $0.baseAddress?.assumingMemoryBound(to: CChar.self), value.count) }
        }
        discard self
    }

    consuming func statfs(_ st: statvfs) {
        var st = st
        fuse_reply_statfs(request, &st)
        discard self
    }

    consuming func position(_ offset: Int64) {
        fuse_reply_lseek(request, off_t(offset))
        discard self
    }

    /// Answers with the iovecs `produce` hands to its callback (at most once), or with the errno
    /// it throws. The callback runs while `produce` still holds its lock, so the data cannot
    /// change under the copy.
    consuming func vectors(_ produce: (_ send: (UnsafeBufferPointer<iovec>) -> Void) throws(Errno) -> Void) {
        let request = self.request
        var sent = false
        do throws(Errno) {
            try produce { vectors in
                guard !sent else { return }
                sent = true
                _ = fuse_reply_iov(request, vectors.baseAddress, Int32(vectors.count))
            }
        } catch {
            if !sent { fuse_reply_err(request, error.rawValue) }
            sent = true
        }
        if !sent { fuse_reply_err(request, EIO) }
        discard self
    }

    static func entryParameters(_ attributes: Attributes) -> fuse_entry_param {
        var e = fuse_entry_param()
        e.ino = fuse_ino_t(attributes.ino.rawValue)
        e.generation = UInt64(attributes.generation)
        e.attr = attributes.stat
        e.attr_timeout = cacheSeconds
        e.entry_timeout = cacheSeconds
        return e
    }
}
