import CFuse
import Synchronization

/// How many requests of each kind the kernel sent a mount, counted as they arrive on either
/// transport and shown by `getfattr -n user.chargefs.requests MOUNTPOINT`: what a workload costs
/// in round trips, read from the kernel's side of the protocol rather than guessed.
///
/// One relaxed atomic add per request (pinned metadata rows measured 0.97-1.03 of a build without
/// it). Each counter is an object of its own because an `Atomic` needs a stable address.
final class RequestCounts: Sendable {
    private final class Counter: Sendable {
        let value = Atomic<UInt64>(0)
    }

    /// The kernel's opcodes (include/uapi/linux/fuse.h); 52 and 53 are newer than the headers here.
    private static let names: [UInt32: String] = {
        var names: [UInt32: String] = [
            FUSE_LOOKUP.rawValue: "LOOKUP", FUSE_FORGET.rawValue: "FORGET", FUSE_GETATTR.rawValue: "GETATTR",
            FUSE_SETATTR.rawValue: "SETATTR", FUSE_READLINK.rawValue: "READLINK", FUSE_SYMLINK.rawValue: "SYMLINK",
            FUSE_MKNOD.rawValue: "MKNOD", FUSE_MKDIR.rawValue: "MKDIR", FUSE_UNLINK.rawValue: "UNLINK",
            FUSE_RMDIR.rawValue: "RMDIR", FUSE_RENAME.rawValue: "RENAME", FUSE_LINK.rawValue: "LINK",
            FUSE_OPEN.rawValue: "OPEN", FUSE_READ.rawValue: "READ", FUSE_WRITE.rawValue: "WRITE",
            FUSE_STATFS.rawValue: "STATFS", FUSE_RELEASE.rawValue: "RELEASE", FUSE_FSYNC.rawValue: "FSYNC",
            FUSE_SETXATTR.rawValue: "SETXATTR", FUSE_GETXATTR.rawValue: "GETXATTR",
            FUSE_LISTXATTR.rawValue: "LISTXATTR", FUSE_REMOVEXATTR.rawValue: "REMOVEXATTR",
            FUSE_FLUSH.rawValue: "FLUSH", FUSE_INIT.rawValue: "INIT", FUSE_OPENDIR.rawValue: "OPENDIR",
            FUSE_READDIR.rawValue: "READDIR", FUSE_RELEASEDIR.rawValue: "RELEASEDIR",
            FUSE_FSYNCDIR.rawValue: "FSYNCDIR", FUSE_GETLK.rawValue: "GETLK", FUSE_SETLK.rawValue: "SETLK",
            FUSE_SETLKW.rawValue: "SETLKW", FUSE_ACCESS.rawValue: "ACCESS", FUSE_CREATE.rawValue: "CREATE",
            FUSE_INTERRUPT.rawValue: "INTERRUPT", FUSE_BMAP.rawValue: "BMAP", FUSE_DESTROY.rawValue: "DESTROY",
            FUSE_IOCTL.rawValue: "IOCTL", FUSE_POLL.rawValue: "POLL", FUSE_NOTIFY_REPLY.rawValue: "NOTIFY_REPLY",
            FUSE_BATCH_FORGET.rawValue: "BATCH_FORGET", FUSE_FALLOCATE.rawValue: "FALLOCATE",
            FUSE_READDIRPLUS.rawValue: "READDIRPLUS", FUSE_RENAME2.rawValue: "RENAME2", FUSE_LSEEK.rawValue: "LSEEK",
            FUSE_COPY_FILE_RANGE.rawValue: "COPY_FILE_RANGE", FUSE_SETUPMAPPING.rawValue: "SETUPMAPPING",
            FUSE_REMOVEMAPPING.rawValue: "REMOVEMAPPING", FUSE_SYNCFS.rawValue: "SYNCFS", FUSE_TMPFILE.rawValue: "TMPFILE",
        ]
        names[52] = "STATX"
        names[53] = "COPY_FILE_RANGE_64"
        return names
    }()
    /// Opcodes up to this have a counter each; any other (CUSE's, a future one) counts as OTHER.
    private static let highestCounted: UInt32 = 63

    private let counters: [Counter]

    init() {
        counters = (0...Int(Self.highestCounted) + 1).map { _ in Counter() }
    }

    /// Counts one request as the kernel sent it (fuse_in_header first); shorter input is ignored.
    func count(request: UnsafeRawPointer?, length: Int) {
        guard let request, length >= MemoryLayout<fuse_in_header>.size else { return }
        let opcode = request.loadUnaligned(as: fuse_in_header.self).opcode
        let index = opcode <= Self.highestCounted ? Int(opcode) : counters.count - 1
        counters[index].value.add(1, ordering: .relaxed)
    }

    /// One "NAME=count" line per kind of request seen so far, in opcode order.
    var text: String {
        var lines: [String] = []
        for (index, counter) in counters.enumerated() {
            let seen = counter.value.load(ordering: .relaxed)
            guard seen > 0 else { continue }
            let name = index == counters.count - 1 ? "OTHER" : Self.names[UInt32(index)] ?? "OPCODE_\(index)"
            lines.append("\(name)=\(seen)")
        }
        return lines.map { $0 + "\n" }.joined()
    }
}
