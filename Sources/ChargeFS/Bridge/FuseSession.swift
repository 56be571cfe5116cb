import CFuse
import Glibc
import Synchronization
import SystemPackage

/// One mount's FUSE session: the connection (`FuseConnection`, the transport's part) with the
/// file system it serves and what the handlers need. libfuse hands it back as userdata with
/// every request and to the INIT and DESTROY callbacks, so nothing about a session is global.
final class FuseSession: FuseConnection, @unchecked Sendable {
    let fileSystem: FileSystem

    init(fileSystem: FileSystem) {
        self.fileSystem = fileSystem
    }

    /// -o takeover: servers this one's keeper started before it (0 for the first); nil without
    /// takeover. Set before serving.
    var takeovers: UInt64?
    /// -o takeover: the keeper's pid now (a server restarts a dead one).
    var keeperPid: (@Sendable () -> Int32)?
    /// -o takeover: upgrades in place (chargefsd --upgrade) done, and those whose new binary
    /// could not take over (the previous one serves again); not counted in `takeovers`.
    var upgrades: UInt64 = 0
    var upgradeFailures: UInt64 = 0
    /// The root's read-only attributes that the transport answers: the status (the tree's lines,
    /// then the transport's) and the requests by kind. nil for any other name.
    func transportAttribute(_ ino: InodeNumber, name: FileName) throws(Errno) -> [UInt8]? {
        guard ino == FileSystem.rootIno else { return nil }
        if name == FileSystem.requestsXattr { return Array(requests.text.utf8) }
        if name == FileSystem.statusXattr {
            var text = "transport=\(transport)\n"
            // -o takeover: who serves now, its keeper, and how many servers it replaced.
            if let takeovers { text += "pid=\(getpid()) keeper=\(keeperPid?() ?? getppid()) takeovers=\(takeovers) upgrades=\(upgrades) upgrade_failures=\(upgradeFailures) resent=\(features.resent.load(ordering: .relaxed))\n" }
            return try fileSystem.getxattr(ino, name: name) + Array(text.utf8)
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

    /// The session a request belongs to.
    static func of(_ userdata: UnsafeMutableRawPointer?) -> FuseSession? {
        userdata.map { Unmanaged<FuseSession>.fromOpaque($0).takeUnretainedValue() }
    }

    /// A successor's: the passthrough registrations the kernel still holds for this connection
    /// (`FileSystem.passthroughRegistrations`); set before the INIT replay.
    var adoptedPassthrough: [InodeNumber: (id: Int32, opens: UInt32)]?

    /// Where backing files are registered for passthrough; nil until INIT took passthrough.
    private(set) var passthrough: PassthroughRegistry?

    /// INIT took FUSE passthrough: large read-only opens may now be handed to the kernel.
    override func passthroughNegotiated() {
        guard let handle, let device = PassthroughRegistry.Device(sessionFD: fuse_session_fd(handle)) else { return }
        // A successor takes over the backing ids its predecessor registered on this connection.
        passthrough = adoptedPassthrough.map { PassthroughRegistry(device: device, adopting: $0) } ?? PassthroughRegistry(device: device)
        fileSystem.noteKernelPassthrough(true)
    }

    private let refusalLogged = Atomic(false)

    /// The kernel refused to register a backing file: said once in the log.
    func noteRefusedPassthrough(_ error: Errno) {
        guard !refusalLogged.exchange(true, ordering: .relaxed) else { return }
        Log.line("passthrough: the kernel refused a backing file (\(error)); such opens are served by the daemon")
    }

    /// Files whose mapped pages were written back, for a drop of their page cache at the last close.
    let pageCacheDrops = PageCacheDrops()

    /// Drops the kernel's page cache of `ino` (every page; clean by now: the kernel writes a
    /// mapping's dirty pages back when it is unmapped, before the release). Called with no lock
    /// of ours held: the kernel locks each page, which a request in flight may hold.
    func dropPageCache(_ ino: fuse_ino_t) {
        if let handle { _ = fuse_lowlevel_notify_inval_inode(handle, ino, 0, 0) }
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
