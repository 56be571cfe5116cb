import CFuse
import Glibc
import Synchronization
import SystemPackage

/// One FUSE connection as the transport sees it: the libfuse session, what INIT settled past
/// libfuse 3.14 (`features`), the requests counted by kind, and which transport serves (the
/// /dev/fuse hooks, or FUSE over io_uring). libfuse hands the connection back as userdata to
/// the custom I/O hooks, so nothing about a connection is global.
///
/// The Bridge's `FuseSession` is the one subclass: it adds the file system and what the
/// handlers need. The transport calls up only through the two methods a subclass overrides
/// (`passthroughNegotiated`), never by naming the Bridge.
class FuseConnection: @unchecked Sendable {
    /// The protocol features negotiated past libfuse 3.14 (written only while INIT is handled,
    /// before the kernel sends any other request).
    let features = FuseKernelFeatures()
    /// Requests by kind, for the root's `user.chargefs.requests` attribute.
    let requests = RequestCounts()
    /// The libfuse session; set once, before the first request is read.
    var handle: OpaquePointer?

    /// Whether FUSE over io_uring serves this connection (else /dev/fuse): set when the rings
    /// register or fail.
    private let servedOverIoUring = Atomic(false)
    /// FUSE over io_uring, once INIT claimed it; nil while /dev/fuse serves everything.
    private var uring: UringTransport?

    init() {}

    /// Called once the INIT reply is written, with the INIT request (a mount that keeps state
    /// saves it for a successor). Set before the first request is read.
    var initAnswered: (([UInt8]) -> Void)?
    /// While set, replies are dropped instead of written: a successor replays the saved INIT
    /// (set and cleared on the one thread that replays, before any worker reads).
    var dropsReplies = false

    /// A successor's start: feeds the INIT its predecessor answered into this fresh session
    /// (libfuse answers EIO to everything before INIT), its reply dropped, since the kernel had
    /// it from the first server. The INIT patch runs as it did then.
    func replayInit(_ saved: [UInt8]) {
        var bytes = saved
        dropsReplies = true
        bytes.withUnsafeMutableBytes { process(request: $0) }
        dropsReplies = false
    }

    /// The connection a hook's userdata names.
    static func connection(_ userdata: UnsafeMutableRawPointer?) -> FuseConnection? {
        userdata.map { Unmanaged<FuseConnection>.fromOpaque($0).takeUnretainedValue() }
    }

    /// `io_uring` or `dev-fuse`, as the status attribute and the log name it.
    var transport: String { servedOverIoUring.load(ordering: .relaxed) ? "io_uring" : "dev-fuse" }

    /// INIT took FUSE passthrough (the reply claiming it is being written): the subclass starts
    /// registering backing files.
    func passthroughNegotiated() {}

    /// Handles one request given as the kernel sends it (fuse_in_header, then its arguments) on
    /// this thread, as if the transport had read it: the counters and the INIT patch see it, and
    /// the reply goes out through the hooks. How a successor replays the INIT its predecessor
    /// answered; tests feed requests with it.
    func process(request bytes: UnsafeMutableRawBufferPointer) {
        guard let handle, let base = bytes.baseAddress else { return }
        requests.count(request: base, length: bytes.count)
        features.note(request: base, length: bytes.count)
        var buffer = fuse_buf()
        buffer.size = bytes.count
        buffer.mem = base
        buffer.fd = -1
        fuse_session_process_buf(handle, &buffer)
    }

    /// Sets up the rings while the INIT reply is being written; false (logged) if this host
    /// refuses them, and the reply then does not claim io_uring.
    func prepareUring(payloadSize: Int) -> Bool {
        guard let handle else { return false }
        do throws(Errno) {
            uring = try UringTransport(connection: self, fuseFD: fuse_session_fd(handle), payloadSize: payloadSize)
            return true
        } catch {
            Log.line("io_uring: cannot set up the rings (\(error)); serving over /dev/fuse")
            return false
        }
    }

    /// Registers the rings once the INIT reply claiming io_uring is written. The kernel holds
    /// requests until every queue registered; a failed registration turns io_uring off for the
    /// connection, and /dev/fuse serves.
    func startUring(initReplyWritten: Bool) {
        guard let uring else { return }
        guard initReplyWritten else {
            self.uring = nil
            return
        }
        servedOverIoUring.store(true, ordering: .relaxed)
        if let error = uring.start() {
            servedOverIoUring.store(false, ordering: .relaxed)
            Log.line("io_uring: the kernel refused the rings (\(error)); serving over /dev/fuse")
        } else {
            Log.line("serving over io_uring: \(uring.queueCount) queues, \(UringQueue.initialWorkers) workers each (up to \(UringQueue.maxWorkers))")
        }
    }

    /// Ends the queue threads (after the /dev/fuse loop ended).
    func stopUring() {
        uring?.stop()
        uring = nil
    }
}
