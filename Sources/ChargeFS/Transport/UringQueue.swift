import CFuse
import CFuseTransport
import Glibc
import Synchronization
import SystemPackage

/// One FUSE-over-io_uring queue: the kernel puts a request on the queue of the CPU its caller
/// runs on, and one of this queue's workers (threads bound to that CPU where the daemon may run
/// there) answers it. Each worker has its own io_uring and one ring entry: a completion hands it
/// a request, and the reply goes back in the same buffers with the fetch of the next request,
/// both in the worker's next io_uring_enter (the kernel hands a committing entry the next queued
/// request at once, so one entry per worker costs no extra wakeup).
///
/// The kernel gives a request to the entry made available last, so one worker serves a steady
/// stream and the others wait idle. The queue keeps one idle worker (starting another, up to
/// `maxWorkers`, when a worker takes a request and none is left idle): a worker held up (a write
/// waiting for a frozen target's charge) keeps only its own entry, and the others go on serving
/// that CPU's callers, as /dev/fuse's extra workers do. (An entry registered later does not take
/// requests already waiting in the kernel, so the spare must exist before it is needed.)
final class UringQueue: @unchecked Sendable {
    let qid: UInt32
    private let cpu: UInt32?
    private let session: FuseConnection
    private let fuseFD: Int32
    private let payloadSize: Int
    static let initialWorkers = 2
    static let maxWorkers = 16
    private let busy = Atomic<Int>(0)
    private let workerCount = Atomic<Int>(0)
    private let workers = Mutex<(list: [UringWorker], stopping: Bool)>(([], false))

    /// Sets up the first workers' rings (no thread yet, nothing registered with the kernel).
    init(qid: UInt32, session: FuseConnection, fuseFD: Int32, payloadSize: Int) throws(Errno) {
        self.qid = qid
        cpu = cfuse_affinity_has_cpu(qid) != 0 ? qid : nil
        self.session = session
        self.fuseFD = fuseFD
        self.payloadSize = payloadSize
        var first: [UringWorker] = []
        for _ in 0..<Self.initialWorkers {
            first.append(try UringWorker(queue: self, session: session, fuseFD: fuseFD, entries: 1, payloadSize: payloadSize))
        }
        workers.withLock { $0.list = first }
        workerCount.store(first.count, ordering: .relaxed)
    }

    /// Starts the first workers; each reports its registration (0 or -errno) to `registered`.
    func start(registered: @escaping @Sendable (Int32) -> Void) {
        for worker in workers.withLock({ $0.list }) where !worker.start(bindTo: cpu, registered: registered) {
            registered(-EAGAIN)
        }
    }

    /// A worker took a request: start another if none is left idle.
    func workerBusy() {
        let nowBusy = busy.add(1, ordering: .relaxed).newValue
        let count = workerCount.load(ordering: .relaxed)
        guard nowBusy >= count, count < Self.maxWorkers else { return }
        grow()
    }

    func workerIdle() { busy.subtract(1, ordering: .relaxed) }

    private func grow() {
        workers.withLock { state in
            guard !state.stopping, busy.load(ordering: .relaxed) >= state.list.count, state.list.count < Self.maxWorkers else { return }
            do throws(Errno) {
                let worker = try UringWorker(queue: self, session: session, fuseFD: fuseFD, entries: 1, payloadSize: payloadSize)
                let qid = qid
                guard worker.start(bindTo: cpu, registered: { rc in
                    if rc != 0 { Log.line("io_uring queue \(qid): an added worker's entry was refused (\(Errno(rawValue: -rc)))") }
                }) else { return }
                state.list.append(worker)
                workerCount.store(state.list.count, ordering: .relaxed)
            } catch {
                Log.line("io_uring queue \(qid): cannot add a worker (\(error))")
            }
        }
    }

    /// Ends every worker's wait and joins them; no worker starts after this.
    func stop() {
        let list = workers.withLock { state in
            state.stopping = true
            return state.list
        }
        for worker in list { worker.stop() }
    }
}

/// One of a queue's workers: a thread, its io_uring and its ring entries.
///
/// The request is rebuilt into /dev/fuse's layout (fuse_in_header, the op's first argument, the
/// rest: headers copied in front of the payload, which stays where the kernel put it) and given
/// to libfuse's own request processing, so the same handlers serve both transports. libfuse sends
/// the reply through the session's custom `writev` hook, on this thread, before
/// `fuse_session_process_buf` returns (chargefs answers every request on the thread that handles
/// it); `captureReply` recognises it by its unique and copies it into the entry instead of
/// /dev/fuse.
final class UringWorker: @unchecked Sendable {
    let qid: UInt32
    private unowned let queue: UringQueue
    private let session: FuseConnection
    /// The C side's ring, entries and stop eventfd; a stable address the thread and `stop` share.
    private let ring: OpaquePointer
    private var thread: pthread_t?

    /// The entry whose reply this thread expects (set only while libfuse handles its request).
    private var current: UnsafeMutablePointer<cfuse_ring_entry>?
    private var currentUnique: UInt64 = 0
    private var answered = false

    /// Test hook (scripts/tests/uring.sh, takeover_uring_kernel): CHARGEFS_TEST_TAKEOVER_URING
    /// lets a takeover mount serve over io_uring (Daemon, Takeover), and each request taken from
    /// a ring entry is logged with the entry's header address, so that the test can answer a
    /// dead server's entry from another process (the kernel reads the reply at that address).
    static let takeoverTestHook = getenv("CHARGEFS_TEST_TAKEOVER_URING") != nil

    static let inHeaderSize = MemoryLayout<fuse_in_header>.size
    static let outHeaderSize = MemoryLayout<fuse_out_header>.size
    /// Where the request's first argument sits in struct fuse_uring_req_header (asserted in C).
    static let opInOffset = MemoryLayout<cfuse_uring_req_header>.offset(of: \.op_in) ?? Int(CFUSE_URING_IN_OUT_HEADER_SZ)


    /// Sets up the ring and its buffers (no thread yet, nothing registered with the kernel).
    init(queue: UringQueue, session: FuseConnection, fuseFD: Int32, entries: UInt32, payloadSize: Int) throws(Errno) {
        guard HandlingThread.available else { throw .noMemory }
        qid = queue.qid
        self.queue = queue
        self.session = session
        var made: OpaquePointer?
        let rc = cfuse_ring_queue_new(&made, fuseFD, qid, entries, payloadSize)
        guard rc == 0, let made else { throw Errno(rawValue: rc < 0 ? -rc : ENOMEM) }
        ring = made
    }

    deinit {
        cfuse_ring_queue_free(ring)
    }

    /// Starts the thread, which registers the entries and then serves; `registered` gets the
    /// registration's result (0 or -errno) from that thread.
    func start(bindTo cpu: UInt32?, registered: @escaping @Sendable (Int32) -> Void) -> Bool {
        let body = Unmanaged.passRetained(ThreadBody { [self] in run(cpu: cpu, registered: registered) })
        var t = pthread_t()
        guard pthread_create(&t, nil, { arg in
            guard let arg else { return nil }
            let body = Unmanaged<ThreadBody>.fromOpaque(arg).takeRetainedValue()
            body.run()
            return nil
        }, body.toOpaque()) == 0 else {
            body.release()
            return false
        }
        thread = t
        return true
    }

    /// Ends the thread's wait and joins it.
    func stop() {
        cfuse_ring_queue_stop(ring)
        if let thread { pthread_join(thread, nil) }
        thread = nil
    }

    private func run(cpu: UInt32?, registered: (Int32) -> Void) {
        cfuse_set_thread_name("chargefs-ring\(qid)")
        if let cpu { _ = cfuse_bind_thread_to_cpu(cpu) }
        guard HandlingThread.serve(as: self) else {
            registered(-ENOMEM)
            return
        }
        // Registered from this thread: the kernel completes each entry's command as task work of
        // the task that submitted it.
        let rc = cfuse_ring_queue_register(ring)
        registered(rc)
        guard rc == 0 else { return }
        var live = Int(cfuse_ring_queue_count(ring))
        let batch = live + 1
        var entries = [UnsafeMutablePointer<cfuse_ring_entry>?](repeating: nil, count: batch)
        var results = [Int32](repeating: 0, count: batch)
        var stopping = false
        // Commits and retries the ring could not take yet (it was full): sent again before each
        // wait, never dropped, since each carries a reply a caller waits for.
        var unsent: [(entry: UnsafeMutablePointer<cfuse_ring_entry>, commitID: UInt64?)] = []
        while !stopping && live > 0 {
            unsent.removeAll { send($0.entry, commitID: $0.commitID) }
            let n = cfuse_ring_queue_wait(ring, &entries, &results, UInt32(batch))
            if n < 0 {
                Log.line("io_uring queue \(qid): wait failed: \(Errno(rawValue: -n)); queue stopped")
                return
            }
            for i in 0..<Int(n) {
                guard let entry = entries[i] else { stopping = true; continue }
                switch results[i] {
                case 0:
                    queue.workerBusy()
                    let commitID = serve(entry)
                    queue.workerIdle()
                    guard let commitID else { live -= 1; continue }  // an entry without buffers: never made
                    if !send(entry, commitID: commitID) { unsent.append((entry, commitID)) }
                case -EAGAIN, -EINTR:
                    if !send(entry, commitID: nil) { unsent.append((entry, nil)) }
                case -ENOTCONN, -ECONNABORTED:
                    live -= 1  // unmounted: the kernel hands back each entry once
                default:
                    Log.line("io_uring queue \(qid): \(Errno(rawValue: -results[i])) from the kernel; entry dropped")
                    live -= 1
                }
            }
        }
    }

    /// Queues an entry's commit (its reply, with the fetch of the next request), or with a nil
    /// `commitID` the retry of its last command; false when the ring cannot take it yet (said
    /// once in the log; the caller keeps it for the next round).
    private func send(_ entry: UnsafeMutablePointer<cfuse_ring_entry>, commitID: UInt64?) -> Bool {
        let rc = commitID.map { cfuse_ring_queue_commit(ring, entry, $0) } ?? cfuse_ring_queue_retry(ring, entry)
        if rc != 0 && !sendRefusalLogged {
            sendRefusalLogged = true
            Log.line("io_uring queue \(qid): the ring refused a commit (\(Errno(rawValue: -rc))); kept for the next round")
        }
        return rc == 0
    }
    private var sendRefusalLogged = false

    /// Rebuilds the entry's request for libfuse and has it handled; returns the commit id to
    /// send the reply with (the entry's buffers hold it), nil for an entry without buffers.
    private func serve(_ entry: UnsafeMutablePointer<cfuse_ring_entry>) -> UInt64? {
        guard let headerStruct = entry.pointee.header, let payload = entry.pointee.payload else { return nil }
        let header = UnsafeMutableRawPointer(headerStruct)
        let inOut = headerStruct.pointee.ring_ent_in_out
        let inHeader = header.loadUnaligned(as: fuse_in_header.self)
        let payloadSize = Int(inOut.payload_sz)
        // The kernel's length counts every argument: what is not payload is the op's first one.
        let opSize = Int(inHeader.len) - Self.inHeaderSize - payloadSize
        guard opSize >= 0, opSize <= Int(CFUSE_URING_OP_IN_OUT_SZ), payloadSize <= entry.pointee.payload_size else {
            Log.line("io_uring queue \(qid): malformed request (opcode \(inHeader.opcode), length \(inHeader.len), payload \(payloadSize)); answered EIO")
            answerError(entry, unique: inHeader.unique, EIO)
            return inOut.commit_id
        }
        let total = Self.inHeaderSize + opSize + payloadSize
        // Rebuilt in place: the payload is not copied; the headers go into the unused end of the
        // header's page, right before it (cfuse_ring_queue_init's layout).
        let request = payload - (Self.inHeaderSize + opSize)
        request.copyMemory(from: header, byteCount: Self.inHeaderSize)
        (request + Self.inHeaderSize).copyMemory(from: header + Self.opInOffset, byteCount: opSize)

        if Self.takeoverTestHook {
            Log.line("io_uring test: queue \(qid) took unique \(inOut.commit_id) opcode \(inHeader.opcode) header 0x\(String(UInt(bitPattern: header), radix: 16))")
        }
        current = entry
        currentUnique = inHeader.unique
        answered = false
        session.requests.count(request: request, length: total)
        session.features.note(request: request, length: total)
        var buffer = fuse_buf()
        buffer.size = total
        buffer.mem = request
        buffer.fd = -1
        if let handle = session.handle { fuse_session_process_buf(handle, &buffer) }
        current = nil
        if !answered {
            // Every request over the ring gets exactly one reply on its thread; none means a
            // handler answered elsewhere, which would leave this entry (and its caller) waiting.
            Log.line("io_uring queue \(qid): no reply to opcode \(inHeader.opcode) on its thread; answered EIO")
            answerError(entry, unique: inHeader.unique, EIO)
        }
        return inOut.commit_id
    }

    private func answerError(_ entry: UnsafeMutablePointer<cfuse_ring_entry>, unique: UInt64, _ error: Int32) {
        guard let headerStruct = entry.pointee.header else { return }
        UnsafeMutableRawPointer(headerStruct).storeBytes(of: fuse_out_header(len: UInt32(Self.outHeaderSize), error: -error, unique: unique),
                                                         as: fuse_out_header.self)
        headerStruct.pointee.ring_ent_in_out.payload_sz = 0
    }

    /// The custom writev hook's first look: a reply to the request this thread's queue is
    /// handling goes into its ring entry (out header, then payload). Returns the bytes taken, or
    /// nil for anything else (notifications, replies on /dev/fuse's own threads).
    static func captureReply(_ iov: UnsafePointer<iovec>, _ count: Int) -> Int? {
        guard let worker = HandlingThread.existing?.uringWorker, let entry = worker.current, !worker.answered, count >= 1, iov[0].iov_len >= outHeaderSize,
              let first = iov[0].iov_base else { return nil }
        let out = first.loadUnaligned(as: fuse_out_header.self)
        guard out.unique == worker.currentUnique else { return nil }
        worker.answered = true
        let total = (0..<count).reduce(0) { $0 + iov[$1].iov_len }
        guard total - outHeaderSize <= entry.pointee.payload_size,
              let headerStruct = entry.pointee.header, let payload = entry.pointee.payload else {
            worker.answerError(entry, unique: out.unique, EIO)
            return total
        }
        UnsafeMutableRawPointer(headerStruct).copyMemory(from: first, byteCount: outHeaderSize)
        // Everything after the out header, from whichever vectors hold it, is payload.
        var skip = outHeaderSize
        var written = 0
        for i in 0..<count {
            let len = iov[i].iov_len
            guard len > skip, let base = iov[i].iov_base else { skip -= min(skip, len); continue }
            payload.advanced(by: written).copyMemory(from: base + skip, byteCount: len - skip)
            written += len - skip
            skip = 0
        }
        headerStruct.pointee.ring_ent_in_out.payload_sz = UInt32(written)
        return total
    }
}

/// A closure a pthread runs.
private final class ThreadBody {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}
