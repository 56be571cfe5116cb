import CFuse
import CFuseTransport
import Glibc
import Synchronization

/// Two features of the kernel's FUSE protocol that libfuse 3.14 (FUSE 7.31 in its own headers)
/// cannot negotiate, added to the session through its custom I/O hooks on /dev/fuse:
///
/// - FUSE_HANDLE_KILLPRIV_V2: clearing setuid/setgid is ours. Without it the kernel asks
///   getxattr("security.capability") before every cached write, a second round trip per write(2).
///   With it the kernel marks inodes S_NOSEC and flags each write, truncate or open whose caller
///   lacks CAP_FSETID; `read` notes that flag in the thread's `HandlingThread` before libfuse
///   decodes the request (libfuse handles a request on the thread that read it).
/// - FUSE_DIRECT_IO_ALLOW_MMAP (7.39): files opened with direct I/O can still be mapped shared.
///   The kernel then writes back and drops cached pages of a range before each direct read or
///   write of it, so read(2), write(2) and a mapping stay coherent.
///
/// `writev` adds the flags the kernel offered to the INIT reply, and FUSE_OVER_IO_URING where the
/// mount wants it and its rings are ready (UringTransport); replies to requests that came over
/// io_uring go back into their ring entries (UringWorker.captureReply). One instance per session (its
/// `FuseConnection` owns it); the hooks find it through the session's userdata.
final class FuseKernelFeatures {
    /// The INIT request's id and the flags the kernel offered (flags2 in the high half); written
    /// by the one thread that reads INIT, before any other request exists.
    private var initRequest: (unique: UInt64, flags: UInt64)?
    private var initPatched = false
    private var initReplySeen = false
    /// The INIT request as the kernel sent it (a successor replays it); nil before INIT.
    private(set) var initRequestBytes: [UInt8]?
    /// Requests the kernel resent to this server (FUSE_NOTIFY_RESEND after a takeover: bit 63
    /// of unique), for the status attribute.
    let resent = Atomic<Int>(0)
    static let resentBit: UInt64 = 1 << 63
    /// A successor answers resent requests before any other (ResentFirst says why).
    let resentFirst = ResentFirst()
    /// Whether the kernel took the handover: then all clearing is ours.
    private(set) var granted = false

    /// FUSE_DIRECT_IO_ALLOW_MMAP, in flags2 (bit 36 of the 64-bit flags); newer than the headers.
    static let directIOAllowMmap: UInt64 = 1 << 36

    /// Routes the session's traffic through the hooks, on `fd`: by default the session's own
    /// (call after fuse_session_mount); a connection taken over, or a test's socket, otherwise.
    static func install(on session: FuseConnection, fd: Int32? = nil) -> Bool {
        guard HandlingThread.available, let handle = session.handle else { return false }
        var io = fuse_custom_io()
        io.read = { fd, buf, len, userdata in
            guard let session = FuseConnection.connection(userdata) else { return Glibc.read(fd, buf, len) }
            let n = session.features.resentFirst.read(into: buf) { Glibc.read(fd, buf, len) }
            session.requests.count(request: buf, length: n)
            session.features.note(request: buf, length: n)
            return n
        }
        io.writev = { fd, iov, count, userdata in
            guard let iov else { return Glibc.writev(fd, iov, count) }
            // Test hooks (one check when none is armed; on either transport: over io_uring the
            // dead server's ring entry holds the unanswered request): see `runTestHooks`.
            if FuseKernelFeatures.testHooksArmed { FuseKernelFeatures.runTestHooks(iov, Int(count)) }
            // A reply to a request taken from an io_uring entry goes back into that entry.
            if let taken = UringWorker.captureReply(iov, Int(count)) { return taken }
            guard let session = FuseConnection.connection(userdata) else { return Glibc.writev(fd, iov, count) }
            let answersInit = session.features.isFirstInitReply(iov, Int(count))
            let claimsUring = session.features.patchIfInitReply(iov, Int(count), session: session)
            if session.dropsReplies {
                // A successor's replayed INIT: the kernel had its answer from the first server.
                // If it claimed io_uring, the connection serves over rings: register new entries.
                if claimsUring { session.startUring(initReplyWritten: true) }
                return (0..<Int(count)).reduce(0) { $0 + iov[$1].iov_len }
            }
            let written = Glibc.writev(fd, iov, count)
            session.features.resentFirst.replied(iov, Int(count))
            if claimsUring { session.startUring(initReplyWritten: written >= 0) }
            if answersInit, written >= 0, let request = session.features.initRequestBytes { session.initAnswered?(request) }
            return written
        }
        return fuse_session_custom_io(handle, &io, fd ?? fuse_session_fd(handle)) == 0
    }

    /// Reads what the kernel says in a request before libfuse decodes it (on the handling thread).
    func note(request: UnsafeMutableRawPointer?, length: Int) {
        let errnoSaved = errno
        defer { errno = errnoSaved }
        var clears = false
        var unique: UInt64 = 0, opcode: UInt32 = 0
        let headerSize = MemoryLayout<fuse_in_header>.size
        if let request, length >= headerSize {
            let header = request.loadUnaligned(as: fuse_in_header.self)
            unique = header.unique
            opcode = header.opcode
            if unique & Self.resentBit != 0 { resent.add(1, ordering: .relaxed) }
            let arg = UnsafeRawBufferPointer(start: request + headerSize, count: length - headerSize)
            func argument<T>(_ type: T.Type) -> T? {
                arg.count >= MemoryLayout<T>.size ? arg.loadUnaligned(as: T.self) : nil
            }
            switch header.opcode {
            case FUSE_WRITE.rawValue:
                clears = argument(fuse_write_in.self).map { $0.write_flags & UInt32(FUSE_WRITE_KILL_SUIDGID) != 0 } ?? false
            case FUSE_SETATTR.rawValue:
                clears = argument(fuse_setattr_in.self).map { $0.valid & UInt32(FATTR_KILL_SUIDGID) != 0 } ?? false
            case FUSE_OPEN.rawValue:
                clears = argument(fuse_open_in.self).map { $0.open_flags & UInt32(FUSE_OPEN_KILL_SUIDGID) != 0 } ?? false
            case FUSE_INIT.rawValue:
                // Older kernels send a shorter fuse_init_in; its first four fields never changed.
                if arg.count >= Self.end(of: \fuse_init_in.flags) {
                    let input = Self.prefix(of: arg, as: fuse_init_in())
                    var flags = UInt64(input.flags)
                    if flags & UInt64(FUSE_INIT_EXT) != 0, arg.count >= Self.end(of: \fuse_init_in.flags2) {
                        flags |= UInt64(input.flags2) << 32
                    }
                    initRequest = (header.unique, flags)
                    initRequestBytes = Array(UnsafeRawBufferPointer(start: request, count: length))
                }
            default: break
            }
        }
        if let thread = HandlingThread.current {
            if Self.killBeforeReply != 0 {
                thread.killBeforeReply = opcode == Self.killBeforeReply || (Self.killBeforeReply == FUSE_RENAME.rawValue && opcode == FUSE_RENAME2.rawValue)
            }
            thread.clearsSetID = clears
            thread.unique = unique
            thread.opcode = opcode
        }
    }

    /// Whether this reply answers INIT (the first time only): its request is then saved for a
    /// successor, once the kernel has taken the reply.
    fileprivate func isFirstInitReply(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> Bool {
        guard let initRequest, !initReplySeen, count >= 1, iov[0].iov_len >= MemoryLayout<fuse_out_header>.size,
              let header = iov[0].iov_base else { return false }
        let out = header.loadUnaligned(as: fuse_out_header.self)
        guard out.unique == initRequest.unique, out.error == 0 else { return false }
        initReplySeen = true
        return true
    }

    /// FUSE_HAS_RESEND (7.40, Linux 6.9+), in flags2: the kernel takes FUSE_NOTIFY_RESEND.
    static let hasResend: UInt64 = 1 << 39

    /// Whether the INIT request offered FUSE_HAS_RESEND.
    var kernelOffersResend: Bool {
        let needed = Self.hasResend | UInt64(FUSE_INIT_EXT)
        return (initRequest?.flags ?? 0) & needed == needed
    }

    /// Test hook (scripts/tests/takeover.sh, per-opcode kills): CHARGEFS_TEST_KILL_BEFORE_REPLY=
    /// create|unlink|rename|mkdir|link makes the server SIGKILL itself after it applied the first
    /// such request and before its reply is written (rename: RENAME2 too). A successor unsets it.
    static let killBeforeReplyVariable = "CHARGEFS_TEST_KILL_BEFORE_REPLY"
    static let killBeforeReply: UInt32 = {
        guard let value = getenv(killBeforeReplyVariable) else { return 0 }
        switch String(cString: value) {
        case "create": return FUSE_CREATE.rawValue
        case "unlink": return FUSE_UNLINK.rawValue
        case "rename": return FUSE_RENAME.rawValue
        case "mkdir": return FUSE_MKDIR.rawValue
        case "link": return FUSE_LINK.rawValue
        default: return 0
        }
    }()

    /// Test hook (takeover.sh kill_unlink_linked): CHARGEFS_TEST_DELAY_RESENT_REPLY_MS=N makes a
    /// server wait N ms before it writes the reply to a resent request (bit 63 of unique: only a
    /// successor sees one): requests the kernel queued behind it would be answered first, but
    /// for `ResentFirst`, which makes them wait.
    static let delayResentReplyVariable = "CHARGEFS_TEST_DELAY_RESENT_REPLY_MS"
    static let delayResentReplyMs: Int = {
        guard let value = getenv(delayResentReplyVariable) else { return 0 }
        return max(0, Int(String(cString: value)) ?? 0)
    }()

    /// Test hook (takeover.sh kill_unlink_listed_held): CHARGEFS_TEST_RESENT_REPLY_GATE=PATH makes
    /// a server hold the reply to a resent request until PATH exists (looked for every 1 ms, at
    /// most 10 s; logged when it starts waiting), after any CHARGEFS_TEST_DELAY_RESENT_REPLY_MS:
    /// the test opens the gate once the unlinking caller's CPU is taken, so that the caller,
    /// woken by that reply, runs only after what the successor answers next.
    static let resentReplyGateVariable = "CHARGEFS_TEST_RESENT_REPLY_GATE"
    static let resentReplyGate: String? = {
        guard let value = getenv(resentReplyGateVariable), value.pointee != 0 else { return nil }
        return String(cString: value)
    }()
    static let resentReplyGateLongestWait: UInt64 = 10_000_000  // µs

    /// Whether any test hook is armed: the writev hook's one check per reply.
    static let testHooksArmed = killBeforeReply != 0 || delayResentReplyMs > 0 || resentReplyGate != nil

    /// The armed test hooks, on the thread about to write a reply (`iov[0]` starts with its
    /// fuse_out_header).
    static func runTestHooks(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) {
        // The request was applied (and its record published), its answer not sent.
        if killBeforeReply != 0, HandlingThread.existing?.killBeforeReply == true { kill(getpid(), SIGKILL) }
        guard delayResentReplyMs > 0 || resentReplyGate != nil, count >= 1, iov[0].iov_len >= MemoryLayout<fuse_out_header>.size,
              let header = iov[0].iov_base else { return }
        let out = header.loadUnaligned(as: fuse_out_header.self)
        guard out.unique & resentBit != 0 else { return }
        if delayResentReplyMs > 0 {
            var pause = timespec(tv_sec: delayResentReplyMs / 1000, tv_nsec: (delayResentReplyMs % 1000) * 1_000_000)
            nanosleep(&pause, nil)
        }
        if let gate = resentReplyGate {
            Log.line("test hook: the reply to resent request \(out.unique & ~resentBit) waits for \(gate)")
            let start = MonotonicClock.microseconds()
            var pause = timespec(tv_sec: 0, tv_nsec: 1_000_000)
            while access(gate, F_OK) != 0, MonotonicClock.microseconds() - start < resentReplyGateLongestWait { nanosleep(&pause, nil) }
            Log.line("test hook: the reply to resent request \(out.unique & ~resentBit) goes after \((MonotonicClock.microseconds() - start) / 1000) ms")
        }
    }

    /// Flags this patch may add to the INIT reply, if the kernel offered them.
    static let addedFlags = UInt64(FUSE_HANDLE_KILLPRIV_V2) | directIOAllowMmap

    /// Whether the mount wants FUSE over io_uring where the kernel offers it (set before mounting).
    var wantsIoUring = false
    /// Whether to take FUSE_DIRECT_IO_ALLOW_MMAP where offered (set before mounting: the Bridge's
    /// CacheModeChoice says whether this kernel maps direct-I/O files shared correctly).
    var offerDirectIOMmap = true
    /// Whether the mount wants FUSE passthrough for large read-only opens (set before mounting).
    var wantsPassthrough = false
    /// FUSE_PASSTHROUGH (7.40), in flags2.
    static let passthrough = UInt64(CFUSE_INIT_PASSTHROUGH)
    /// Whether the INIT reply claimed FUSE_OVER_IO_URING.
    private(set) var ioUringClaimed = false

    /// Whether the INIT request offered FUSE over io_uring (enable_uring on, Linux 6.14+).
    var kernelOffersIoUring: Bool {
        let needed = UInt64(CFUSE_OVER_IO_URING) | UInt64(FUSE_INIT_EXT)
        return (initRequest?.flags ?? 0) & needed == needed
    }

    /// Patches the INIT reply; returns whether it now claims FUSE over io_uring (its rings are
    /// then set up, and must be registered once the reply is written).
    fileprivate func patchIfInitReply(_ iov: UnsafeMutablePointer<iovec>, _ count: Int, session: FuseConnection) -> Bool {
        guard let initRequest, !initPatched,
              count >= 2, iov[0].iov_len >= MemoryLayout<fuse_out_header>.size, let header = iov[0].iov_base,
              let reply = iov[1].iov_base else { return false }
        let out = header.loadUnaligned(as: fuse_out_header.self)
        guard out.unique == initRequest.unique, out.error == 0 else { return false }
        initPatched = true
        let replyBuffer = UnsafeMutableRawBufferPointer(start: reply, count: iov[1].iov_len)
        var adding = Self.addedFlags
        if !offerDirectIOMmap {
            adding &= ~Self.directIOAllowMmap   // mmap(MAP_SHARED) then fails with ENODEV: see CacheModeChoice
        }
        if wantsIoUring && !kernelOffersIoUring {
            Log.line("serving over /dev/fuse (the kernel did not offer FUSE over io_uring at INIT)")
        }
        if wantsIoUring, kernelOffersIoUring, replyBuffer.count >= Self.end(of: \InitOut.flags2) {
            // The kernel's payload buffers hold max(max_write, max_pages pages).
            let out = Self.prefix(of: UnsafeRawBufferPointer(replyBuffer), as: InitOut())
            if session.prepareUring(payloadSize: max(Int(out.max_write), Int(out.max_pages) * PageSize.bytes)) {
                adding |= UInt64(CFUSE_OVER_IO_URING)
            }
        }
        // Passthrough needs max_stack_depth: the backing files are on tmpfs (depth 0), so 1. The
        // kernel turns it off itself with FUSE_WRITEBACK_CACHE, which we never ask for.
        if wantsPassthrough, initRequest.flags & Self.passthrough != 0, replyBuffer.count >= Self.end(of: \InitOut.max_stack_depth) {
            adding |= Self.passthrough
        }
        guard initRequest.flags & adding != 0 else { return false }
        let replyFlags = Self.patchInitReply(replyBuffer, offered: initRequest.flags, adding: adding)
        granted = replyFlags & UInt64(FUSE_HANDLE_KILLPRIV_V2) != 0
        ioUringClaimed = replyFlags & UInt64(CFUSE_OVER_IO_URING) != 0
        if replyFlags & Self.passthrough != 0 {
            var out = Self.prefix(of: UnsafeRawBufferPointer(replyBuffer), as: InitOut())
            out.max_stack_depth = 1
            Self.storePrefix(out, into: replyBuffer)
            session.passthroughNegotiated()
        } else if wantsPassthrough {
            Log.line("passthrough: the kernel did not offer FUSE passthrough at INIT (Linux 6.9+); every read is served by the daemon")
        }
        return ioUringClaimed
    }

    /// fuse_init_out as of protocol 7.40 (the C module asserts it matches the kernel's header).
    typealias InitOut = cfuse_init_out_7_40

    /// The byte just past a field: a message shorter than that does not carry it.
    static func end<Root, Field>(of field: KeyPath<Root, Field>) -> Int {
        MemoryLayout<Root>.offset(of: field).map { $0 + MemoryLayout<Field>.size } ?? Int.max
    }

    /// The struct a message holds, from as many of its bytes as the message has (an older
    /// kernel's or libfuse's is shorter): the fields past its end stay as in `zero`.
    static func prefix<T>(of bytes: UnsafeRawBufferPointer, as zero: T) -> T {
        var value = zero
        withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes.prefix($0.count))) }
        return value
    }

    /// Writes `value` back over the bytes the message has (never past its end).
    static func storePrefix<T>(_ value: T, into bytes: UnsafeMutableRawBufferPointer) {
        withUnsafeBytes(of: value) { source in
            UnsafeMutableRawBufferPointer(rebasing: bytes.prefix(source.count)).copyMemory(from: UnsafeRawBufferPointer(rebasing: source.prefix(bytes.count)))
        }
    }

    /// Adds what the kernel offered of `addedFlags` to a fuse_init_out (flags2 is read by the
    /// kernel only with FUSE_INIT_EXT, and exists only in a reply long enough to hold it).
    /// Returns the flags the reply now carries.
    static func patchInitReply(_ reply: UnsafeMutableRawBufferPointer, offered: UInt64, adding: UInt64 = addedFlags) -> UInt64 {
        guard reply.count >= end(of: \InitOut.flags) else { return 0 }
        var out = prefix(of: UnsafeRawBufferPointer(reply), as: InitOut())
        var flags = UInt64(out.flags)
        let hasFlags2 = reply.count >= end(of: \InitOut.flags2)
        if hasFlags2, flags & UInt64(FUSE_INIT_EXT) != 0 { flags |= UInt64(out.flags2) << 32 }
        var add = offered & adding
        if !hasFlags2 || offered & UInt64(FUSE_INIT_EXT) == 0 { add &= 0xFFFF_FFFF }
        if add >> 32 != 0 { add |= UInt64(FUSE_INIT_EXT) }
        flags |= add
        out.flags = UInt32(truncatingIfNeeded: flags)
        if flags & UInt64(FUSE_INIT_EXT) != 0, hasFlags2 { out.flags2 = UInt32(truncatingIfNeeded: flags >> 32) }
        storePrefix(out, into: reply)
        return flags
    }
}
