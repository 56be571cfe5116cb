import Glibc

/// The FUSE request an operation serves: its `unique`, which the kernel never reuses on a
/// connection and resends with bit 63 set after FUSE_NOTIFY_RESEND, and its opcode (the Bridge
/// checks it against the handler's own, so a thread's stale request is never taken for the one
/// it handles; not kept in the journal: a unique alone names a request).
public struct RequestContext: Sendable, Equatable {
    public static let resendBit: UInt64 = 1 << 63
    public let unique: UInt64
    public let opcode: UInt32

    public init(unique: UInt64, opcode: UInt32 = 0) {
        self.unique = unique
        self.opcode = opcode
    }

    /// The kernel resent it: a dead server may have applied it already.
    public var isResend: Bool { unique & Self.resendBit != 0 }
    /// The unique as first sent, the key applied answers are kept under.
    public var original: UInt64 { unique & ~Self.resendBit }
}

/// The answer a request that changed the tree got, kept with the transaction that recorded the
/// change: a resent request found applied gets it again instead of being applied twice.
public enum AppliedRequest: Sendable, Equatable {
    /// unlink, rmdir, rename, setxattr, removexattr, fallocate.
    case done
    /// create, mknod, mkdir, symlink, link, setattr.
    case attributes(Attributes)
    case written(count: Int, modeChanged: Bool)
    case opened(modeChanged: Bool)
    /// release: whether it was the file's last open (the Bridge then drops the page cache a
    /// mapping left; a resend must say the same).
    case released(last: Bool)

    public func write(to w: StateWriter) {
        w.encode { encode(into: &$0) }
    }

    /// The answer's bytes (read back by `read(from:)`).
    func encode(into e: inout StateEncoder) {
        switch self {
        case .done: e.u8(0)
        case .attributes(let a):
            let p = e.take(101)
            p.put(UInt8(1), at: 0)
            p.put(a.ino.rawValue, at: 1); p.put(a.generation, at: 9); p.put(a.mode, at: 13); p.put(a.nlink, at: 17)
            p.put(a.uid, at: 21); p.put(a.gid, at: 25)
            p.put(a.rdev, at: 29); p.put(a.size, at: 37); p.put(a.blocks, at: 45)
            p.put(Int64(a.atime.tv_sec), at: 53); p.put(Int64(a.atime.tv_nsec), at: 61)
            p.put(Int64(a.mtime.tv_sec), at: 69); p.put(Int64(a.mtime.tv_nsec), at: 77)
            p.put(Int64(a.ctime.tv_sec), at: 85); p.put(Int64(a.ctime.tv_nsec), at: 93)
        case .written(let count, let modeChanged):
            e.u8(2); e.u64(UInt64(count)); e.u8(modeChanged ? 1 : 0)
        case .opened(let modeChanged):
            e.u8(3); e.u8(modeChanged ? 1 : 0)
        case .released(let last):
            e.u8(4); e.u8(last ? 1 : 0)
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
        case 4: return .released(last: try r.u8() != 0)
        case let tag: throw .corrupt("answer kind \(tag)")
        }
    }
}
