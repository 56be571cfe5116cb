import CFuse
import Glibc
import SystemPackage

/// One request's context and the one answer it gets.
///
/// Non-copyable, and every way of answering consumes it: the compiler rejects a handler that
/// could answer twice, or use the request after answering. A reply dropped unanswered (a bug)
/// answers EIO from `deinit`, so no caller ever hangs on a request the daemon forgot.
///
/// Each answer takes a throwing closure: it runs the file system call, and sends what it
/// returns or the errno it throws (`answer`, the one place an errno becomes a reply). So a
/// handler is one line, and cannot forget a catch.
///
/// The seam for tests: a reply made with `recording:` sends nothing to libfuse and appends what
/// it would have sent to a `ReplyRecorder`, which also plays the request's caller; handlers then
/// run in-process, without a mount (as go-fuse's bridge tests do).
struct Reply: ~Copyable {
    /// Entries and attributes stay cached this long: every change comes through this kernel, so
    /// they stay right; the timeout bounds how stale atime (which only we update) can look.
    static let cacheSeconds = 3600.0

    let request: fuse_req_t?
    /// Unretained (a reply must stay trivially destroyed to be discarded): the test holds it.
    private let recorder: Unmanaged<ReplyRecorder>?

    init(_ request: fuse_req_t?) {
        self.request = request
        recorder = nil
    }

    /// A reply that records instead of sending; `recorder` must outlive it.
    init(recording recorder: ReplyRecorder) {
        request = nil
        self.recorder = .passUnretained(recorder)
    }

    deinit { sendError(EIO) }

    // MARK: the request's context

    /// Who asks: the kernel names the uid/gid of the process behind each request.
    var caller: Caller {
        if let recorder { return recorder.takeUnretainedValue().caller }
        guard let ctx = fuse_req_ctx(request) else { return .root }
        nonisolated(unsafe) let request = request
        return Caller(uid: ctx.pointee.uid, gid: ctx.pointee.gid, pid: ctx.pointee.pid) {
            // Valid only while the request is being handled, which is when the core asks.
            var groups = [gid_t](repeating: 0, count: 256)
            let n = fuse_req_getgroups(request, Int32(groups.count), &groups)
            return n > 0 ? Array(groups.prefix(min(Int(n), groups.count))) : []
        }
    }

    /// The kernel asked this request to clear setuid/setgid (FUSE_HANDLE_KILLPRIV_V2's flag).
    var clearsSetID: Bool {
        if let recorder { return recorder.takeUnretainedValue().clearsSetID }
        return HandlingThread.clearsSetID
    }

    // MARK: answers that run the call

    /// Runs `body` and answers with `send` and what it returned, or with the errno it threw.
    consuming func answer<T>(_ body: () throws(Errno) -> T, _ send: (borrowing Reply, T) -> Void) {
        do throws(Errno) {
            send(self, try body())
        } catch {
            sendError(error.rawValue)
        }
        discard self
    }

    consuming func success(_ body: () throws(Errno) -> Void) { answer(body) { r, _ in r.sendError(0) } }
    consuming func entry(_ body: () throws(Errno) -> Attributes) { answer(body) { $0.sendEntry($1) } }
    consuming func attributes(_ body: () throws(Errno) -> Attributes) { answer(body) { $0.sendAttributes($1) } }
    consuming func link(_ body: () throws(Errno) -> [UInt8]) { answer(body) { $0.sendLink($1) } }
    consuming func position(_ body: () throws(Errno) -> Int64) { answer(body) { $0.sendPosition($1) } }

    /// lookup: a missing name is a negative entry, which lets the kernel cache the miss
    /// (creating the name invalidates it).
    consuming func lookup(_ body: () throws(Errno) -> Attributes?) { answer(body) { $0.sendEntry($1) } }

    /// getxattr and listxattr: the size alone when the caller asked for it (size 0), ERANGE
    /// when its buffer is too small.
    consuming func xattr(bufferSize: Int, _ body: () throws(Errno) -> [UInt8]) {
        answer(body) { r, value in
            if bufferSize == 0 {
                r.send(.xattrSize(value.count)) { _ = fuse_reply_xattr($0, value.count) }
            } else if value.count > bufferSize {
                r.sendError(ERANGE)
            } else {
                value.withUnsafeBytes { r.sendBytes($0) }
            }
        }
    }

    // MARK: answers given as they are

    consuming func error(_ error: Errno) {
        sendError(error.rawValue)
        discard self
    }

    consuming func success() {
        sendError(0)
        discard self
    }

    /// forget and forget_multi: the kernel expects no answer.
    consuming func none() {
        send(.none) { fuse_reply_none($0) }
        discard self
    }

    consuming func opened(_ fi: UnsafeMutablePointer<fuse_file_info>) {
        send(.opened(backingID: nil)) { _ = fuse_reply_open($0, fi) }
        discard self
    }

    /// An open the kernel serves from `backingID`'s file itself (FUSE passthrough); with
    /// `directIO`, reads and writes still come to the daemon (direct I/O overrides passthrough
    /// for them) and only mappings map the backing file. libfuse 3.14's fuse_open_out has no
    /// backing id.
    consuming func openedPassthrough(backingID: Int32, handle: UInt64, directIO: Bool) {
        let flags = UInt32(CFUSE_FOPEN_PASSTHROUGH) | (directIO ? UInt32(FOPEN_DIRECT_IO) : 0)
        var out = cfuse_open_out_7_40(fh: handle, open_flags: flags, backing_id: backingID)
        send(.opened(backingID: backingID)) { request in
            withUnsafeBytes(of: &out) { _ = fuse_reply_buf(request, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        }
        discard self
    }


    consuming func bytes(_ buffer: UnsafeRawBufferPointer) {
        sendBytes(buffer)
        discard self
    }

    consuming func statfs(_ st: statvfs) {
        var st = st
        send(.statfs(st)) { _ = fuse_reply_statfs($0, &st) }
        discard self
    }

    /// Answers with the iovecs `produce` hands to its callback (at most once), or with the errno
    /// it throws. For arena pages the callback runs while the file system still holds its lock,
    /// so the data cannot change under the copy into the kernel; a copy of its own (a backing
    /// file's) comes after the lock is released (`FileSystem.read`).
    consuming func vectors(_ produce: (_ send: (UnsafeBufferPointer<iovec>) -> Void) throws(Errno) -> Void) {
        var sent = false
        do throws(Errno) {
            try produce { vectors in
                guard !sent else { return }
                sent = true
                send(.bytes(Self.joined(vectors))) { _ = fuse_reply_iov($0, vectors.baseAddress, Int32(vectors.count)) }
            }
        } catch {
            if !sent { sendError(error.rawValue) }
            sent = true
        }
        if !sent { sendError(EIO) }
        discard self
    }

    // MARK: sending (borrowing: the consuming answers above decide when)

    /// The one way out: to libfuse, or into the recorder.
    @inline(__always)
    private func send(_ recorded: @autoclosure () -> ReplyRecorder.Answer, _ kernel: (fuse_req_t?) -> Void) {
        if let recorder {
            recorder.takeUnretainedValue().answers.append(recorded())
        } else {
            kernel(request)
        }
    }

    private func sendError(_ errno: Int32) {
        send(errno == 0 ? .success : .error(Errno(rawValue: errno))) { _ = fuse_reply_err($0, errno) }
    }

    private func sendEntry(_ attributes: Attributes?) {
        var e = fuse_entry_param()
        if let attributes { e = Self.entryParameters(attributes) } else { e.entry_timeout = Self.cacheSeconds }
        send(.entry(attributes)) { _ = fuse_reply_entry($0, &e) }
    }

    private func sendAttributes(_ attributes: Attributes) {
        var st = attributes.stat
        send(.attributes(attributes)) { _ = fuse_reply_attr($0, &st, Self.cacheSeconds) }
    }

    private func sendLink(_ target: [UInt8]) {
        let terminated = target + [0]
        send(.bytes(target)) { request in
            terminated.withUnsafeBufferPointer { buf in
                buf.withMemoryRebound(to: CChar.self) { _ = fuse_reply_readlink(request, $0.baseAddress) }
            }
        }
    }

    func sendCreated(_ attributes: Attributes, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        var e = Self.entryParameters(attributes)
        send(.created(attributes)) { _ = fuse_reply_create($0, &e, fi) }
    }

    func sendWritten(_ count: Int) {
        send(.written(count)) { _ = fuse_reply_write($0, count) }
    }

    private func sendPosition(_ offset: Int64) {
        send(.position(offset)) { _ = fuse_reply_lseek($0, off_t(offset)) }
    }

    func sendBytes(_ buffer: UnsafeRawBufferPointer) {
        send(.bytes(Array(buffer))) { _ = fuse_reply_buf($0, buffer.baseAddress?.assumingMemoryBound(to: CChar.self), buffer.count) }
    }

    private static func joined(_ vectors: UnsafeBufferPointer<iovec>) -> [UInt8] {
        vectors.flatMap { Array(UnsafeRawBufferPointer(start: $0.iov_base, count: $0.iov_len)) }
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

/// What handlers answered, for tests that drive them in-process (`Reply(recording:)`), and the
/// request context they see.
final class ReplyRecorder {
    enum Answer {
        case success
        case error(Errno)
        case none
        /// nil: a negative entry.
        case entry(Attributes?)
        case attributes(Attributes)
        /// A buffer: data, a link target (without its NUL), an xattr value or list, directory entries.
        case bytes([UInt8])
        case xattrSize(Int)
        case opened(backingID: Int32?)
        case created(Attributes)
        case written(Int)
        case statfs(statvfs)
        case position(Int64)
    }

    var answers: [Answer] = []
    var caller: Caller
    var clearsSetID: Bool

    init(caller: Caller = .root, clearsSetID: Bool = false) {
        self.caller = caller
        self.clearsSetID = clearsSetID
    }
}
