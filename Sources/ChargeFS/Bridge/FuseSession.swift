import CFuse
import Glibc

/// One mount's FUSE session: the libfuse session, the file system it serves, and what INIT
/// settled with this kernel. libfuse hands it back as userdata with every request, to the INIT
/// and DESTROY callbacks and to the custom I/O hooks, so nothing about a session is global.
final class FuseSession: @unchecked Sendable {
    let fileSystem: FileSystem
    /// The protocol features negotiated past libfuse 3.14 (written only while INIT is handled,
    /// before the kernel sends any other request).
    let features = FuseKernelFeatures()
    /// The libfuse session; set once, before the first request is read.
    private(set) var handle: OpaquePointer?

    init(fileSystem: FileSystem) {
        self.fileSystem = fileSystem
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

    /// The session a request belongs to.
    static func of(_ userdata: UnsafeMutableRawPointer?) -> FuseSession? {
        userdata.map { Unmanaged<FuseSession>.fromOpaque($0).takeUnretainedValue() }
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
