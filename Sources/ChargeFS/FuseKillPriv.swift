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
    /// The INIT request's id and whether the kernel offered the flag; written by the one thread
    /// that reads INIT, before any other request exists.
    nonisolated(unsafe) private static var initRequest: (unique: UInt64, offered: Bool)?
    nonisolated(unsafe) private static var grantedFlag = false
    private static let slot: pthread_key_t? = {
        var key = pthread_key_t()
        return pthread_key_create(&key, nil) == 0 ? key : nil
    }()

    /// Whether the kernel took the handover: then all clearing is ours.
    static var granted: Bool { grantedFlag }

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
            let header = request.loadUnaligned(as: fuse_in_header.self)
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
                if arg.count >= 16 {
                    let flags = arg.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
                    initRequest = (header.unique, flags & UInt32(FUSE_HANDLE_KILLPRIV_V2) != 0)
                }
            default: break
            }
        }
        if let slot { pthread_setspecific(slot, clears ? UnsafeRawPointer(bitPattern: 1) : nil) }
    }

    private static func grantIfInitReply(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) {
        guard let initRequest, initRequest.offered, !grantedFlag, count >= 2,
              iov[0].iov_len >= MemoryLayout<fuse_out_header>.size, let header = iov[0].iov_base,
              iov[1].iov_len >= 16, let reply = iov[1].iov_base else { return }
        let out = header.loadUnaligned(as: fuse_out_header.self)
        guard out.unique == initRequest.unique, out.error == 0 else { return }
        // fuse_init_out: major, minor, max_readahead, flags (the first four fields of every version).
        let flags = reply.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
        reply.storeBytes(of: flags | UInt32(FUSE_HANDLE_KILLPRIV_V2), toByteOffset: 12, as: UInt32.self)
        grantedFlag = true
    }
}
