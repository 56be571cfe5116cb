import CFuse
import Glibc

/// Takes over clearing setuid/setgid from the kernel (FUSE_HANDLE_KILLPRIV_V2).
///
/// Without it the kernel asks getxattr("security.capability") before every write: a second round
/// trip per write(2). With it the kernel marks inodes S_NOSEC and leaves clearing setuid/setgid
/// on write, truncate and chown to us, flagging each request whose caller lacks CAP_FSETID.
/// libfuse 3.14 speaks FUSE 7.31 and knows neither the init flag nor those request flags, so the
/// session's /dev/fuse traffic runs through these custom I/O hooks: `read` notes each request's
/// flag in a per-thread slot before libfuse decodes it (libfuse handles a request on the thread
/// that read it), and `writev` adds the flag to the INIT reply if the kernel offered it.
enum FuseKillPriv {
    private struct InitState {
        var unique: UInt64 = 0
        var seen = false
        var offered = false
        var granted = false
    }
    /// Written by the one thread that reads INIT, before any other request exists.
    nonisolated(unsafe) private static var initState = InitState()
    private static let slot: pthread_key_t? = {
        var key = pthread_key_t()
        return pthread_key_create(&key, nil) == 0 ? key : nil
    }()

    /// Whether the kernel took the handover: then all clearing is ours.
    static var granted: Bool { initState.granted }

    /// The kernel asked the request being handled on this thread to clear setuid/setgid.
    static var requestClearsSetID: Bool {
        guard let slot else { return false }
        return pthread_getspecific(slot) != nil
    }

    /// Routes the session's traffic through the hooks; call after fuse_session_mount.
    static func install(on session: OpaquePointer) -> Bool {
        guard slot != nil else { return false }
        var io = fuse_custom_io()
        io.read = { fd, buf, len, _ in
            let n = Glibc.read(fd, buf, len)
            FuseKillPriv.note(request: buf, length: n)
            return n
        }
        io.writev = { fd, iov, count, _ in
            if let iov { FuseKillPriv.grantIfInitReply(iov, Int(count)) }
            return Glibc.writev(fd, iov, count)
        }
        return fuse_session_custom_io(session, &io, fuse_session_fd(session)) == 0
    }

    private static func note(request: UnsafeMutableRawPointer?, length: Int) {
        let errnoSaved = errno
        defer { errno = errnoSaved }
        var clears = false
        let headerSize = MemoryLayout<fuse_in_header>.size
        if let request, length >= headerSize {
            let opcode = request.load(fromByteOffset: MemoryLayout<fuse_in_header>.offset(of: \.opcode)!, as: UInt32.self)
            let arg = request + headerSize, argLength = length - headerSize
            func flag<T>(_ type: T.Type, _ field: KeyPath<T, UInt32>, _ bit: Int32) -> Bool {
                guard argLength >= MemoryLayout<T>.size, let offset = MemoryLayout<T>.offset(of: field) else { return false }
                return arg.loadUnaligned(fromByteOffset: offset, as: UInt32.self) & UInt32(bit) != 0
            }
            switch opcode {
            case FUSE_WRITE.rawValue: clears = flag(fuse_write_in.self, \.write_flags, FUSE_WRITE_KILL_SUIDGID)
            case FUSE_SETATTR.rawValue: clears = flag(fuse_setattr_in.self, \.valid, FATTR_KILL_SUIDGID)
            case FUSE_OPEN.rawValue: clears = flag(fuse_open_in.self, \.open_flags, FUSE_OPEN_KILL_SUIDGID)
            case FUSE_INIT.rawValue:
                if let flagsOffset = MemoryLayout<fuse_init_in>.offset(of: \.flags), argLength >= flagsOffset + 4 {
                    let flags = arg.loadUnaligned(fromByteOffset: flagsOffset, as: UInt32.self)
                    initState.unique = request.load(fromByteOffset: MemoryLayout<fuse_in_header>.offset(of: \.unique)!, as: UInt64.self)
                    initState.seen = true
                    initState.offered = flags & UInt32(FUSE_HANDLE_KILLPRIV_V2) != 0
                }
            default: break
            }
        }
        if let slot { pthread_setspecific(slot, clears ? UnsafeRawPointer(bitPattern: 1) : nil) }
    }

    private static func grantIfInitReply(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) {
        guard initState.seen, initState.offered, !initState.granted, count >= 2,
              iov[0].iov_len >= MemoryLayout<fuse_out_header>.size, let header = iov[0].iov_base,
              let flagsOffset = MemoryLayout<fuse_init_out>.offset(of: \.flags),
              iov[1].iov_len >= flagsOffset + 4, let reply = iov[1].iov_base else { return }
        let unique = header.load(fromByteOffset: MemoryLayout<fuse_out_header>.offset(of: \.unique)!, as: UInt64.self)
        let error = header.load(fromByteOffset: MemoryLayout<fuse_out_header>.offset(of: \.error)!, as: Int32.self)
        guard unique == initState.unique, error == 0 else { return }
        let flags = reply.loadUnaligned(fromByteOffset: flagsOffset, as: UInt32.self)
        reply.storeBytes(of: flags | UInt32(FUSE_HANDLE_KILLPRIV_V2), toByteOffset: flagsOffset, as: UInt32.self)
        initState.granted = true
    }
}
