import Glibc

/// What the transport knows of the request a thread is handling, beyond the bytes libfuse
/// decodes: whether the kernel flagged it to clear setuid/setgid, and which io_uring worker (if
/// any) must take its reply.
///
/// Why per thread: libfuse 3.14 hands its custom I/O hooks and the handler it calls nothing in
/// common but the thread (a request is read, decoded, handled and answered on one thread, on
/// both transports), so the thread is the only carrier from the read hook to the handler and
/// from the handler's reply to the writev hook. This type owns the one pthread key for it; each
/// thread's state is an object released with the thread. Speaking the protocol ourselves
/// (docs/protocol.md) would carry this in the request instead.
final class HandlingThread {
    /// The kernel flagged the request being handled here to clear setuid/setgid
    /// (FUSE_HANDLE_KILLPRIV_V2); written by the read hook, read by the handler.
    var clearsSetID = false
    /// The request being handled here: its unique (bit 63 set for a resend) and opcode, from its
    /// header; written by the read hook, read by the Bridge only while state is kept (a resent
    /// request already applied gets its saved answer).
    var unique: UInt64 = 0
    var opcode: UInt32 = 0
    /// The request being handled here was resent and its reply is not written yet
    /// (ResentFirst counts such requests while a successor drains them).
    var awaitsResentReply = false
    /// Test hook: die before this request's reply (FuseKernelFeatures.killBeforeReply).
    var killBeforeReply = false
    /// The io_uring worker this thread is; nil on /dev/fuse's threads.
    private(set) var uringWorker: UringWorker?

    private static let key: pthread_key_t? = {
        var key = pthread_key_t()
        let made = pthread_key_create(&key) { state in
            if let state { Unmanaged<HandlingThread>.fromOpaque(state).release() }
        }
        return made == 0 ? key : nil
    }()

    /// Whether the key exists (made once, at first use; pthread keys can run out).
    static var available: Bool { key != nil }

    /// This thread's state, made at its first request.
    static var current: HandlingThread? {
        guard let key else { return nil }
        if let state = pthread_getspecific(key) { return Unmanaged<HandlingThread>.fromOpaque(state).takeUnretainedValue() }
        let state = HandlingThread()
        guard pthread_setspecific(key, Unmanaged.passRetained(state).toOpaque()) == 0 else {
            Unmanaged.passUnretained(state).release()
            return nil
        }
        return state
    }

    /// This thread's state if it has any (the writev hook: notifications come from any thread).
    static var existing: HandlingThread? {
        guard let key, let state = pthread_getspecific(key) else { return nil }
        return Unmanaged<HandlingThread>.fromOpaque(state).takeUnretainedValue()
    }

    /// The request handled on this thread asked to clear setuid/setgid.
    static var clearsSetID: Bool { existing?.clearsSetID ?? false }

    /// Makes this thread `worker`'s for good (an io_uring worker's own thread).
    static func serve(as worker: UringWorker) -> Bool {
        guard let state = current else { return false }
        state.uringWorker = worker
        return true
    }
}
