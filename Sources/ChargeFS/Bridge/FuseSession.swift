import CFuse
import Glibc
import Synchronization
import SystemPackage

/// One mount's FUSE session: the libfuse session, the file system it serves, and what INIT
/// settled with this kernel. libfuse hands it back as userdata with every request, to the INIT
/// and DESTROY callbacks and to the custom I/O hooks, so nothing about a session is global.
final class FuseSession: @unchecked Sendable {
    let fileSystem: FileSystem
    /// The protocol features negotiated past libfuse 3.14 (written only while INIT is handled,
    /// before the kernel sends any other request).
    let features = FuseKernelFeatures()
    /// Requests by kind, for the root's `user.chargefs.requests` attribute.
    let requests = RequestCounts()
    /// The libfuse session; set once, before the first request is read.
    private(set) var handle: OpaquePointer?

    /// Whether FUSE over io_uring serves this mount (else /dev/fuse): set when the rings
    /// register or fail.
    private let servedOverIoUring = Atomic(false)

    init(fileSystem: FileSystem) {
        self.fileSystem = fileSystem
    }

    /// `io_uring` or `dev-fuse`, as the status attribute and the log name it.
    var transport: String { servedOverIoUring.load(ordering: .relaxed) ? "io_uring" : "dev-fuse" }

    /// The root's read-only attributes that the transport answers: the status (the tree's lines,
    /// then the transport's) and the requests by kind. nil for any other name.
    func transportAttribute(_ ino: InodeNumber, name: FileName) throws(Errno) -> [UInt8]? {
        guard ino == FileSystem.rootIno else { return nil }
        if name == FileSystem.requestsXattr { return Array(requests.text.utf8) }
        if name == FileSystem.statusXattr {
            return try fileSystem.getxattr(ino, name: name) + Array("transport=\(transport)\n".utf8)
        }
        return nil
    }

    /// Creates the libfuse session for `arguments` (argv form, libfuse's options).
    func start(arguments: [String]) -> Bool {
        var ops = FuseOperations.table()
        var cArguments = arguments.map { strdup($0) }
        defer { cArguments.forEach { free($0) } }
        handle = cArguments.withUnsafeMutableBufferPointer { argv in
            var args = fuse_args(argc: Int32(argv.count), argv: argv.baseAddress, allocated: 0)
            defer { fuse_opt_free_args(&args) }
            return fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size,
                                    Unmanaged.passUnretained(self).toOpaque())
        }
        return handle != nil
    }

    /// Handles one request given as the kernel sends it (fuse_in_header, then its arguments) on
    /// this thread, as if the transport had read it: the counters and the INIT patch see it, and
    /// the reply goes out through the session's hooks. How a successor replays the INIT its
    /// predecessor answered; tests feed requests with it.
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

    /// The session a request belongs to.
    static func of(_ userdata: UnsafeMutableRawPointer?) -> FuseSession? {
        userdata.map { Unmanaged<FuseSession>.fromOpaque($0).takeUnretainedValue() }
    }

    /// Where backing files are registered for passthrough; nil until INIT took passthrough.
    private(set) var passthrough: PassthroughRegistry?

    /// INIT took FUSE passthrough: large read-only opens may now be handed to the kernel.
    func startPassthrough() {
        guard let handle, let device = PassthroughRegistry.Device(sessionFD: fuse_session_fd(handle)) else { return }
        passthrough = PassthroughRegistry(device: device)
        fileSystem.noteKernelPassthrough(true)
    }

    private let refusalLogged = Atomic(false)

    /// The kernel refused to register a backing file: said once in the log.
    func noteRefusedPassthrough(_ error: Errno) {
        guard !refusalLogged.exchange(true, ordering: .relaxed) else { return }
        Log.line("passthrough: the kernel refused a backing file (\(error)); such opens are served by the daemon")
    }

    /// FUSE over io_uring, once INIT claimed it; nil while /dev/fuse serves everything.
    private var uring: UringTransport?

    /// Sets up the rings while the INIT reply is being written; false (logged) if this host
    /// refuses them, and the reply then does not claim io_uring.
    func prepareUring(payloadSize: Int) -> Bool {
        guard let handle else { return false }
        do throws(Errno) {
            uring = try UringTransport(session: self, fuseFD: fuse_session_fd(handle), payloadSize: payloadSize)
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

    /// Tells the kernel its cached attributes of `ino` are stale (a mode changed behind its back).
    /// Attributes only (negative offset): takes no inode lock a writer may hold.
    func invalidateAttributes(_ ino: fuse_ino_t) {
        if let handle { _ = fuse_lowlevel_notify_inval_inode(handle, ino, -1, 0) }
    }
}

extension InodeNumber {
    /// The kernel's nodeid is our inode number.
    init(_ nodeid: fuse_ino_t) { self.init(rawValue: UInt64(nodeid)) }
}
