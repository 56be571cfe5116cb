import Glibc

/// The FUSE request an operation serves: its `unique`, which the kernel never reuses on a
/// connection and resends with bit 63 set after FUSE_NOTIFY_RESEND.
public struct RequestContext: Sendable, Equatable {
    public static let resendBit: UInt64 = 1 << 63
    public let unique: UInt64

    public init(unique: UInt64) { self.unique = unique }

    /// The kernel resent it: a dead server may have applied it already.
    public var isResend: Bool { unique & Self.resendBit != 0 }
    /// The unique as first sent, the key applied answers are kept under.
    public var original: UInt64 { unique & ~Self.resendBit }
}

/// The answer a request that changed the tree got, kept with the transaction that recorded the
/// change: a resent request found applied gets it again instead of being applied twice.
public enum AppliedRequest: Sendable, Equatable {
    /// unlink, rmdir, rename, setxattr, removexattr, release, fallocate.
    case done
    /// create, mknod, mkdir, symlink, link, setattr.
    case attributes(Attributes)
    case written(count: Int, modeChanged: Bool)
    case opened(modeChanged: Bool)

    public func write(to w: StateWriter) {
        switch self {
        case .done: w.u8(0)
        case .attributes(let a):
            w.u8(1)
            w.u64(a.ino.rawValue); w.u32(a.generation); w.u32(a.mode); w.u32(a.nlink); w.u32(a.uid); w.u32(a.gid)
            w.u64(a.rdev); w.i64(a.size); w.i64(a.blocks)
            w.i64(Int64(a.atime.tv_sec)); w.i64(Int64(a.atime.tv_nsec)); w.i64(Int64(a.mtime.tv_sec)); w.i64(Int64(a.mtime.tv_nsec))
            w.i64(Int64(a.ctime.tv_sec)); w.i64(Int64(a.ctime.tv_nsec))
        case .written(let count, let modeChanged):
            w.u8(2); w.u64(UInt64(count)); w.u8(modeChanged ? 1 : 0)
        case .opened(let modeChanged):
            w.u8(3); w.u8(modeChanged ? 1 : 0)
        }
    }

    public static func read(from r: inout StateReader) throws(StateError) -> AppliedRequest {
        switch try r.u8() {
        case 0: return .done
        case 1:
            let ino = InodeNumber(rawValue: try r.u64())
            let generation = try r.u32(), mode = try r.u32(), nlink = try r.u32(), uid = try r.u32(), gid = try r.u32()
            let rdev = try r.u64(), size = try r.i64(), blocks = try r.i64()
            var times: [timespec] = []
            for _ in 0..<3 { times.append(timespec(tv_sec: Int(try r.i64()), tv_nsec: Int(try r.i64()))) }
            return .attributes(Attributes(ino: ino, generation: generation, mode: mode, nlink: nlink, uid: uid, gid: gid,
                                          rdev: rdev, size: size, blocks: blocks, atime: times[0], mtime: times[1], ctime: times[2]))
        case 2:
            let count = try r.u64()
            guard count <= UInt64(Int.max) else { throw .corrupt("a write of \(count) bytes") }
            return .written(count: Int(count), modeChanged: try r.u8() != 0)
        case 3: return .opened(modeChanged: try r.u8() != 0)
        case let tag: throw .corrupt("answer kind \(tag)")
        }
    }
}
